"""nvae-tf and the original NVAE on one GPU, in one sitting that fits a short device lease.

Issue 13's GPU figures: training images/s on the CIFAR-10 paper config at batch 32 and the
CelebA-HQ 256 config at batch 4 (and 8), sampling at batch 16 and 36, the first step's time
(tracing, graph optimization or XLA compile) and whether ours trains CelebA-HQ 256 at batch 8
and 16. Ours runs in graph mode with mixed_float16, with ``--xla`` also as one XLA
program; the original with its float16 autocast, as each is meant to be trained on GPUs.

Every job is a child process under the side-by-side protocol (``bench_protocol``). Several run
at once so that tracing and compiling (host CPU) overlap the other jobs, but their timed calls
take turns: a child holds an exclusive lock on one file (``BENCH_DEVICE_LOCK``) around each of
its timed sections (``bench_protocol.device_turn``), so no two timed sections share the GPU.
First calls (tracing, compiling, a first run) stay outside it and can overlap another job's
timed calls; each record lists the jobs that ran during its first step.

Results go to ``--out/gpu-sitting-<date>.json`` after every finished job, so a sitting cut
short by its lease still leaves what it measured; a failed job's record keeps its log's tail.

    python benchmarks/gpu_sitting.py --official /path/nvae-official --harness /path/bench \\
        --torch-python python3 --tf-python python3 --tf-env ~/tfgpu/env.sh --budget 540
"""

import argparse
import contextlib
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field

from bench_protocol import parse_event

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
MIXED_XLA = ("--set", "precision=mixed_float16", "--set", "jit_compile=true")
MIXED_GRAPH = ("--set", "precision=mixed_float16")


@dataclass(frozen=True)
class Job:
    """One child run: which side, config and batch, and the protocol options it gets."""

    name: str
    side: str  # "original" | "nvae-tf"
    config: str  # official_bench.CONFIGS name; ours reads configs/<config>.yaml
    batch: int
    measure: tuple[str, ...]  # protocol options (bench_protocol.add_child_args)
    ours_sets: tuple[str, ...] = ()  # ours: --set overrides (precision, XLA)
    timeout_s: float = 300.0
    wave: int = 1  # jobs of one wave run together; a wave starts when the one before is done
    xla_flags: str = ""  # appended to the child's XLA_FLAGS


TRAIN = ("--warmup", "3", "--steps", "10")
FIT = ("--warmup", "1", "--steps", "3", "--only", "train")  # does a batch fit, and its speed
CIFAR = (*TRAIN, "--sample-batch", "16", "--sample-calls", "5", "--only", "train", "sample")
CELEBA = (*TRAIN, "--sample-batch", "36", "--sample-calls", "3", "--only", "train", "sample")
# Waves, because each process keeps the GPU memory it took until it exits (TensorFlow's
# allocator and PyTorch's cache): a wave's jobs must fit on the GPU together. On the H200
# (139 GiB) ours took 15.9 GiB on CIFAR-10 b32 and 30.1 GiB on CelebA-HQ 256 b4.
JOBS = (
    Job("cifar10 b32", "nvae-tf", "cifar10", 32, CIFAR, MIXED_GRAPH, 400),
    Job("celebahq256 b4", "nvae-tf", "celebahq256", 4, CELEBA, MIXED_GRAPH, 400),
    Job("cifar10 b32", "original", "cifar10", 32, CIFAR, timeout_s=300),
    Job("celebahq256 b4", "original", "celebahq256", 4, CELEBA, timeout_s=300),
    # A float32 step time near the mixed_float16 one means the step is bound by launching
    # kernels from the host rather than by the GPU's arithmetic.
    Job("cifar10 b32 float32", "nvae-tf", "cifar10", 32, (*TRAIN, "--only", "train"), (), 400),
    Job("celebahq256 b8", "nvae-tf", "celebahq256", 8, FIT, MIXED_GRAPH, 400, wave=2),
    Job("celebahq256 b8", "original", "celebahq256", 8, FIT, timeout_s=300, wave=2),
    Job("celebahq256 b16", "nvae-tf", "celebahq256", 16, FIT, MIXED_GRAPH, 400, wave=3),
)
# --xla: the whole step as one XLA program. Its compile took over 6 minutes on the H200 host
# (2026-11-30, one LLVM module at a time: TensorFlow gives XLA no compile thread pool), so these
# start first, only when asked for, and split the LLVM work over the host's cores (not yet
# measured with this).
PARALLEL_XLA = (
    f"--xla_gpu_force_compilation_parallelism={os.cpu_count() or 1} "
    "--xla_gpu_enable_llvm_module_compilation_parallelism=true"
)
XLA_JOBS = (
    Job("cifar10 b32 xla", "nvae-tf", "cifar10", 32, CIFAR, MIXED_XLA, 900, 1, PARALLEL_XLA),
    Job("celebahq256 b4 xla", "nvae-tf", "celebahq256", 4, CELEBA, MIXED_XLA, 900, 1, PARALLEL_XLA),
)


