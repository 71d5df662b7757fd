"""Long-run reliability: checkpoint verification and fallback, failed saves, unwritable output,
decode errors named, the hang watchdog, signal exit codes.

These use small stand-ins (a few variables, a two-image folder, a pure-Python watchdog), so they
run in seconds; the end-to-end paths through ``nvae-train`` are in ``test_reliability_runs.py``.
"""

import gc
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import tensorflow as tf

from nvae_tf.data import DataError, load_dataset
from nvae_tf.data.errors import data_error_from
from nvae_tf.run_dir import (
    RunDirectoryError,
    check_writable,
    intact_checkpoint,
    latest_checkpoint,
    remove_failed_start,
)
from nvae_tf.training.checkpointing import CheckpointSaveError, save
from nvae_tf.training.signals import StopOnSignal, TrainingInterrupted
from nvae_tf.training.watchdog import EXIT_HUNG, HangWatchdog

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _manager(directory, size=16):
    state = tf.train.Checkpoint(w=tf.Variable(tf.zeros([size])))
    return state, tf.train.CheckpointManager(state, str(directory), max_to_keep=3)


def _saved_run(tmp_path, steps=(1, 2)):
    """A run directory whose checkpoints hold w = step at ckpt-step."""
    state, manager = _manager(tmp_path / "checkpoints")
    for step in steps:
        state.w.assign(tf.fill([16], float(step)))
        manager.save(checkpoint_number=step)
    return state, manager


