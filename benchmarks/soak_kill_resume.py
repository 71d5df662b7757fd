"""Soak test of kill -9 + ``--resume``: a run killed N times ends exactly as an uninterrupted one.

    python benchmarks/soak_kill_resume.py --kills 10 [--steps 60] [--seed 0]

A small run (``configs/small.yaml`` shrunk to seconds per step, checkpointing every step so
that kills often land inside a checkpoint write) is started with ``--resume`` (which also
starts a run that does not exist yet) and killed with SIGKILL N times: odd-numbered kills as
soon as a ``ckpt-N_temp`` folder appears (a save in progress), the others at a random moment
after the run made progress; each kill is followed by a fresh ``--resume``. The same run is
also trained without interruption. Passing means: every restart resumed (or started) cleanly,
and the final metrics row and every tensor of the final checkpoint equal the uninterrupted
run's bit for bit. The result is printed and written to ``benchmarks/results/soak.json``.
Not a unit test: it takes minutes (about 11 process starts).
"""

import argparse
import csv
import datetime
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))
from support import SMALL_SHRUNK  # noqa: E402  (the test suite's shrunk small.yaml)

SHRUNK = [*SMALL_SHRUNK, "batch_size=100", "epochs=2"]
# As tests/test_resume.py: op determinism, and grappler's arithmetic rewrite off (it regroups
# gradient sums differently from one process to the next).
MAIN = (
    "import sys, tensorflow as tf; tf.config.experimental.enable_op_determinism(); "
    "tf.config.optimizer.set_experimental_options({'arithmetic_optimization': False}); "
    "from trainers.train import main; sys.exit(main(sys.argv[1:]))"
)


def command(out, steps):
    args = [sys.executable, "-c", MAIN, "--config", os.path.join(ROOT, "configs", "small.yaml")]
    for item in SHRUNK:
        args += ["--set", item]
    return args + [
        "--out",
        out,
        "--resume",
        "--steps",
        str(steps),
        "--checkpoint-every",
        "1",
        "--log-every",
        "1",
        "--progress",
        "0",
    ]


def env():
    return {**os.environ, "PYTHONPATH": ROOT}


def checkpoint_numbers(out):
    folder = os.path.join(out, "checkpoints")
    if not os.path.isdir(folder):
        return [], []
    names = os.listdir(folder)
    done = sorted(int(n[5:-6]) for n in names if n.startswith("ckpt-") and n.endswith(".index"))
    return done, [n for n in names if n.endswith("_temp")]


def kill_once(out, steps, during_write, rng, deadline_s=600):
    """Start the run, kill -9 it; returns a record of what was happening."""
    start_saved = (checkpoint_numbers(out)[0] or [0])[-1]
    proc = subprocess.Popen(
        command(out, steps), cwd=ROOT, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    started = time.time()
    target = rng.randint(1, 6)  # steps of progress before a random-moment kill
    temp_seen = False
    while proc.poll() is None and time.time() - started < deadline_s:
        done, temps = checkpoint_numbers(out)
        newest = done[-1] if done else 0
        if during_write and temps and newest > start_saved:
            temp_seen = True
            break
        if not during_write and newest >= start_saved + target:
            time.sleep(rng.uniform(0.0, 0.3))
            break
        time.sleep(0.0005 if during_write else 0.01)
    finished = proc.poll() is not None
    if not finished:
        proc.send_signal(signal.SIGKILL)
    proc.wait()
    stderr = proc.stderr.read().decode(errors="replace")
    done, temps = checkpoint_numbers(out)
    return {
        "seconds": round(time.time() - started, 1),
        "killed": not finished,
        "exit": proc.returncode,
        "kind": "during a checkpoint write" if during_write else "random moment",
        "temp_folder_seen_before_kill": temp_seen,
        "temp_folder_left_after_kill": bool(temps),
        "newest_checkpoint_after": done[-1] if done else None,
        "stderr_tail": stderr.strip().splitlines()[-3:],
    }


def final_state(out):
    import tensorflow as tf

    with open(os.path.join(out, "metrics.csv"), newline="") as f:
        rows = [{k: v for k, v in r.items() if k != "wall_time"} for r in csv.DictReader(f)]
    path = tf.train.latest_checkpoint(os.path.join(out, "checkpoints"))
    reader = tf.train.load_checkpoint(path)
    tensors = {
        name: reader.get_tensor(name)
        for name, dtype in reader.get_variable_to_dtype_map().items()
        if dtype != tf.variant and name != "save_counter/.ATTRIBUTES/VARIABLE_VALUE"
    }
    return rows, os.path.basename(path), tensors


def main():
    import numpy as np

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kills", type=int, default=10)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--keep", action="store_true", help="keep the run folders")
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "soak.json"))
    args = p.parse_args()
    rng = random.Random(args.seed)
    work = tempfile.mkdtemp(prefix="nvae-soak-")
    killed, whole = os.path.join(work, "killed"), os.path.join(work, "whole")
    began = time.time()
    records = []
    for i in range(args.kills):
        record = kill_once(killed, args.steps, during_write=i % 2 == 0, rng=rng)
        records.append(record)
        print(f"kill {i + 1}: {json.dumps(record)}", flush=True)
    final = subprocess.run(command(killed, args.steps), cwd=ROOT, env=env(), capture_output=True)
    reference = subprocess.run(command(whole, args.steps), cwd=ROOT, env=env(), capture_output=True)
    rows_k, ckpt_k, tensors_k = final_state(killed)
    rows_w, ckpt_w, tensors_w = final_state(whole)
    differing = sorted(
        name
        for name in tensors_w
        if name not in tensors_k or not np.array_equal(tensors_k[name], tensors_w[name])
    )
    kills = sum(r["killed"] for r in records)
    in_write = sum(r["killed"] and r["temp_folder_seen_before_kill"] for r in records)
    result = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": "python benchmarks/soak_kill_resume.py " + " ".join(sys.argv[1:]),
        "config": "configs/small.yaml with --set " + " ".join(SHRUNK),
        "steps": args.steps,
        "kills_requested": args.kills,
        "kills_done": kills,
        "kills_during_checkpoint_write": in_write,
        "final_resume_exit": final.returncode,
        "uninterrupted_exit": reference.returncode,
        "final_checkpoint": [ckpt_k, ckpt_w],
        "final_row_killed": rows_k[-1] if rows_k else None,
        "final_row_uninterrupted": rows_w[-1] if rows_w else None,
        "metric_rows_equal": rows_k == rows_w,
        "tensors_compared": len(tensors_w),
        "tensors_differing": differing[:20],
        "minutes": round((time.time() - began) / 60, 1),
        "kills": records,
    }
    result["passed"] = bool(
        kills == args.kills
        and final.returncode == 0
        and reference.returncode == 0
        and ckpt_k == ckpt_w
        and result["metric_rows_equal"]
        and not differing
    )
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(
        f"{'PASSED' if result['passed'] else 'FAILED'}: {kills}/{args.kills} kills "
        f"({in_write} during a checkpoint write), final {ckpt_k} vs {ckpt_w}, final loss "
        f"{(rows_k[-1] if rows_k else {}).get('loss')} vs {(rows_w[-1] if rows_w else {}).get('loss')}, "
        f"metrics rows equal: {result['metric_rows_equal']}, {len(differing)} of "
        f"{len(tensors_w)} tensors differ; {result['minutes']} min -> {args.out}"
    )
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
