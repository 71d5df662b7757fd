"""Latent space: encode / decode / interpolate / traverse from the library, agreeing with the
posterior pass and the prior sampler, and ``nvae-sample --interpolate / --traverse``."""

import os

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image
from support import binary_images, colour_images, tiny_config
from tiny_runs import Run

from nvae_tf.inference import latent_space
from trainers import sample as sample_cli

MODELS = [("bernoulli_model", binary_images), ("colour_model", colour_images)]


@pytest.fixture(params=MODELS, ids=["bernoulli", "colour_with_flows"])
def model_and_images(request):
    name, make = request.param
    return request.getfixturevalue(name), make(3)


def test_encode_gives_every_group_top_first_and_a_deterministic_code(model_and_images):
    model, x = model_and_images
    latents = model.encode(x)
    assert len(latents) == model.config.num_groups
    for group, latent in zip(model.groups, latents):
        assert latent.mean.shape == latent.stddev.shape == latent.z.shape
        assert latent.z.shape[-1] == group.latent_channels
        assert np.all(latent.stddev.numpy() > 0)
    assert latents[0].z.shape[1] < latents[-1].z.shape[1]  # top group is the coarsest
    again = model.encode(x)
    for a, b in zip(latents, again):
        np.testing.assert_array_equal(a.z, b.z)
    if model.config.num_nf == 0:
        np.testing.assert_array_equal(latents[0].z, latents[0].mean)
    else:  # z is the post-flow latent, not the posterior mean
        assert not np.allclose(latents[-1].z, latents[-1].mean)


def test_a_sampled_encoding_is_the_posterior_pass_sample(model_and_images):
    model, x = model_and_images
    latents = model.encode(x, sample=True, seed=7)
    out = model(x, training=False, seed=7)
    for latent, mean, stddev in zip(latents, out.posterior_mean, out.posterior_stddev):
        np.testing.assert_allclose(latent.mean, mean, atol=1e-6)
        np.testing.assert_allclose(latent.stddev, stddev, atol=1e-6)
    # Decoding every sampled z reproduces the posterior pass's output distribution's mean.
    np.testing.assert_allclose(model.decode(latents), out.output_distribution.mean(), atol=1e-5)


def test_decode_with_every_group_given_is_deterministic(model_and_images):
    model, x = model_and_images
    latents = model.encode(x)
    first = model.decode(latents, temperature=0.3, seed=1)
    np.testing.assert_array_equal(first, model.decode(latents, temperature=1.0, seed=2))
    assert first.shape == x.shape
    assert np.all((first.numpy() >= 0) & (first.numpy() <= 1))


def test_groups_not_given_come_from_the_prior(model_and_images):
    model, x = model_and_images
    latents = model.encode(x)
    # With nothing given, decode walks the prior exactly as the sampler does.
    prior = model.decode([], temperature=0.7, seed=3, num_samples=4)
    expected = model.prior_output_distribution(4, 0.7, seed=3).mean()
    np.testing.assert_allclose(prior, expected, atol=1e-6)
    # Keep the top group, redraw the rest: the seed matters, and None means "redraw".
    kept_a = model.decode(latents[:1], temperature=1.0, seed=1)
    kept_b = model.decode(latents[:1], temperature=1.0, seed=2)
    assert not np.allclose(kept_a, kept_b)
    np.testing.assert_array_equal(kept_a, model.decode([latents[0], None], seed=1))
    # The prior's z, given back, decode to the same images.
    walked = latent_space.prior_latents(model, 4, 0.7, seed=3)
    np.testing.assert_allclose(model.decode(walked), prior, atol=1e-6)


def test_decode_refuses_wrong_latents_with_one_line(bernoulli_model):
    with pytest.raises(ValueError, match=r"latent group 0 takes z of shape \(batch, 8, 8, 20\)"):
        bernoulli_model.decode([tf.zeros([2, 4, 4, 20])])
    with pytest.raises(ValueError, match="has 3 latent groups, got 4"):
        bernoulli_model.decode([None] * 4, num_samples=1)
    with pytest.raises(ValueError, match="num_samples"):
        bernoulli_model.decode([])


