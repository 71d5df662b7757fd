"""nvae-tf and the original PyTorch NVAE side by side, in one sitting (issue 13).

For each configuration the two sides alternate, original then ours, ``--repeats`` times
(A B A B), each run a fresh child process so that its start-up and memory are its own. Each
run reports start-up (this process's launch of the child -> the child's first training step
done, imports and model build included), train s/step and images/s (median of the timed steps
after warm-up), sampling ms/img, importance-weighted evaluation images/s and the child's peak
RSS (ru_maxrss); bench_protocol.py says in which order and how often. One JSON file per
sitting goes to ``--out``: date, host, commit, versions, the command line, every run, medians
and ratios. ``--table RESULTS.json`` regenerates README.md's performance table from one.

    python benchmarks/side_by_side.py --configs mnist cifar10-cpu \\
        --official ../shared/reference/nvae-official --torch-python /path/to/torch-venv/bin/python
    python benchmarks/side_by_side.py --configs cifar10 --only startup --official ...
    python benchmarks/side_by_side.py --configs mnist --precision bfloat16 --official ...
    python benchmarks/side_by_side.py --table benchmarks/results/side-by-side-*.json

``--precision bfloat16`` runs both sides in bfloat16 (ours ``mixed_bfloat16``, the original under
PyTorch's CPU bfloat16 autocast); its sittings carry no targets, issue 13's being float32 ones.
Without ``--official`` only ours runs. Nothing is written unless every run succeeds.
"""

import argparse
import datetime
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict

from bench_protocol import add_child_args, check_counts, child_args, parse_event
from bench_results import ORIGINAL, OURS, RunRecord, summarize
from bench_setups import SETUPS, Setup
from perf_table import TableError, render, update_readme

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
DEFAULT_CONFIGS = ["mnist", "cifar10-cpu"]
PRECISIONS = ("float32", "bfloat16")  # both sides: see the module docstring
GRAPH_CACHE_VAR = "NVAE_TF_GRAPH_CACHE"  # nvae_tf.graph_cache.ENV_VAR (not imported: no TF here)


class BenchError(Exception):
    """Bad input, reported as one line (exit status 2)."""


class ChildFailed(BenchError):
    """A child run failed, reported as one line (exit status 1)."""


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--configs", nargs="+", choices=sorted(SETUPS), default=DEFAULT_CONFIGS)
    p.add_argument("--repeats", type=int, default=2, help="runs per side and configuration")
    p.add_argument("--batch", type=int, help="training batch (default: the configuration's)")
    p.add_argument("--precision", choices=PRECISIONS, default="float32", help="on both sides")
    p.add_argument("--official", metavar="PATH", help="the original NVAE's code: time it too")
    p.add_argument(
        "--harness",
        metavar="DIR",
        help="folder with official_bench.py (default: bench/ two levels above --official)",
    )
    p.add_argument(
        "--torch-python", default="python", help="a Python that imports torch (default: python)"
    )
    p.add_argument("--out", default=os.path.join(HERE, "results"), help="results folder")
    p.add_argument("--timeout", type=float, default=3600, help="seconds allowed per child run")
    p.add_argument(
        "--table",
        nargs="+",
        metavar="RESULTS.json",
        help="only regenerate README's performance table from these sittings' results",
    )
    p.add_argument("--readme", default=os.path.join(ROOT, "README.md"), help=argparse.SUPPRESS)
    # Developing the harness: ours alone on any config file (e.g. configs/small.yaml).
    p.add_argument("--config-file", help=argparse.SUPPRESS)
    add_child_args(p)
    args = p.parse_args(argv)
    check_counts(p, args)
    if args.repeats < 1:
        p.error("--repeats must be at least 1")
    if args.batch is not None and args.batch < 1:
        p.error("--batch must be at least 1")
    if args.config_file and args.official:
        p.error("--config-file times ours alone: the original has no such layout")
    return args


