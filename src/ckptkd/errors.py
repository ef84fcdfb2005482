"""The one error type that reaches users as a one-line message and exit code 2, and the interrupt a signal becomes."""

import contextlib
import signal
import sys
import threading


class UserError(Exception):
    """A problem with the user's input (config, file, reference, data): not a bug in ckptkd.

    The message is shown as one line, so it must name the field, file or reference at fault.
    """


_noted: set[str] = set()


def note(message: str) -> None:
    """A one-line warning on stderr, for input that is accepted but probably not what was meant (an image's alpha
    channel dropped, a class with no training images); said once per process, however often the input is read."""
    if message not in _noted:
        _noted.add(message)
        print(f"ckptkd: note: {message}", file=sys.stderr)


class RunsFailed(Exception):
    """A study finished with runs that failed for good (every attempt spent) and runs they block: its report is
    written, but it is not complete. The command line lists them and exits 1."""

    def __init__(self, study, failed: list[str], blocked: int):
        self.study, self.failed, self.blocked = study, failed, blocked
        shown = ", ".join(failed[:5]) + (f" and {len(failed) - 5} more" if len(failed) > 5 else "")
        super().__init__(f"study {study}: {len(failed)} runs failed for good ({shown})"
                         + (f", blocking {blocked} more" if blocked else "")
                         + "; `ckptkd report` lists each error. Raise max_attempts to try them again")


class Interrupted(KeyboardInterrupt):
    """A signal that stops a process by asking (SIGTERM from `kill`, `docker stop`, systemd or Slurm's preemption;
    SIGUSR2, Slurm's warning before a time limit; SIGHUP): handled as Ctrl-C is — the run keeps its last saved state,
    its manifest says `interrupted`, a study gives its tasks back without spending an attempt — and the process
    exits with the conventional 128 + the signal's number."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


INTERRUPTING_SIGNALS = (signal.SIGTERM, signal.SIGUSR2, signal.SIGHUP)


def raise_interrupted(signum, _frame) -> None:
    raise Interrupted(signum)


@contextlib.contextmanager
def interrupting_signals():
    """While inside, SIGTERM, SIGUSR2 and SIGHUP raise `Interrupted` (as the command line always does): for a
    Python program that runs a study or a training job it may lose to preemption. Only the main thread can take
    signals: elsewhere this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {signum: signal.signal(signum, raise_interrupted) for signum in INTERRUPTING_SIGNALS}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
