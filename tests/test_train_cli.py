"""``nvae-train`` end to end on a tiny model: the run directory, bad input, the skip guard."""

import csv
import glob
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from support import ROOT, SMALL_SHRUNK
from support import SMALL_CONFIG as SMALL

from nvae_tf.config import NVAEConfig

TINY = SMALL_SHRUNK + ["batch_size=8", "epochs=2"]


def tiny_args(out, *extra):
    args = ["--config", SMALL, "--out", str(out)]
    for item in TINY:
        args += ["--set", item]
    return args + list(extra)


def run_cli(args):
    env = {**os.environ, "PYTHONPATH": ROOT, "TF_CPP_MIN_LOG_LEVEL": "3"}
    return subprocess.run(
        [sys.executable, "-m", "trainers.train", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def error_lines(stderr):
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def test_cli_smoke_run_writes_the_run_directory(tmp_path):
    out = tmp_path / "run"
    proc = run_cli(
        tiny_args(
            out,
            "--steps",
            "3",
            "--log-every",
            "1",
            "--image-every",
            "2",
            "--checkpoint-every",
            "2",
            "--progress",
            "2",
        )
    )
    assert proc.returncode == 0, proc.stderr[-3000:]

    saved = NVAEConfig.from_yaml(out / "config.yaml")
    assert saved == NVAEConfig.from_yaml(SMALL).with_overrides(TINY)

    with open(out / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [1, 2, 3]
    for row in rows:
        assert np.isfinite(float(row["loss"])) and np.isfinite(float(row["bpd"]))
        assert 0 < float(row["beta"]) <= 1 and float(row["learning_rate"]) > 0
        assert int(row["active_units"]) == sum(int(row[f"active_units_group_{g}"]) for g in (0, 1))
        assert float(row["kl_group_0"]) >= 0

    latest = tf.train.latest_checkpoint(str(out / "checkpoints"))
    assert latest is not None and latest.endswith("ckpt-3")
    names = {name.split("/")[0] for name, _ in tf.train.list_variables(latest)}
    assert {"model", "optimizer", "metrics", "data"} <= names

    events = glob.glob(str(out / "tensorboard" / "events.out.tfevents.*"))
    assert events
    tags = set()
    for event in tf.compat.v1.train.summary_iterator(events[0]):
        tags.update(value.tag for value in event.summary.value)
    assert {
        "loss",
        "bpd",
        "beta",
        "learning_rate",
        "kl_per_group/1",
        "active_units",
        "reconstructions",
        "samples/t=0.7",
        "samples/t=1",
    } <= tags

    assert "held-out ELBO on 500 test images" in proc.stdout
    assert "bits/dim" in proc.stdout


BAD_INPUTS = {
    "unknown key in the config file": (["--set", "epochs=1"], "unknown config key(s): nope"),
    "malformed --set": (["--set", "batch_size"], "--set expects key=value"),
    "wrongly typed --set": (["--set", "batch_size=many"], "'batch_size' must be int"),
    "missing data dir": (["--set", "dataset=folder", "--data", "MISSING"], "does not exist"),
    "batch larger than the data": (["--set", "batch_size=5000"], "larger than the 4500"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_one_line_exit_2_and_writes_nothing(case, tmp_path, capsys):
    from trainers.train import main

    extra, message = BAD_INPUTS[case]
    config = SMALL
    if case == "unknown key in the config file":
        config = tmp_path / "bad.yaml"
        config.write_text(Path(SMALL).read_text() + "nope: 1\n")
    extra = [str(tmp_path / "missing") if a == "MISSING" else a for a in extra]
    out = tmp_path / "run"
    assert main(["--config", str(config), "--out", str(out), *extra]) == 2
    errors = error_lines(capsys.readouterr().err)
    assert len(errors) == 1 and message in errors[0], errors
    assert not out.exists()


def test_existing_run_needs_resume_and_resume_needs_a_matching_config(tmp_path, capsys):
    from trainers.train import main

    out = tmp_path / "run"
    out.mkdir()
    NVAEConfig.from_yaml(SMALL).with_overrides(TINY).to_yaml(out / "config.yaml")
    before = sorted(os.listdir(out))

    assert main(tiny_args(out, "--steps", "1")) == 2
    assert "already holds a run: pass --resume" in capsys.readouterr().err

    assert main(tiny_args(out, "--resume", "--set", "epochs=5", "--set", "seed=3")) == 2
    errors = error_lines(capsys.readouterr().err)
    assert len(errors) == 1
    assert "epochs (run: 2, now: 5)" in errors[0] and "seed (run: 1, now: 3)" in errors[0]

    assert main(["--out", str(tmp_path / "nothing"), "--resume"]) == 2
    assert "has no config.yaml" in capsys.readouterr().err
    assert sorted(os.listdir(out)) == before


def test_skip_guard_stops_a_run_whose_every_step_is_non_finite(tmp_path, capsys, monkeypatch):
    from nvae_tf.training.objective import Objective
    from trainers.train import main

    original = Objective.__call__

    def nan_loss(self, *args, **kwargs):
        terms = original(self, *args, **kwargs)
        return terms._replace(loss=terms.loss * float("nan"))

    monkeypatch.setattr(Objective, "__call__", nan_loss)
    out = tmp_path / "run"
    code = main(
        tiny_args(
            out,
            "--steps",
            "50",
            "--set",
            "max_skipped_steps=3",
            "--checkpoint-every",
            "1",
            "--progress",
            "0",
        )
    )
    assert code == 1
    errors = error_lines(capsys.readouterr().err)
    assert len(errors) == 1
    assert "training stopped at step 3: 3 consecutive steps had a non-finite loss" in errors[0]
    # Nothing a non-finite step touched was checkpointed.
    assert tf.train.latest_checkpoint(str(out / "checkpoints")) is None
