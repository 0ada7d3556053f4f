"""Helpers of main.py's verbs; this file: how Ctrl-C and SIGTERM stop a run without losing work."""

import contextlib
import signal


class Interrupted(KeyboardInterrupt):
    """Ctrl-C or a SIGTERM (a scheduler, `kill`, a closing container): stop, keep what was done."""

    def __init__(self, signum=signal.SIGINT):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


_held = None  # None: a signal interrupts at once; a list: signals held by interrupts_deferred()


def raise_interrupt(signum, frame):
    if _held is None:
        raise Interrupted(signum)
    _held.append(signum)


@contextlib.contextmanager
def interrupts_deferred():
    """Let the block finish (a checkpoint being written), then act on a signal that came meanwhile:
    otherwise an interrupt could land inside torch.save and surface as a confusing write error."""
    global _held
    if _held is not None:  # inside another such block: that one acts on the signal
        yield
        return
    _held = []
    try:
        yield
    finally:
        held, _held = _held, None
    if held:
        raise Interrupted(held[0])
