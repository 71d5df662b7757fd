"""A hang watchdog for long runs: a step far slower than the recent ones ends the process.

Long NVAE runs have been seen to freeze after days (a stuck collective, a dead file system, a
driver); a frozen process holds its accelerators and writes nothing, and no supervisor notices.
``HangWatchdog`` times each step (data fetch + train step) from a background thread. Once
``warmup`` steps have been timed, a step running longer than ``max(factor * median of the last
steps, min_seconds)`` is declared hung: the stacks of all threads go to stderr, then one line
naming the last checkpoint, then the process exits with ``EXIT_HUNG`` (75, EX_TEMPFAIL: "try
again") so a supervisor restarts it with ``--resume``. It does not checkpoint the hung state:
the step in flight may have applied half an update, so the newest checkpoint (at most
``checkpoint_minutes`` old) is the safe one to continue from.
"""

import collections
import faulthandler
import os
import statistics
import sys
import threading
import time

EXIT_HUNG = 75
HANG_FACTOR = 20.0  # x the median step time
HANG_MIN_SECONDS = 600.0  # never declare a hang sooner than this
WARMUP_STEPS = 5  # the first steps include tracing and graph optimization: not timed
HISTORY = 50


class HangWatchdog:
    """Call ``start_step()`` before and ``end_step()`` after each step (time in between, e.g.
    checkpoints and evaluation, is not watched); use as a context manager.

    ``on_hang(seconds, limit)`` runs in the watchdog thread when a step is declared hung; the
    default prints the stacks and a line and calls ``os._exit(EXIT_HUNG)`` (the main thread is
    stuck, so only a hard exit ends the process). ``factor=0`` disables the watchdog.
    """

    def __init__(
        self,
        factor=HANG_FACTOR,
        min_seconds=HANG_MIN_SECONDS,
        warmup=WARMUP_STEPS,
        describe=lambda: "",
        on_hang=None,
        poll_seconds=None,
    ):
        self.factor = float(factor)
        self.min_seconds = float(min_seconds)
        self.warmup = int(warmup)
        self.describe = describe  # extra words for the message, e.g. the last checkpoint
        self.on_hang = on_hang or self._exit
        self.poll_seconds = poll_seconds
        self._times = collections.deque(maxlen=HISTORY)
        self._seen = 0
        self._started = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = None
        self.fired = False

    # --- the training thread's side ---------------------------------------------------------
    def start_step(self):
        with self._lock:
            self._started = time.monotonic()

    def end_step(self):
        with self._lock:
            if self._started is not None:
                self._seen += 1
                if self._seen > self.warmup:
                    self._times.append(time.monotonic() - self._started)
            self._started = None

    def limit(self):
        """Seconds a step may take now, or None while still warming up."""
        with self._lock:
            if not self._times:
                return None
            return max(self.factor * statistics.median(self._times), self.min_seconds)

    # --- the watchdog thread ----------------------------------------------------------------
    def __enter__(self):
        if self.factor > 0:
            self._thread = threading.Thread(target=self._watch, name="nvae-watchdog", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _watch(self):
        while not self._stop.wait(self.poll_seconds or max(1.0, self.min_seconds / 20)):
            limit = self.limit()
            with self._lock:
                started = self._started
            if limit is None or started is None:
                continue
            elapsed = time.monotonic() - started
            if elapsed > limit:
                self.fired = True
                self.on_hang(elapsed, limit)
                return

    def _exit(self, elapsed, limit):
        print("nvae-tf watchdog: stacks of all threads:", file=sys.stderr, flush=True)
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        extra = self.describe()
        print(
            f"error: a training step has run for {elapsed:.0f} s, over the hang limit of "
            f"{limit:.0f} s ({self.factor:g} x the recent median step time, at least "
            f"{self.min_seconds:g} s); training looks hung, stopping with exit status "
            f"{EXIT_HUNG}{'; ' + extra if extra else ''}; continue with --resume",
            file=sys.stderr,
            flush=True,
        )
        os._exit(EXIT_HUNG)