def check_official(args) -> str:
    """Fail with one line unless the original's code, the harness and torch are all there;
    returns torch's version."""
    official = os.path.abspath(args.official)
    if not os.path.isfile(os.path.join(official, "model.py")):
        raise BenchError(f"no original NVAE code at {args.official} (no model.py there)")
    args.harness = args.harness or os.path.join(os.path.dirname(os.path.dirname(official)), "bench")
    if not os.path.isfile(os.path.join(args.harness, "official_bench.py")):
        raise BenchError(f"no official_bench.py in {args.harness}; pass --harness DIR")
    try:
        probe = subprocess.run(
            [args.torch_python, "-c", "import torch; print(torch.__version__)"],
            capture_output=True,
            text=True,
            timeout=300,
        )
    except (OSError, subprocess.TimeoutExpired):
        probe = None
    if probe is None or probe.returncode != 0:
        raise BenchError(
            f"{args.torch_python!r} cannot import torch; pass --torch-python with a Python "
            "that has PyTorch (e.g. a virtualenv's bin/python)"
        )
    return probe.stdout.strip()


def plan(args) -> list[tuple[str, Setup]]:
    """(config name, setup) pairs to run; ``--config-file`` makes one ad-hoc setup."""
    if args.config_file:
        if not os.path.isfile(args.config_file):
            raise BenchError(f"no config file {args.config_file}")
        name = os.path.splitext(os.path.basename(args.config_file))[0]
        return [
            (name, Setup(name, os.path.abspath(args.config_file), (), args.batch or 16, "", None))
        ]
    return [(name, SETUPS[name]) for name in args.configs]


def ours_command(setup: Setup, batch: int, args) -> list[str]:
    config = os.path.join(ROOT, setup.config_file)  # an absolute config_file stays as it is
    overrides = setup.overrides
    if args.precision == "bfloat16":
        overrides = (*overrides, ("precision", "mixed_bfloat16"))
    sets = [item for key, value in overrides for item in ("--set", f"{key}={value}")]
    return [sys.executable, os.path.join(HERE, "ours_driver.py"), "--config", config, *sets,
            "--batch", str(batch), *child_args(args)]  # fmt: skip


def official_command(setup: Setup, batch: int, args) -> list[str]:
    return [args.torch_python, os.path.join(HERE, "official_driver.py"), "--nvae", args.official,
            "--harness", args.harness, "--config", setup.official, "--batch", str(batch),
            *(["--bf16"] if args.precision == "bfloat16" else []), *child_args(args)]  # fmt: skip


def run_child(
    command: list[str], timeout: float, what: str, env: dict | None = None
) -> tuple[float, float, dict]:
    """Run one child; returns (start-up s, wall s, its figures). One-line BenchError on failure."""
    with tempfile.TemporaryFile("w+") as stderr:
        start = time.perf_counter()
        proc = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=stderr, text=True, cwd=ROOT, env=env
        )
        timer = threading.Timer(timeout, proc.kill)
        timer.start()
        startup = figures = None
        try:
            for line in proc.stdout:
                event = parse_event(line)
                if event and event["event"] == "first_step":
                    startup = time.perf_counter() - start
                elif event and event["event"] == "result":
                    figures = event["figures"]
            code = proc.wait()
        finally:
            timer.cancel()
        wall = time.perf_counter() - start
        if code == 0 and startup is not None and figures is not None:
            return startup, wall, figures
        stderr.seek(0)
        tail = [line.strip() for line in stderr.read().splitlines() if line.strip()]
        why = "timed out" if wall >= timeout else f"exit status {code}"
        last = f": {tail[-1]}" if tail else ""
        raise ChildFailed(f"{what} failed ({why}){last}")


def describe(record: RunRecord) -> str:
    f = record.figures
    parts = [f"start-up {record.startup_s:.1f} s"]
    if f.get("startup_warm_s"):
        parts[0] += f" ({f['startup_warm_s']:.1f} s with the graph cache warm)"
    if f.get("train_s_per_step"):
        parts.append(f"{f['train_s_per_step']:.3f} s/step")
    if f.get("sample_ms_per_img"):
        parts.append(f"sampling {f['sample_ms_per_img']:.1f} ms/img")
    if f.get("iw_images_per_s"):
        parts.append(f"IW {f['iw_images_per_s']:.3g} img/s (K={f['iw_samples']})")
    parts.append(f"peak RSS {f['peak_rss_mb']:.0f} MB")
    return f"{record.config} {record.side} #{record.repeat}: " + ", ".join(parts)


