"""Command-line output a person can read: no TensorFlow start-up noise, no colour codes in files."""

import os
import subprocess
import sys

from support import ROOT, SMALL_CONFIG

from nvae_tf.training.callbacks import ProgressBar


def _info(*extra):
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    return subprocess.run(
        [sys.executable, "-m", "trainers.info", "--config", SMALL_CONFIG, *extra],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=300,
    )


def test_commands_print_no_tensorflow_start_up_log_unless_verbose():
    quiet = _info()
    assert quiet.returncode == 0, quiet.stderr
    assert "trainable params" in quiet.stdout
    assert quiet.stderr == ""
    loud = _info("--verbose")
    assert loud.returncode == 0 and loud.stdout == quiet.stdout
    assert "I0000" in loud.stderr or "absl" in loud.stderr  # what the quiet run hides


def test_progress_bar_writes_no_terminal_codes_into_a_file(capsys):
    bar = ProgressBar(verbose=1)
    bar.set_params({"epochs": 1, "steps": 3})
    bar.on_epoch_begin(0)
    for step in range(3):
        bar.on_train_batch_end(step, {"loss": 1.0 + step, "bpd": 0.5, "beta": 0.1})
    bar.on_epoch_end(0, {"loss": 2.0, "bpd": 0.5, "beta": 0.1})
    out = capsys.readouterr().out
    assert "3/3" in out and "loss" in out
    assert "\x1b" not in out and "\b" not in out
