"""SIGINT / SIGTERM during training: finish the current step, checkpoint, exit 130 / 143.

Before the step loop starts there is nothing to save, so a signal stops set-up at once; in the
loop the first signal asks for a stop after the current step (the loop then checkpoints), a
second one aborts at once. Either way ``TrainingInterrupted`` carries the shell's exit status
for that signal (128 + its number), which ``trainers.cli.entry_point`` returns.
"""

import signal
import sys
import threading


class TrainingInterrupted(KeyboardInterrupt):
    """SIGINT/SIGTERM stopped training; ``exit_code`` is 130 (SIGINT) or 143 (SIGTERM)."""

    def __init__(self, signal_name="SIGINT", message=""):
        super().__init__(message)
        self.signal_name = signal_name
        self.exit_code = 128 + int(getattr(signal, signal_name, signal.SIGINT))


class StopOnSignal:
    """Context manager turning SIGINT/SIGTERM into a stop request (``signal`` holds its name).

    ``in_loop`` (set by the training loop) switches from "raise at once" to "stop after this
    step". Only the main thread can install handlers; elsewhere this does nothing.
    """

    def __init__(self):
        self.signal = None
        self.in_loop = False
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _handle(self, signum, frame):
        name = signal.Signals(signum).name
        if self.signal or not self.in_loop:
            raise TrainingInterrupted(name, f"{name}: stopped without a new checkpoint")
        self.signal = name
        print(
            f"\n{name}: stopping after this step (send it again to abort at once)",
            file=sys.stderr,
        )
