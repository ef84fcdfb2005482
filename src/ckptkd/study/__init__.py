"""The paper's study over seeds: its config (`config`), the plan of tasks (`plan`, `variants`), the queue several
workers share (`queue`: standard library only, so a worker's claims cost no torch import), the runner (`runner`:
`run_study`), what the queue keeps of each task (`summaries`), and the report (`report`)."""