@dataclass
class Outcome:
    job: dict
    command: list[str]
    status: str = "pending"  # pending | running | ok | failed | timed out | not started
    first_step_at_s: float | None = None  # launch -> first step done
    wall_s: float | None = None
    figures: dict | None = None
    error: str | None = None
    overlapped: list[str] = field(default_factory=list)  # jobs running during its first step
    log_tail: list[str] | None = None  # a failed child's last stderr lines


def command_for(job: Job, args) -> list[str]:
    if job.side == "original":
        return [args.torch_python, os.path.join(HERE, "official_driver.py"), "--nvae",
                args.official, "--harness", args.harness, "--config", job.config, "--batch",
                str(job.batch), "--device", args.device, *(["--amp"] if args.device == "cuda" else []),
                *job.measure]  # fmt: skip
    config = os.path.join(ROOT, "configs", f"{job.config}.yaml")
    command = [args.tf_python, os.path.join(HERE, "ours_driver.py"), "--config", config,
               *job.ours_sets, "--batch", str(job.batch), *job.measure]  # fmt: skip
    if args.tf_env:  # TensorFlow's libraries for ours only: the original keeps its own
        command = ["bash", "-c", 'source "$0" && exec "$@"', args.tf_env, *command]
    return command


class Running:
    """A launched child, its stdout read line by line without blocking the others."""

    def __init__(self, job, outcome, env, log_dir):
        self.job, self.outcome = job, outcome
        self.log_path = os.path.join(log_dir, f"{id(self)}.log")
        self.log = open(self.log_path, "w+")  # noqa: SIM115 (the child's lifetime; finish closes)
        self.started = time.perf_counter()
        if job.xla_flags:
            env = dict(env, XLA_FLAGS=f"{env.get('XLA_FLAGS', '')} {job.xla_flags}".strip())
        self.proc = subprocess.Popen(outcome.command, stdout=subprocess.PIPE, stderr=self.log,
                                     cwd=ROOT, env=env)  # fmt: skip
        os.set_blocking(self.proc.stdout.fileno(), False)
        self.buffer = b""
        outcome.status = "running"

    def poll(self, others) -> bool:
        """Read what the child printed; True once it has exited (and all it printed is read)."""
        exited = self.proc.poll() is not None  # before reading: nothing printed after is lost
        with contextlib.suppress(BlockingIOError):  # nothing new yet
            while chunk := os.read(self.proc.stdout.fileno(), 1 << 20):
                self.buffer += chunk
        *lines, self.buffer = self.buffer.split(b"\n")
        for line in lines:
            event = parse_event(line.decode(errors="replace"))
            if event and event["event"] == "first_step":
                self.outcome.first_step_at_s = time.perf_counter() - self.started
            elif event and event["event"] == "result":
                self.outcome.figures = event["figures"]
        if self.outcome.first_step_at_s is None:
            for other in others:
                label = f"{other.job.side}: {other.job.name}"
                if other is not self and label not in self.outcome.overlapped:
                    self.outcome.overlapped.append(label)
        return exited

    def finish(self, timed_out=False):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.outcome.wall_s = time.perf_counter() - self.started
        ok = self.proc.returncode == 0 and self.outcome.figures is not None
        self.outcome.status = "timed out" if timed_out else "ok" if ok else "failed"
        if not ok:
            self.log.seek(0)
            tail = [line.rstrip() for line in self.log.read().splitlines() if line.strip()]
            self.outcome.error = " | ".join(tail[-3:])[-800:]
            self.outcome.log_tail = tail[-40:]
        self.log.close()
        os.remove(self.log_path)


def write(path, document):
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(document, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)