def test_interpolation_ends_at_the_two_reconstructions(model_and_images):
    model, x = model_and_images
    ends = model.decode(model.encode(x))
    path = model.interpolate(x[0], x[1], num_steps=5)
    assert path.shape == (5, *x.shape[1:])
    np.testing.assert_allclose(path[0], ends[0], atol=1e-5)
    np.testing.assert_allclose(path[-1], ends[1], atol=1e-5)
    assert not np.allclose(path[2], path[0]) and not np.allclose(path[2], path[-1])
    batched = model.interpolate(x[:2], x[1:], num_steps=3)
    assert batched.shape == (2, 3, *x.shape[1:])
    np.testing.assert_allclose(batched[1, 0], ends[1], atol=1e-5)
    np.testing.assert_allclose(batched[1, -1], ends[2], atol=1e-5)
    # The middle point decodes the average of the two codes in every group.
    codes = [(group.z[:1] + group.z[1:2]) / 2 for group in model.encode(x[:2])]
    np.testing.assert_allclose(batched[0, 1], model.decode(codes)[0], atol=1e-5)
    with pytest.raises(ValueError, match="at least 2 steps"):
        model.interpolate(x[0], x[1], num_steps=1)


def test_traverse_varies_only_the_chosen_group(bernoulli_model):
    model = bernoulli_model
    bases = latent_space.prior_latents(model, 2, 1.0, seed=5)
    grid = latent_space.traverse(model, bases, group=2, num_values=4, seed=1).numpy()
    assert grid.shape == (2, 4, 32, 32, 1)
    np.testing.assert_allclose(grid[:, 0], model.decode(bases), atol=1e-6)
    assert not np.allclose(grid[:, 1], grid[:, 2])
    column_seed = tf.random.experimental.stateless_fold_in(model.stateless_seed(1), 1)
    redrawn = model.decode([bases[0], bases[1], None], seed=column_seed)
    np.testing.assert_allclose(grid[:, 1], redrawn, atol=1e-6)
    with pytest.raises(ValueError, match=r"group must be in 0\.\.2"):
        latent_space.traverse(model, bases, group=3)


def _digit(path, size=28, channels=1, seed=0):
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (size, size, channels), dtype=np.uint8)
    Image.fromarray(pixels[..., 0] if channels == 1 else pixels).save(path)
    return str(path)


@pytest.mark.slow  # restores and traces the model three times (~25 s)
def test_nvae_sample_interpolates_traverses_and_still_reconstructs(tmp_path, capsys):
    run = Run(tmp_path / "run", tiny_config())
    a, b = _digit(tmp_path / "a.png"), _digit(tmp_path / "b.png", seed=1)
    out = tmp_path / "out"
    args = ["--checkpoint", run.dir, "--num", "4", "--out", str(out), "--steps", "3"]
    extra = ["--interpolate", a, b, "--traverse", "1", "--reconstruct", a, "--npy"]
    assert sample_cli.main([*args, *extra]) == 0
    written = capsys.readouterr().out.split()
    assert {os.path.basename(p) for p in written} >= {
        "interpolation.png",
        "traverse_group1_t1.png",
        "reconstructions.png",
        "samples_t1.png",
    }
    strip = np.load(out / "interpolation.npy")
    assert strip.shape == (5, 32, 32, 1)  # A, three decoded points, B
    grid = np.load(out / "traverse_group1_t1.npy")
    assert grid.shape == (2, 3, 32, 32, 1)  # ceil(num / steps) rows, steps columns
    with Image.open(out / "interpolation.png") as image:
        assert image.size == (5 * 34 + 2, 36)


def test_nvae_sample_refuses_bad_images_and_groups_with_one_line(tmp_path, capsys):
    run = Run(tmp_path / "run", tiny_config())
    good = _digit(tmp_path / "good.png")
    (tmp_path / "broken.png").write_bytes(b"not a png")
    cases = [
        (["--interpolate", good, _digit(tmp_path / "big.png", size=40)], "is 40x40"),
        (["--interpolate", good, _digit(tmp_path / "rgb.png", channels=3)], "has 3 channel(s)"),
        (["--interpolate", good, str(tmp_path / "broken.png")], "cannot read image"),
        (["--reconstruct", _digit(tmp_path / "rgb2.png", channels=3)], "has 3 channel(s)"),
        (["--traverse", "3"], "--traverse takes a latent group 0..2"),
        (["--interpolate", good, good, "--steps", "1"], "--steps must be >= 2"),
    ]
    for extra, message in cases:
        argv = ["--checkpoint", run.dir, "--num", "2", "--out", str(tmp_path / "o"), *extra]
        assert sample_cli.main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err
    assert not os.path.exists(tmp_path / "o")  # nothing half-written
