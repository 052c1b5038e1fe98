"""USR2 and SIGTERM become a flag that the training loop reads at step boundaries.

Slurm sends USR2 before the wall-time limit (our `--signal`) or when preemption starts, and SIGTERM
when it ends a job (preemption without grace time, scancel). A handler that saved or exited at once
would do it in the middle of a step, on one rank, with loader workers and collectives in flight; so
the handler only records the signal, and the loop agrees with the other ranks on when to stop
(amodal/train.py). EXIT_INTERRUPTED is the exit status of a process that stopped on a signal after
saving; the job layer (amodal/jobs.py, amodal/outcome.py) decides whether the job comes back.
"""

from __future__ import annotations

import signal

EXIT_INTERRUPTED = 75  # EX_TEMPFAIL: "try again later"

HANDLED = (signal.SIGUSR2, signal.SIGTERM)
_received: list[int] = []


def _on_signal(signum, _frame) -> None:
    _received.append(signum)  # nothing else: no I/O, no locks, no collectives in a handler


def install() -> dict:
    """Make USR2 and SIGTERM set the stop flag (cleared here); returns the previous handlers."""
    _received.clear()
    return {sig: signal.signal(sig, _on_signal) for sig in HANDLED}


def restore(previous: dict) -> None:
    for sig, handler in previous.items():
        signal.signal(sig, handler if handler is not None else signal.SIG_DFL)


def ignore() -> None:
    """For a process whose work is done (finished, or saved and decided): a USR2 or SIGTERM that comes
    while it exits must not kill it, or Slurm records a finished job as FAILED. SIG_IGN, unlike a
    Python handler, stays in force through the interpreter's shutdown."""
    for sig in HANDLED:
        signal.signal(sig, signal.SIG_IGN)


def stop_requested() -> bool:
    return bool(_received)


def received() -> list[str]:
    """Names of the signals received since install(), sorted, each once."""
    return sorted({signal.Signals(s).name for s in _received})