def summary_line(o: Outcome) -> str:
    head = f"{o.job['side']:>8} {o.job['name']:<20} {o.status:<10}"
    f = o.figures or {}
    parts = []
    if f.get("first_step_s") is not None:
        parts.append(f"first step {f['first_step_s']:.1f} s")
    if f.get("train_s_per_step"):
        parts.append(
            f"{f['train_s_per_step'] * 1000:.1f} ms/step {f['train_images_per_s']:.1f} img/s"
        )
    if f.get("sample_ms_per_img"):
        parts.append(f"sample b{f['sample_batch']} {f['sample_ms_per_img']:.2f} ms/img")
    if f.get("peak_device_mb"):
        parts.append(f"GPU peak {f['peak_device_mb'] / 1024:.1f} GiB")
    if o.error:
        parts.append(o.error[-200:])
    return head + " " + ", ".join(parts)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--official", required=True, help="the original NVAE's code")
    p.add_argument("--harness", required=True, help="folder holding official_bench.py")
    p.add_argument("--torch-python", default="python3")
    p.add_argument("--tf-python", default=sys.executable)
    p.add_argument("--tf-env", help="a shell file sourced before each of ours' runs (e.g. the "
                   "CUDA 12 library paths of ../shared/gpu/README.md)")  # fmt: skip
    p.add_argument("--budget", type=float, default=540, help="seconds for the whole sitting")
    p.add_argument("--parallel", type=int, default=7, help="children at once")
    p.add_argument("--out", default=os.path.join(HERE, "results"))
    p.add_argument("--jobs", nargs="+", help="only jobs of these names (default: all)")
    p.add_argument("--xla", action="store_true", help="also ours with XLA (long compiles)")
    p.add_argument("--device", default="cuda", help=argparse.SUPPRESS)  # cpu: harness tests
    return p.parse_args(argv)


def run_jobs(jobs, outcomes, args, env, log_dir, save):
    """Run the jobs wave by wave, at most ``args.parallel`` at a time, until done or
    ``args.budget`` runs out."""
    clock = time.perf_counter
    deadline = clock() + args.budget
    stamp = lambda: f"[{args.budget - (deadline - clock()):5.0f} s]"
    pending = sorted(zip(jobs, outcomes), key=lambda pair: pair[0].wave)  # stable: keeps order
    running = []
    while pending or running:
        wave = running[0].job.wave if running else pending[0][0].wave
        while pending and pending[0][0].wave == wave and len(running) < args.parallel:
            job, outcome = pending.pop(0)
            if deadline - clock() < 60:  # too late to build a model and time it
                outcome.status = "not started"
                continue
            running.append(Running(job, outcome, env, log_dir))
            print(f"{stamp()} start {job.side}: {job.name}", flush=True)
        for child in list(running):
            out_of_time = clock() > min(deadline, child.started + child.job.timeout_s)
            if child.poll(running) or out_of_time:
                child.finish(timed_out=out_of_time and child.proc.poll() is None)
                running.remove(child)
                print(f"{stamp()} {summary_line(child.outcome)}", flush=True)
                save()
        time.sleep(0.2)


def main(argv=None) -> int:
    args = parse_args(argv)
    for required in (
        os.path.join(args.official, "model.py"),
        os.path.join(args.harness, "official_bench.py"),
    ):
        if not os.path.isfile(required):  # every run of the original would fail on it
            print(f"gpu_sitting: no {required}", file=sys.stderr)
            return 2
    os.makedirs(args.out, exist_ok=True)
    started = datetime.datetime.now()
    path = os.path.join(args.out, f"gpu-sitting-{started:%Y%m%d-%H%M%S}.json")
    log_dir = tempfile.mkdtemp(prefix="gpu-sitting-")  # children's stderr, kept in the results
    jobs = [*(XLA_JOBS if args.xla else ()), *JOBS]
    jobs = [j for j in jobs if not args.jobs or j.name in args.jobs]
    outcomes = [Outcome(asdict(j), command_for(j, args)) for j in jobs]
    env = dict(os.environ, TF_FORCE_GPU_ALLOW_GROWTH="true", PYTHONUNBUFFERED="1",
               BENCH_DEVICE_LOCK=os.path.join(log_dir, "device.lock"))  # fmt: skip
    document = {"date": started.isoformat(timespec="seconds"), "host": platform.node(),
                "cpus": os.cpu_count(), "command": " ".join(sys.argv)}  # fmt: skip

    def save():
        write(path, {**document, "outcomes": [asdict(o) for o in outcomes]})

    run_jobs(jobs, outcomes, args, env, log_dir, save)
    save()
    print("\n".join(summary_line(o) for o in outcomes))
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
