"""The paper's study over seeds: its config (`config`), the plan of tasks (`plan`, `variants`), the queue several
workers share (`queue`), the runner (`runner`), the statistics and the report (`report`)."""

from .runner import run_study

__all__ = ["run_study"]
