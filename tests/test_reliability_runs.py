"""End-to-end reliability paths through the training loop (slow: each trains a tiny model).

* A stuck run (every step non-finite from some step on) rolls back to its newest checkpoint
  with half the learning rate and finishes; without rollbacks it stops with one line.
  Checkpoints here come from the time-based trigger alone.
* A truncated image that passes the up-front header check stops ``nvae-train`` at the batch
  that reads it with one line naming the file, and leaves nothing that blocks a rerun.
"""

import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
from support import ROOT, colour_config, tiny_config, truncate_image
from tiny_runs import write_colour_folder

from nvae_tf.training import objective as objective_module
from nvae_tf.training.loop import TrainingDiverged, train

pytestmark = pytest.mark.slow

STUCK_FROM = 5  # global step from which the poisoned objective is non-finite


@pytest.fixture
def stuck_until_rollback(monkeypatch):
    """Every step from STUCK_FROM on is non-finite while the learning rate is not lowered."""
    original = objective_module.Objective.__call__

    def poisoned(self, model, outputs, x, step):
        terms = original(self, model, outputs, x, step)
        stuck = tf.logical_and(step >= STUCK_FROM, model.optimizer.learning_rate_scale > 0.75)
        return terms._replace(loss=terms.loss + tf.where(stuck, float("nan"), 0.0))

    monkeypatch.setattr(objective_module.Objective, "__call__", poisoned)


def _config():
    return tiny_config(batch_size=32, epochs=1, max_skipped_steps=3)


def test_stuck_run_rolls_back_with_a_lower_learning_rate(tmp_path, stuck_until_rollback, capfd):
    out = str(tmp_path / "run")
    result = train(
        _config(),
        out,
        steps=12,
        verbose=0,
        checkpoint_every=1000,
        checkpoint_minutes=1e-6,  # time-based saves only: after every (finite) step
        max_rollbacks=2,
        hang_factor=0,
    )
    err = capfd.readouterr().err
    line = [line for line in err.splitlines() if "rolled back" in line]
    assert len(line) == 1, err[-2000:]
    # Steps 5, 6, 7 were skipped: the newest checkpoint was step 5's (the last finite one).
    assert "step 8: 3 consecutive non-finite steps; rolled back to ckpt-5 (step 5)" in line[0]
    assert "x0.5" in line[0] and "rollback 1 of 2" in line[0]
    assert result["step"] == 12
    reader = tf.train.load_checkpoint(os.path.join(out, "checkpoints", "ckpt-12"))
    names = {n.split("/")[-3]: n for n in reader.get_variable_to_shape_map() if "/" in n}
    assert reader.get_tensor(names["learning_rate_scale"]) == 0.5  # kept for --resume
    assert reader.get_tensor(names["rollbacks"]) == 1
    assert np.isfinite(result["test_nelbo"])


def test_stuck_run_without_rollbacks_stops_with_one_line(tmp_path, stuck_until_rollback):
    with pytest.raises(TrainingDiverged) as error:
        train(_config(), str(tmp_path / "run"), steps=12, verbose=0, hang_factor=0)
    assert "3 consecutive steps had a non-finite loss" in str(error.value)
    assert "\n" not in str(error.value)


def test_truncated_image_stops_training_with_one_line_and_a_rerunnable_out(tmp_path):
    data = tmp_path / "data"
    # PNG; a truncated JPEG is named the same way (tests/test_reliability.py).
    write_colour_folder(data, num_test=2)
    bad = data / "train" / "003.png"
    truncate_image(bad)
    config = tmp_path / "colour.yaml"
    colour_config(data_dir=str(data), batch_size=4, epochs=1).to_yaml(str(config))
    out = tmp_path / "run"
    command = [sys.executable, "-m", "trainers.train", "--config", str(config)]
    command += ["--out", str(out), "--progress", "0"]
    done = subprocess.run(
        command,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": ROOT},
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 2, done.stderr[-3000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: dataset folder: bad file "), lines
    assert str(bad) in lines[0] and "Traceback" not in done.stderr
    assert not out.exists()  # nothing left that would refuse the same command