def sitting(args, setups) -> list[RunRecord]:
    """The alternating runs. Ours start with an empty graph cache (nvae_tf.graph_cache), so
    their start-up is a first run's; one more start-up-only run after each, which finds the
    cache filled, gives the start-up of the runs after it (``startup_warm_s``)."""
    runs = []
    with tempfile.TemporaryDirectory(prefix="side-by-side-graphs-") as graphs:
        cache_env = {**os.environ, GRAPH_CACHE_VAR: graphs}
        for name, setup in setups:
            batch = args.batch or setup.batch
            sides = [(ORIGINAL, official_command)] if args.official else []
            sides.append((OURS, ours_command))
            for repeat in range(1, args.repeats + 1):
                for side, command_for in sides:
                    command = command_for(setup, batch, args)
                    what = f"{name} {side} run {repeat}"
                    env = None
                    if side == OURS:
                        empty(graphs)
                        env = cache_env
                    startup, wall, figures = run_child(command, args.timeout, what, env)
                    if side == OURS:
                        warm = [*command_for(setup, batch, args), "--only", "startup"]
                        what = f"{name} {side} run {repeat} (graph cache warm)"
                        figures["startup_warm_s"] = run_child(warm, args.timeout, what, env)[0]
                    runs.append(RunRecord(name, side, repeat, command, startup, wall, figures))
                    print(describe(runs[-1]), flush=True)
    return runs


def empty(folder: str) -> None:
    for entry in os.listdir(folder):
        shutil.rmtree(os.path.join(folder, entry), ignore_errors=True)


def git_commit() -> tuple[str | None, bool | None]:
    """This checkout's commit and whether it has uncommitted changes (None without git)."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True
        )
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=ROOT,
            capture_output=True,
            text=True,
        )
    except OSError:
        return None, None
    if head.returncode != 0:
        return None, None
    return head.stdout.strip(), bool(status.stdout.strip())


def results_document(args, runs, setups, torch_version, started) -> dict:
    commit, dirty = git_commit()
    versions = {
        side: next((r.figures["versions"] for r in runs if r.side == side), {})
        for side in (OURS, ORIGINAL)
    }
    if torch_version:
        versions[ORIGINAL].setdefault("torch", torch_version)
    batches = {name: args.batch or setup.batch for name, setup in setups}
    targets = {name: setup.startup_target_s for name, setup in setups}
    with_targets = args.precision == "float32"  # issue 13's targets are float32 ones
    return {
        "date": started.isoformat(timespec="seconds"),
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "commit": commit,
        "dirty": dirty,
        "versions": versions,
        "command": shlex.join(["python", *sys.argv]),
        "python": sys.executable,
        "precision": args.precision,
        "repeats": args.repeats,
        "runs": [asdict(r) for r in runs],
        "summary": summarize(runs, batches, targets if with_targets else {}, with_targets),
    }


def write_results(out_dir: str, document: dict, started) -> str:
    path = os.path.join(out_dir, f"side-by-side-{started:%Y%m%d-%H%M%S}.json")
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(document, f, indent=1, ensure_ascii=False)
        f.write("\n")
    os.replace(tmp, path)
    return path


def check_out_dir(out_dir: str) -> None:
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as e:
        raise BenchError(f"cannot create --out {out_dir}: {e.strerror}") from None
    if not os.access(out_dir, os.W_OK):
        raise BenchError(f"--out {out_dir} is not writable")


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        if args.table:
            print(update_readme(args.table, args.readme))
            return 0
        setups = plan(args)
        torch_version = check_official(args) if args.official else None
        check_out_dir(args.out)
        started = datetime.datetime.now()
        runs = sitting(args, setups)
        document = results_document(args, runs, setups, torch_version, started)
        path = write_results(args.out, document, started)
    except (BenchError, TableError) as e:
        print(f"side_by_side: {e}", file=sys.stderr)
        return 1 if isinstance(e, ChildFailed) else 2
    for config, entry in document["summary"].items():
        if not entry["same_batch"]:
            print(f"side_by_side: warning: {config}'s runs trained on different batches")
    print(render(document))
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
