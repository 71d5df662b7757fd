"""Sampling: nvae-sample grids, temperatures, BN re-adjustment and its store, fixed-top grids."""

import os

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image
from support import tiny_config
from tiny_runs import Run

from nvae_tf.inference import bn_readjust, sampling
from nvae_tf.inference.image_grid import grid
from nvae_tf.run_dir import latest_checkpoint, restore_model
from trainers import sample as sample_cli


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return Run(tmp_path_factory.mktemp("sample") / "run", tiny_config())


# ----------------------------------------------------------------------------- CLI


def test_sample_cli_grid_size_seed_and_library_agreement(run, tmp_path):
    digit = tmp_path / "digit.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (28, 28), np.uint8)).save(digit)
    outs = [tmp_path / name for name in ("a", "b", "c")]
    for out, seed in zip(outs, (3, 3, 4)):
        argv = [
            "--checkpoint",
            run.dir,
            "--num",
            "6",
            "--columns",
            "3",
            "--temperature",
            "0.7",
            "--seed",
            str(seed),
            "--out",
            str(out),
            "--npy",
        ]
        if out.name == "a":
            argv += ["--reconstruct", str(digit)]
        assert sample_cli.main(argv) == 0
    png = Image.open(outs[0] / "samples_t0.7.png")
    assert png.size == (3 * 34 + 2, 2 * 34 + 2) and png.mode == "L"
    same = [np.asarray(Image.open(out / "samples_t0.7.png")) for out in outs[:2]]
    np.testing.assert_array_equal(*same)
    images = [np.load(out / "samples_t0.7.npy") for out in outs]
    np.testing.assert_array_equal(images[0], images[1])
    assert not np.array_equal(images[0], images[2])
    model = restore_model(run.dir)
    np.testing.assert_allclose(images[0], sampling.generate(model, 6, 0.7, seed=3), atol=1e-6)
    np.testing.assert_allclose(images[0], model.sample(6, 0.7, seed=3), atol=1e-6)
    # Reconstructions: a row of inputs, then a row of their reconstructions.
    recon = np.load(outs[0] / "reconstructions.npy")
    assert recon.shape == (2, 3, 32, 32, 1)
    inputs = sample_cli.load_images([str(digit)], run.config, 3)
    np.testing.assert_array_equal(recon[0, 0], inputs[0])
    np.testing.assert_allclose(recon[1, 0], model.reconstruct(inputs, seed=3)[0], atol=1e-6)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--temperature", "0"], "argument --temperature: must be a number > 0"),
        (["--temperature", "-1"], "argument --temperature: must be a number > 0"),
        (["--temperature", "inf"], "argument --temperature: must be a number > 0"),
        (["--decoder-temperature", "0"], "argument --decoder-temperature: must be a number > 0"),
        (["--fix-top-scales", "3"], "--fix-top-scales takes 0..2"),
        (["--num", "0"], "argument --num: must be >= 1"),
        (["--reconstruct", "/nonexistent.png"], "cannot read image"),
    ],
)
def test_sample_cli_user_errors_are_one_line(run, capsys, argv, message):
    assert sample_cli.main(["--checkpoint", run.dir] + argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_grid_layout():
    images = np.zeros((5, 4, 6, 3), np.float32)
    images[1] = 1.0
    pixels = grid(images, columns=2, padding=1)
    assert pixels.shape == (3 * 5 + 1, 2 * 7 + 1, 3)
    assert (pixels[1:5, 8:14] == 255).all() and (pixels[1:5, 1:7] == 0).all()


# ----------------------------------------------------------------------------- temperatures


def test_decoder_temperature_shrinks_the_pixel_spread(colour_model):
    decoders = {
        t: colour_model.prior_output_distribution(4, 1.0, t, seed=1) for t in (1.0, 0.5, 0.1)
    }
    spread = {
        t: float(tf.reduce_mean(tf.math.reduce_std(d.sample(64, seed=[2, 0]), axis=0)))
        for t, d in decoders.items()
    }
    # Multiplying the noise by T: less spread at lower T (the original's division: more).
    assert spread[1.0] > spread[0.5] > spread[0.1] > 0
    assert spread[0.1] < 0.5 * spread[1.0]


def test_latent_temperature_scales_the_top_prior(run):
    prior = run.model.groups[0].prior(tf.zeros([1, 4, 4, 8]), temperature=0.6)
    np.testing.assert_allclose(prior.stddev(), 1.01 * 0.6, rtol=1e-6)


def test_non_finite_samples_are_reported():
    images = np.zeros((3, 4, 4, 1), np.float32)
    images[1, 0, 0, 0] = np.nan
    with pytest.raises(sampling.NonFiniteSamplesError, match="1 of 3 samples"):
        sampling.check_finite(images, "samples")


# ----------------------------------------------------------------------------- BN re-adjustment


def _stats(layers):
    return [np.concatenate([l.moving_mean.numpy(), l.moving_variance.numpy()]) for l in layers]


def test_bn_readjust_updates_decoder_stats_stores_and_reuses_them(tmp_path, monkeypatch):
    run = Run(tmp_path / "run", tiny_config())
    model = restore_model(run.dir)
    decoder_layers = bn_readjust.decoder_batchnorm_layers(model)
    encoder_layers = [l for l in model.batchnorm_layers() if l not in decoder_layers]
    assert decoder_layers and encoder_layers
    before_dec, before_enc = _stats(decoder_layers), _stats(encoder_layers)

    reused = bn_readjust.load_or_readjust(
        model, run.dir, 0.6, latest_checkpoint(run.dir), num_passes=3, batch_size=4
    )
    assert not reused
    after = _stats(decoder_layers)
    assert all(not np.allclose(a, b) for a, b in zip(after, before_dec))
    assert all(np.array_equal(a, b) for a, b in zip(_stats(encoder_layers), before_enc))
    store = bn_readjust.store_path(run.dir, 0.6)
    mtimes = {f: os.stat(os.path.join(store, f)).st_mtime_ns for f in os.listdir(store)}

    # A fresh model gets the stored statistics without recomputing them.
    def must_not_run(*args, **kwargs):
        raise AssertionError("BN statistics were recomputed")

    monkeypatch.setattr(bn_readjust, "readjust_batchnorm", must_not_run)
    fresh = restore_model(run.dir)
    assert bn_readjust.load_or_readjust(
        fresh, run.dir, 0.6, latest_checkpoint(run.dir), num_passes=3, batch_size=4
    )
    for a, b in zip(_stats(bn_readjust.decoder_batchnorm_layers(fresh)), after):
        np.testing.assert_array_equal(a, b)
    assert mtimes == {f: os.stat(os.path.join(store, f)).st_mtime_ns for f in os.listdir(store)}
    with pytest.raises(AssertionError, match="recomputed"):  # another temperature: its own
        bn_readjust.load_or_readjust(fresh, run.dir, 0.8, latest_checkpoint(run.dir), 3, 4)
    monkeypatch.undo()

    # A newer checkpoint makes the stored statistics stale.
    run.save()
    newer = restore_model(run.dir)
    assert not bn_readjust.load_or_readjust(
        newer, run.dir, 0.6, latest_checkpoint(run.dir), num_passes=3, batch_size=4
    )


def test_bn_readjust_with_nan_outputs_fails_clearly_and_keeps_the_stats(run):
    model = restore_model(run.dir)
    layers = bn_readjust.decoder_batchnorm_layers(model)
    before = _stats(layers)
    model.h.assign(tf.fill(model.h.shape, np.nan))
    with pytest.raises(sampling.NonFiniteSamplesError, match="issue #36"):
        bn_readjust.readjust_batchnorm(model, 0.6, num_passes=2, batch_size=2)
    for a, b in zip(_stats(layers), before):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(sampling.NonFiniteSamplesError):
        sampling.generate(model, 2, 0.6, seed=0)


# ----------------------------------------------------------------------------- fixed top scales


def test_fixed_top_grid_rows_share_the_top_scale_latents(run):
    model = run.model
    top_groups = model.config.groups_per_scale[0]
    states = {}  # group index -> decoder states after that group, one per call (column)
    originals = {}
    for group in model.groups:
        originals[group] = group.sample

        def spy(s, seed, temperature=1.0, group=group):
            out = originals[group](s, seed, temperature)
            states.setdefault(group.index, []).append(out.numpy())
            return out

        group.sample = spy
    tf.config.run_functions_eagerly(True)
    try:
        pictures = sampling.fixed_top_grid(model, 3, 4, 1, temperature=0.8, seed=5)
    finally:
        tf.config.run_functions_eagerly(False)
        for group in model.groups:
            del group.sample
    assert pictures.shape == (3, 4, 32, 32, 1)
    last_top = states[top_groups - 1]  # after the last group of the top scale
    assert len(last_top) == 4
    for column in last_top[1:]:
        np.testing.assert_array_equal(column, last_top[0])  # rows share their top-scale z
    assert not np.allclose(last_top[0][0], last_top[0][1])  # but differ between rows
    lower = states[top_groups]
    assert not np.allclose(lower[0], lower[1])  # the next scale is resampled per column


def test_fixed_top_grid_extremes(run):
    everything = sampling.fixed_top_grid(run.model, 2, 3, 2, seed=1)
    for column in range(1, 3):
        np.testing.assert_array_equal(everything[:, column], everything[:, 0])
    nothing = sampling.fixed_top_grid(run.model, 2, 3, 0, seed=1)
    assert not np.allclose(nothing[:, 1], nothing[:, 0])
    with pytest.raises(ValueError, match="between 0 and 2"):
        sampling.fixed_top_grid(run.model, 2, 3, 3)