def _truncate(prefix):
    data = f"{prefix}.data-00000-of-00001"
    with open(data, "r+b") as f:
        f.truncate(os.path.getsize(data) // 2)


# --- checkpoints -------------------------------------------------------------------------------


def test_truncated_newest_checkpoint_falls_back_with_one_warning(tmp_path, capfd):
    _saved_run(tmp_path)
    newest = str(tmp_path / "checkpoints" / "ckpt-2")
    _truncate(newest)
    path = latest_checkpoint(str(tmp_path))
    assert path.endswith("ckpt-1")
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("warning: checkpoint ") and newest in err[0]
    assert "using" in err[0] and "ckpt-1" in err[0]
    restored = tf.train.Checkpoint(w=tf.Variable(tf.zeros([16])))
    restored.restore(path).assert_existing_objects_matched()
    assert float(restored.w[0]) == 1.0


def test_corrupt_bytes_are_caught_by_the_checksum(tmp_path):
    _saved_run(tmp_path)
    data = tmp_path / "checkpoints" / "ckpt-2.data-00000-of-00001"
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # same size, one flipped byte
    data.write_bytes(bytes(raw))
    assert latest_checkpoint(str(tmp_path)).endswith("ckpt-1")


def test_no_intact_checkpoint_is_one_line(tmp_path):
    _saved_run(tmp_path)
    for step in (1, 2):
        _truncate(str(tmp_path / "checkpoints" / f"ckpt-{step}"))
    with pytest.raises(RunDirectoryError) as error:
        latest_checkpoint(str(tmp_path))
    assert "no intact checkpoint" in str(error.value) and "ckpt-2" in str(error.value)
    assert "\n" not in str(error.value)


def test_resume_sets_the_unreadable_checkpoint_aside(tmp_path, capfd):
    _saved_run(tmp_path)
    _truncate(str(tmp_path / "checkpoints" / "ckpt-2"))
    path = intact_checkpoint(str(tmp_path / "checkpoints"), set_aside=True)
    assert path.endswith("ckpt-1")
    names = sorted(os.listdir(tmp_path / "checkpoints"))
    assert "ckpt-2.index.unreadable" in names and "ckpt-2.index" not in names
    assert "renamed" in capfd.readouterr().err
    assert intact_checkpoint(str(tmp_path / "checkpoints")).endswith("ckpt-1")


def test_failed_save_keeps_the_previous_checkpoint_and_removes_the_partial(tmp_path, monkeypatch):
    state, manager = _saved_run(tmp_path, steps=(1,))
    directory = tmp_path / "checkpoints"

    def full_disk(*args, **kwargs):  # what a full disk leaves: a half-written temp folder
        (directory / "ckpt-2_temp").mkdir()
        (directory / "ckpt-2_temp" / "part-00000-of-00001.data-00000-of-00001").write_bytes(b"x")
        raise tf.errors.ResourceExhaustedError(None, None, "No space left on device")

    monkeypatch.setattr(state, "_write", full_disk)
    monkeypatch.setattr(state, "write", full_disk)
    with pytest.raises(CheckpointSaveError) as error:
        save(manager, 2)
    message = str(error.value)
    assert "\n" not in message and "No space left on device" in message
    assert "ckpt-1 is kept" in message
    assert sorted(os.listdir(directory)) == [
        "checkpoint",
        "ckpt-1.data-00000-of-00001",
        "ckpt-1.index",
    ]
    assert latest_checkpoint(str(tmp_path)).endswith("ckpt-1")


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 64 KiB tmpfs (needs root; skipped elsewhere)."""
    mount = tmp_path / "small"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)],
        capture_output=True,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    yield mount
    subprocess.run(["umount", str(mount)], check=False)


def test_disk_full_at_save_on_a_real_small_filesystem(small_tmpfs):
    _state, manager = _manager(small_tmpfs / "checkpoints", size=6000)  # 24 KB per checkpoint
    manager.save(checkpoint_number=1)
    (small_tmpfs / "filler").write_bytes(b"\0" * 24 * 1024)  # room for less than another one
    with pytest.raises(CheckpointSaveError, match="ckpt-1 is kept"):
        save(manager, 2)
    left = sorted(os.listdir(small_tmpfs / "checkpoints"))
    assert not [name for name in left if "ckpt-2" in name], left
    assert intact_checkpoint(str(small_tmpfs / "checkpoints")).endswith("ckpt-1")


# --- output directories ------------------------------------------------------------------------


def test_unwritable_output_is_one_line_and_leaves_nothing(tmp_path):
    for path in ("/sys/nvae-run", "/proc/nvae-run"):
        with pytest.raises(RunDirectoryError, match="not writable") as error:
            check_writable(path)
        assert "\n" not in str(error.value)
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(RunDirectoryError, match="is not a directory"):
        check_writable(str(tmp_path / "a-file" / "run"))
    check_writable(str(tmp_path / "new" / "run"))
    assert sorted(os.listdir(tmp_path)) == ["a-file"]  # the probe left nothing


def test_failed_start_is_removed_unless_it_saved_a_checkpoint(tmp_path):
    run = tmp_path / "run"
    (run / "tensorboard").mkdir(parents=True)
    (run / "config.yaml").write_text("x: 1\n")
    (run / "metrics.csv").write_text("step\n")
    remove_failed_start(str(run), created=True)
    assert not run.exists()
    _saved_run(run, steps=(1,))
    (run / "config.yaml").write_text("x: 1\n")
    remove_failed_start(str(run), created=True)
    assert (run / "config.yaml").exists()


# --- data --------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_image_is_named_where_it_is_decoded(fmt, tmp_path):
    from support import colour_config, truncate_image
    from tiny_runs import write_colour_folder

    write_colour_folder(tmp_path, num_train=2, num_test=2, fmt=fmt)
    bad = tmp_path / "train" / f"001.{fmt.lower()}"
    truncate_image(bad)
    config = colour_config(data_dir=str(tmp_path))
    data = load_dataset(config, "train", shuffle=False, repeat=False, global_batch_size=1)
    with pytest.raises(tf.errors.OpError) as raised:
        list(data)
    error = data_error_from(raised.value, config)
    assert isinstance(error, DataError) and "\n" not in str(error)
    assert str(bad) in str(error) and "skip_bad_files" in str(error)
    skipping = config.replace(skip_bad_files=True)
    batches = list(
        load_dataset(skipping, "train", shuffle=False, repeat=False, global_batch_size=1)
    )
    assert sum(int(b.shape[0]) for b in batches) == 1


def test_folder_iterator_is_checkpointed_despite_the_python_decoder(tmp_path):
    from support import colour_config
    from tiny_runs import write_colour_folder

    write_colour_folder(tmp_path, num_train=4, num_test=4, seed=1)
    config = colour_config(data_dir=str(tmp_path))
    iterator = iter(load_dataset(config, "train", global_batch_size=1))
    next(iterator)
    prefix = tf.train.Checkpoint(data=iterator).save(str(tmp_path / "ckpt" / "it"))
    expected = [next(iterator).numpy() for _ in range(3)]
    tf.train.Checkpoint(data=iterator).restore(prefix)
    np.testing.assert_array_equal([next(iterator).numpy() for _ in range(3)], expected)


def test_a_run_stopped_by_bad_data_frees_its_data_iterator_before_exit(tmp_path, capsys):
    """``nvae-train`` stopped by a truncated image returns with its tf.data iterator already
    destroyed (the failed run leaves it in reference cycles): not at interpreter shutdown,
    where a folder iterator's destructor can wait forever for its Python decoder."""
    from support import colour_config, truncate_image
    from tiny_runs import write_colour_folder

    from trainers.train import main

    write_colour_folder(tmp_path, num_test=2)
    truncate_image(tmp_path / "train" / "003.png")
    config = tmp_path / "colour.yaml"
    colour_config(data_dir=str(tmp_path), batch_size=4, epochs=1).to_yaml(str(config))
    iterators = lambda: [o for o in gc.get_objects() if type(o).__name__ == "OwnedIterator"]
    gc.collect()
    before = len(iterators())
    gc.disable()  # only the entry point's own collection may free the cycles
    try:
        code = main(["--config", str(config), "--out", str(tmp_path / "run"), "--progress", "0"])
        left = len(iterators()) - before
    finally:
        gc.enable()
    assert code == 2 and "bad file" in capsys.readouterr().err
    assert left == 0


# --- watchdog and signals ----------------------------------------------------------------------


def test_watchdog_fires_on_an_injected_stall():
    fired = []
    dog = HangWatchdog(
        factor=5, min_seconds=0.3, warmup=2, on_hang=lambda *a: fired.append(a), poll_seconds=0.02
    )
    with dog:
        for _ in range(6):  # steps of ~10 ms: the limit is max(5 x 10 ms, 0.3 s) = 0.3 s
            dog.start_step()
            time.sleep(0.01)
            dog.end_step()
        assert dog.limit() == pytest.approx(0.3)
        dog.start_step()
        time.sleep(0.1)  # slower, but within the limit
        dog.end_step()
        assert not fired
        dog.start_step()
        deadline = time.monotonic() + 5
        while not fired and time.monotonic() < deadline:  # the stall
            time.sleep(0.02)
    assert fired and fired[0][0] > 0.3 and fired[0][1] == pytest.approx(0.3)


def test_watchdog_prints_all_stacks_and_exits_75():
    script = textwrap.dedent(
        """
        import time
        from nvae_tf.training.watchdog import HangWatchdog
        dog = HangWatchdog(factor=3, min_seconds=0.2, warmup=1, poll_seconds=0.02,
                           describe=lambda: "the newest checkpoint is ckpt-7")
        with dog:
            for _ in range(4):
                dog.start_step(); time.sleep(0.01); dog.end_step()
            dog.start_step()
            def stuck_in_a_collective():
                time.sleep(30)
            stuck_in_a_collective()
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": ROOT},
        check=False,
    )
    assert done.returncode == EXIT_HUNG == 75
    assert "stuck_in_a_collective" in done.stderr and "Thread" in done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("error: a training step has run for") and "ckpt-7" in last
    assert "--resume" in last


def test_sigterm_in_the_loop_stops_after_the_step_and_exits_143():
    with StopOnSignal() as stop:
        stop.in_loop = True
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.signal == "SIGTERM"  # recorded; the loop checkpoints and then stops
        with pytest.raises(TrainingInterrupted) as second:
            os.kill(os.getpid(), signal.SIGTERM)  # a second one aborts at once
    assert second.value.exit_code == 143
    with StopOnSignal(), pytest.raises(TrainingInterrupted) as early:
        os.kill(os.getpid(), signal.SIGINT)  # before the loop: nothing to save, stop now
    assert early.value.exit_code == 130


def test_an_unfinished_first_save_is_removed_and_an_intact_one_kept(tmp_path):
    from nvae_tf.run_dir import remove_partial_saves

    _saved_run(tmp_path, steps=(1, 2))
    directory = tmp_path / "checkpoints"
    (directory / "checkpoint").unlink()  # as if killed before the state file was written
    _truncate(str(directory / "ckpt-2"))
    remove_partial_saves(str(directory))
    assert sorted(os.listdir(directory)) == ["ckpt-1.data-00000-of-00001", "ckpt-1.index"]
    assert intact_checkpoint(str(directory)).endswith("ckpt-1")


# --- command lines -----------------------------------------------------------------------------


def test_unwritable_outputs_are_refused_before_any_work(tmp_path, capsys):
    from trainers import evaluate, export, train

    (tmp_path / "a-file").write_text("x")
    cases = [
        # --json is checked before the run directory is even read.
        (evaluate.main, ["--checkpoint", str(tmp_path / "none"), "--json", "/sys/r.json"]),
        (evaluate.main, ["--checkpoint", str(tmp_path / "none"), "--json", str(tmp_path)]),
        (export.main, ["--checkpoint", str(tmp_path / "none"), "--out", str(tmp_path / "a-file")]),
        (train.main, ["--config", os.path.join(ROOT, "configs", "small.yaml"), "--out", "/sys/r"]),
    ]
    expected = ["not writable", "is a directory", "is a file", "not writable"]
    for (main, argv), words in zip(cases, expected):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and words in err[0], err


def test_malformed_yaml_names_its_line(tmp_path):
    from nvae_tf.config import ConfigError, NVAEConfig

    path = tmp_path / "bad.yaml"
    path.write_text("batch_size: 4\nepochs: [1, 2\nseed: 1\n")
    with pytest.raises(ConfigError, match=r"not valid YAML at line 3, column 5: expected ','"):
        NVAEConfig.from_yaml(str(path))
