"""Exact resume: stop + ``--resume`` reproduces an uninterrupted run; kills never break a run."""

import csv
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf
from support import ROOT, SMALL_SHRUNK
from support import SMALL_CONFIG as SMALL

# A tiny model; batch 300 makes an epoch 15 steps, so runs cross an epoch boundary (metric
# reset, reshuffle, held-out evaluation) within a few steps.
TINY = SMALL_SHRUNK + ["batch_size=300", "epochs=3"]
# Deterministic ops are not enough on this stack: grappler's arithmetic optimizer regroups the
# AddN sums of gradient contributions differently from one process to the next (measured:
# two uninterrupted runs then differ in the last bits of early-layer kernel gradients once the
# spectral regularizer adds its share), so the runs here switch that one rewrite off.
DETERMINISTIC_MAIN = (
    "import sys, tensorflow as tf; tf.config.experimental.enable_op_determinism(); "
    "tf.config.optimizer.set_experimental_options({'arithmetic_optimization': False}); "
    "from trainers.train import main; sys.exit(main(sys.argv[1:]))"
)


def cli(out, *extra):
    args = [
        sys.executable,
        "-c",
        DETERMINISTIC_MAIN,
        "--config",
        SMALL,
        "--out",
        str(out),
        "--progress",
        "0",
    ]
    for item in TINY:
        args += ["--set", item]
    return args + list(extra)


def env():
    return {**os.environ, "PYTHONPATH": ROOT, "TF_CPP_MIN_LOG_LEVEL": "3"}


def run(args):
    proc = subprocess.run(args, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def metric_rows(out):
    with open(os.path.join(out, "metrics.csv"), newline="") as f:
        return [{k: v for k, v in row.items() if k != "wall_time"} for row in csv.DictReader(f)]


def checkpoint_values(out):
    """Latest checkpoint of a run: its path and every tensor numpy can hold (the data
    iterator's state is a variant: only its name is listed, with value None)."""
    path = tf.train.latest_checkpoint(os.path.join(out, "checkpoints"))
    reader = tf.train.load_checkpoint(path)
    names = [
        name
        for name, _ in tf.train.list_variables(path)
        if name not in ("save_counter/.ATTRIBUTES/VARIABLE_VALUE", "_CHECKPOINTABLE_OBJECT_GRAPH")
    ]
    return path, {
        name: None if name.endswith("ITERATOR_STATE") else reader.get_tensor(name) for name in names
    }


@pytest.mark.slow
def test_stop_and_resume_reproduces_the_uninterrupted_run(tmp_path):
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    flags = ["--log-every", "1", "--checkpoint-every", "100"]
    run(cli(whole, "--steps", "18", *flags))
    run(cli(parts, "--steps", "9", *flags))  # stops mid-epoch 0
    run(cli(parts, "--steps", "18", "--resume", *flags))

    rows = metric_rows(whole)
    assert [int(r["step"]) for r in rows] == list(range(1, 19))
    assert rows[14]["val_nelbo"] != ""  # step 15 ends epoch 0 and was evaluated
    # Every logged value of every step, bit for bit.
    differences = [
        (a["step"], k, a[k], b[k])
        for a, b in zip(rows, metric_rows(parts))
        for k in a
        if a[k] != b[k]
    ]
    assert not differences and len(metric_rows(parts)) == len(rows), differences[:5]

    path_whole, whole_values = checkpoint_values(whole)
    path_parts, parts_values = checkpoint_values(parts)
    assert path_whole.endswith("ckpt-18") and path_parts.endswith("ckpt-18")
    assert whole_values.keys() == parts_values.keys()
    assert "data/.ATTRIBUTES/ITERATOR_STATE" in whole_values  # the data position is saved
    for name, value in whole_values.items():
        if value is not None:
            np.testing.assert_array_equal(parts_values[name], value, err_msg=name)


def wait_for(predicate, proc, seconds=300):
    deadline = time.time() + seconds
    while not predicate():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.time() < deadline, "timed out"
        time.sleep(0.2)


def saved_step(out):
    path = tf.train.latest_checkpoint(os.path.join(out, "checkpoints"))
    return int(path.rsplit("-", 1)[1]) if path else 0


@pytest.mark.slow
def test_killed_and_signalled_runs_resume_cleanly(tmp_path):
    out = tmp_path / "run"
    flags = ["--log-every", "1", "--checkpoint-every", "1", "--steps", "40"]

    # SIGKILL while checkpointing every step: whatever was being written, the latest
    # checkpoint stays complete and loadable.
    proc = subprocess.Popen(
        cli(out, *flags),
        cwd=ROOT,
        env=env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_for(lambda: saved_step(out) >= 3, proc)
    proc.kill()
    proc.wait()
    killed_at = saved_step(out)
    checkpoint_values(out)  # every tensor of the latest checkpoint reads back
    # Leftovers of an interrupted save must not be taken for checkpoints.
    (out / "checkpoints" / "ckpt-999_temp").mkdir()
    (out / "checkpoints" / "ckpt-999.index").write_bytes(b"half-written")

    # SIGTERM: the run finishes its step, checkpoints it and exits with 143 (128 + 15).
    proc = subprocess.Popen(
        cli(out, "--resume", *flags),
        cwd=ROOT,
        env=env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_for(lambda: saved_step(out) >= killed_at + 2, proc)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 143, stderr[-3000:]
    stopped_at = saved_step(out)
    assert f"SIGTERM: stopped at step {stopped_at} and saved a checkpoint" in stderr
    assert not (out / "checkpoints" / "ckpt-999_temp").exists()
    assert not (out / "checkpoints" / "ckpt-999.index").exists()

    run(cli(out, "--resume", *flags))
    assert saved_step(out) == 40
    steps = [int(r["step"]) for r in metric_rows(out)]
    assert steps == list(range(1, 41))  # rows past a restored checkpoint were dropped once


def test_the_checkpointed_metrics_are_those_earlier_runs_saved():
    """The metric trackers' variables are part of a run's checkpointed state: a new tracker
    would make --resume refuse every run written before it."""
    from nvae_tf.model import TRAIN_METRICS

    assert TRAIN_METRICS == (
        "loss", "nelbo", "recon", "kl", "beta", "reg_weight", "spectral", "bn_penalty",
        "bpd", "grad_norm",
    )  # fmt: skip
