"""An imported run directory is an ordinary run: nvae-info, nvae-sample and nvae-export take it
unchanged, and the restored model is the imported one."""

import json
import os

import numpy as np
import pytest
import tensorflow as tf
from pretrained_files import fixture_paths

from nvae_tf.pretrained import TorchCheckpoint
from nvae_tf.run_dir import restore_model
from trainers import export, import_checkpoint, info, sample

pytestmark = pytest.mark.slow  # an import, a sampling run and an export (four traced graphs)


def test_import_then_info_sample_and_export(tmp_path, capsys):
    checkpoint, reference = fixture_paths("mnist_zip")
    run = str(tmp_path / "run")
    assert import_checkpoint.main([checkpoint, "--out", run, "--verify", reference]) == 0

    model = restore_model(run)
    with TorchCheckpoint(checkpoint) as source:
        prior_ftr0 = source.array(source.content["state_dict"]["prior_ftr0"])
    np.testing.assert_array_equal(model.h.numpy(), prior_ftr0.transpose(1, 2, 0))

    capsys.readouterr()
    assert info.main(["--config", os.path.join(run, "config.yaml"), "--json"]) == 0
    layout = json.loads(capsys.readouterr().out)
    assert layout["dataset"] == "mnist" and layout["groups_per_scale"] == [1, 3]

    samples = str(tmp_path / "samples")
    assert sample.main(["--checkpoint", run, "--num", "4", "--out", samples, "--npy"]) == 0
    images = np.load(os.path.join(samples, "samples_t1.npy"))
    assert images.shape == (4, 32, 32, 1) and np.all((images >= 0) & (images <= 1))

    exported = str(tmp_path / "exported")
    assert export.main(["--checkpoint", run, "--out", exported]) == 0
    served = tf.saved_model.load(exported)
    out = served.signatures["sample"](
        num_samples=tf.constant(2), temperature=tf.constant(0.7), seed=tf.constant(0, tf.int64)
    )["images"]
    assert out.shape == (2, 32, 32, 1)


def test_fine_tuning_starts_from_the_imported_weights(tmp_path):
    from nvae_tf.config import NVAEConfig
    from nvae_tf.training.loop import train

    checkpoint, _ = fixture_paths("mnist_zip")
    run, tuned = str(tmp_path / "run"), str(tmp_path / "tuned")
    assert import_checkpoint.main([checkpoint, "--out", run]) == 0
    config = NVAEConfig.from_yaml(os.path.join(run, "config.yaml")).replace(
        dataset="bundled_mnist", batch_size=8, epochs=2, learning_rate=1e-3
    )
    train(config, tuned, steps=2, init_from=run, verbose=0)
    before, after = restore_model(run), restore_model(tuned)
    # The first step has learning rate 0 (warm-up); the second moves the weights a little,
    # a fresh initialization would be far away.
    assert 0 < np.max(np.abs(after.h.numpy() - before.h.numpy())) < 0.05
