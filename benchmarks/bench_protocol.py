"""What a benchmark child process measures, in which order, and how it tells the parent.

Both children (ours, ``ours_driver.py``; the original's, ``official_driver.py``) hand their
model's operations to ``measure``, which runs them in the same order with the same counts:
the first training step (then the ``first_step`` event, which the parent timestamps for
start-up), warm-up and timed training steps, a warm-up and timed sampling calls, a warm-up
and timed importance-weighted evaluations. Events are single stdout lines
``SIDE-BY-SIDE {json}``; everything else on stdout or stderr is the frameworks' own.

Standard library only: the original's driver runs in a PyTorch environment.
"""

import argparse
import contextlib
import json
import os
import resource
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

PREFIX = "SIDE-BY-SIDE "
FIGURES = ("startup", "train", "sample", "iw")  # what --only may select (start-up always runs)


@dataclass
class ChildFigures:
    """One child's measurements; a figure left out by ``--only`` stays None."""

    batch: int
    batch_sum: float  # sum of the synthetic batch's pixels: both sides must agree
    versions: dict
    params: int | None = None  # trainable parameters
    train_step_s: list[float] | None = None  # every timed step, seconds
    train_s_per_step: float | None = None  # their median
    train_images_per_s: float | None = None
    sample_batch: int | None = None
    sample_temperature: float | None = None
    sample_call_s: list[float] | None = None
    sample_ms_per_img: float | None = None
    iw_samples: int | None = None  # K
    iw_batch: int | None = None
    iw_call_s: list[float] | None = None
    iw_images_per_s: float | None = None
    peak_rss_mb: float | None = None  # ru_maxrss of the whole child process
    first_step_s: float | None = None  # the first training step's call: tracing, compiling
    peak_device_mb: float | None = None  # the accelerator's allocator peak, where there is one


@dataclass
class Operations:
    """A model's operations; each finishes its work (no pending device work) before returning."""

    train_step: Callable[[], object]
    sample: Callable[[int, float], object]  # (batch, temperature)
    iw_evaluate: Callable[[int, int], object]  # (batch, K)
    count_params: Callable[[], int]  # trainable ones; called after the first step (lazy builds)
    peak_device_mb: Callable[[], float] | None = None  # an accelerator's allocator peak, MB


def add_child_args(parser: argparse.ArgumentParser) -> None:
    """The measurement options every child takes (the parent passes them through)."""
    parser.add_argument("--steps", type=int, default=3, help="timed training steps")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps after the first")
    parser.add_argument("--sample-batch", type=int, default=16)
    parser.add_argument("--sample-temperature", type=float, default=0.7)
    parser.add_argument("--sample-calls", type=int, default=3, help="timed sampling calls")
    parser.add_argument("--iw-samples", type=int, default=100, help="K of the IW evaluation")
    parser.add_argument("--iw-batch", type=int, default=4, help="images per IW evaluation")
    parser.add_argument("--iw-calls", type=int, default=1, help="timed IW evaluations")
    parser.add_argument("--only", nargs="+", choices=FIGURES, default=list(FIGURES))


def child_args(args: argparse.Namespace) -> list[str]:
    """``args``'s measurement options as a child's command-line arguments."""
    names = ("steps", "warmup", "sample_batch", "sample_temperature", "sample_calls")
    names += ("iw_samples", "iw_batch", "iw_calls")
    out = []
    for name in names:
        out += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    return out + ["--only", *args.only]


def emit(event: str, **fields) -> None:
    print(PREFIX + json.dumps({"event": event, **fields}), flush=True)


def parse_event(line: str) -> dict | None:
    """The event a stdout line carries, or None for any other line."""
    if not line.startswith(PREFIX):
        return None
    return json.loads(line[len(PREFIX) :])


def timed_calls(fn: Callable[[], object], calls: int) -> list[float]:
    """Wall seconds of each of ``calls`` calls of ``fn``."""
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def peak_rss_mb() -> float:
    """This process's resident-set peak in MB (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@contextlib.contextmanager
def device_turn():
    """Exclusive use of the device while inside, when ``BENCH_DEVICE_LOCK`` names a lock file
    (``gpu_sitting.py`` runs several children at once; their timed sections take turns)."""
    path = os.environ.get("BENCH_DEVICE_LOCK")
    if not path:
        yield
        return
    import fcntl

    with open(path, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def measure(ops: Operations, figures: ChildFigures, args: argparse.Namespace) -> ChildFigures:
    """Run ``ops`` in the protocol's order, filling ``figures``; emits the two events.

    First calls (tracing, compiling) run outside ``device_turn``, timed ones inside it."""
    (figures.first_step_s,) = timed_calls(ops.train_step, 1)
    emit("first_step")
    figures.params = int(ops.count_params())
    if "train" in args.only:
        with device_turn():
            timed_calls(ops.train_step, args.warmup)
            figures.train_step_s = timed_calls(ops.train_step, args.steps)
        figures.train_s_per_step = statistics.median(figures.train_step_s)
        figures.train_images_per_s = figures.batch / figures.train_s_per_step
    if "sample" in args.only:
        call = lambda: ops.sample(args.sample_batch, args.sample_temperature)
        call()
        figures.sample_batch, figures.sample_temperature = (
            args.sample_batch,
            args.sample_temperature,
        )
        with device_turn():
            figures.sample_call_s = timed_calls(call, args.sample_calls)
        figures.sample_ms_per_img = statistics.median(figures.sample_call_s) / args.sample_batch
        figures.sample_ms_per_img *= 1000
    if "iw" in args.only:
        call = lambda: ops.iw_evaluate(args.iw_batch, args.iw_samples)
        call()
        figures.iw_samples, figures.iw_batch = args.iw_samples, args.iw_batch
        with device_turn():
            figures.iw_call_s = timed_calls(call, args.iw_calls)
        figures.iw_images_per_s = args.iw_batch / statistics.median(figures.iw_call_s)
    figures.peak_rss_mb = peak_rss_mb()
    if ops.peak_device_mb is not None:
        figures.peak_device_mb = ops.peak_device_mb()
    emit("result", figures=asdict(figures))
    return figures


def check_counts(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Reject counts that would leave a figure without a timed call."""
    for name in ("steps", "sample_batch", "sample_calls", "iw_samples", "iw_batch", "iw_calls"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.warmup < 0:
        parser.error("--warmup must be at least 0")
    if not args.sample_temperature > 0:
        parser.error("--sample-temperature must be positive")


def python_version() -> str:
    return sys.version.split()[0]
