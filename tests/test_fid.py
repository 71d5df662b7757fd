"""FID: the Fréchet distance against closed forms, streaming statistics, the reference cache
(reuse and invalidation), the Inception network's identity and ``nvae-fid`` end to end."""

import json
import os

import numpy as np
import pytest
from PIL import Image
from support import tiny_config
from tiny_runs import Run

from nvae_tf.inference import fid
from trainers import fid as fid_cli


def _gaussian(mean, covariance):
    return fid.FeatureStatistics(np.asarray(mean, float), np.asarray(covariance, float), 100)


def test_frechet_distance_of_diagonal_gaussians_is_the_closed_form():
    rng = np.random.default_rng(0)
    mu_a, mu_b = rng.normal(size=6), rng.normal(size=6)
    var_a, var_b = rng.uniform(0.1, 3.0, 6), rng.uniform(0.1, 3.0, 6)
    expected = np.sum((mu_a - mu_b) ** 2) + np.sum((np.sqrt(var_a) - np.sqrt(var_b)) ** 2)
    got = fid.frechet_distance(_gaussian(mu_a, np.diag(var_a)), _gaussian(mu_b, np.diag(var_b)))
    assert got == pytest.approx(expected, rel=1e-12)


def test_frechet_distance_of_non_commuting_2d_gaussians_is_the_closed_form():
    # For a 2x2 M with non-negative eigenvalues, tr sqrt(M) = sqrt(tr M + 2 sqrt(det M)).
    cov_a = np.array([[2.0, 0.9], [0.9, 1.0]])
    cov_b = np.array([[0.5, -0.3], [-0.3, 1.5]])
    product = cov_a @ cov_b
    assert not np.allclose(product, product.T)  # the covariances do not commute
    trace_root = np.sqrt(np.trace(product) + 2 * np.sqrt(np.linalg.det(product)))
    mu_a, mu_b = np.array([1.0, -2.0]), np.array([0.5, 0.5])
    expected = np.sum((mu_a - mu_b) ** 2) + np.trace(cov_a + cov_b) - 2 * trace_root
    got = fid.frechet_distance(_gaussian(mu_a, cov_a), _gaussian(mu_b, cov_b))
    assert got == pytest.approx(expected, rel=1e-12)


def test_frechet_distance_agrees_with_scipy_sqrtm_on_full_rank_covariances():
    scipy_linalg = pytest.importorskip("scipy.linalg")
    rng = np.random.default_rng(1)
    a, b = (
        fid.FeatureStatistics.from_features(rng.normal(size=(200, 16)) @ rng.normal(size=(16, 16)))
        for _ in range(2)
    )
    root = scipy_linalg.sqrtm(a.covariance @ b.covariance).real
    diff = a.mean - b.mean
    expected = diff @ diff + np.trace(a.covariance + b.covariance - 2 * root)
    assert fid.frechet_distance(a, b) == pytest.approx(expected, rel=1e-9)


def test_a_set_against_itself_is_zero_even_with_fewer_images_than_dimensions():
    features = np.random.default_rng(2).normal(size=(10, 64))  # rank-deficient covariance
    stats = fid.FeatureStatistics.from_features(features)
    scale = np.trace(stats.covariance)
    assert abs(fid.frechet_distance(stats, stats)) < 1e-9 * scale
    other = fid.FeatureStatistics.from_features(features + 1.0)
    assert fid.frechet_distance(stats, other) == pytest.approx(64.0, rel=1e-9)  # mean shift only


def test_streamed_statistics_equal_numpy_mean_and_covariance():
    features = np.random.default_rng(3).normal(size=(37, 5))
    accumulator = fid.FeatureAccumulator()
    for chunk in np.array_split(features, 4):
        accumulator.add(chunk.astype(np.float32))
    stats = accumulator.result()
    np.testing.assert_allclose(stats.mean, features.astype(np.float32).mean(0), rtol=1e-6)
    np.testing.assert_allclose(
        stats.covariance, np.cov(features.astype(np.float32), rowvar=False), atol=1e-6
    )
    assert stats.count == 37 and stats.mean.dtype == np.float64
    with pytest.raises(fid.FIDError, match="at least 2"):
        fid.FeatureStatistics.from_features(features[:1])


class FakeExtractor:
    """Mean colour per image as features: exercises the cache without Inception."""

    def __init__(self, weights_sha256="a" * 64, input_size=8):
        self.weights_sha256, self.input_size, self.calls = weights_sha256, input_size, 0

    @property
    def identity(self):
        return {"weights_sha256": self.weights_sha256, "input_size": self.input_size}

    def __call__(self, images):
        self.calls += 1
        return np.asarray(images, np.float64).mean(axis=(1, 2))


def _write_pngs(folder, count, seed=0, size=12):
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    for i in range(count):
        pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(os.path.join(folder, f"{i:02d}.png"))


def test_reference_statistics_are_cached_and_recomputed_when_anything_changes(tmp_path):
    folder = str(tmp_path / "images")
    _write_pngs(folder, 6)
    cache = fid.StatisticsCache(str(tmp_path / "cache"))
    extractor = FakeExtractor()

    first = fid.reference_statistics(fid.folder_reference(folder), extractor, cache)
    assert not first.reused and os.path.isfile(first.path) and first.statistics.count == 6
    again = fid.reference_statistics(fid.folder_reference(folder), extractor, cache)
    assert again.reused and again.path == first.path and extractor.calls == 1
    np.testing.assert_array_equal(again.statistics.covariance, first.statistics.covariance)

    def recomputed(reference, network):
        calls = network.calls
        result = fid.reference_statistics(reference, network, cache)
        assert not result.reused and result.path != first.path
        assert network.calls > calls
        return result

    recomputed(fid.folder_reference(folder, num_images=4), extractor)  # size
    recomputed(fid.folder_reference(folder), FakeExtractor(weights_sha256="b" * 64))  # weights
    recomputed(fid.folder_reference(folder), FakeExtractor(input_size=9))  # network input
    _write_pngs(folder, 7, seed=1)  # the folder changes: new content and one more file
    changed = recomputed(fid.folder_reference(folder), extractor)
    assert changed.statistics.count == 7
    assert fid.reference_statistics(fid.folder_reference(folder), extractor, cache).reused

    with open(changed.path, "wb") as f:  # a damaged cache file is recomputed, not trusted
        f.write(b"not an npz")
    assert not fid.reference_statistics(fid.folder_reference(folder), extractor, cache).reused


def test_bad_reference_folders_and_weights_are_one_line_errors(tmp_path):
    with pytest.raises(fid.FIDError, match="does not exist"):
        fid.folder_reference(str(tmp_path / "missing"))
    folder = tmp_path / "mixed"
    _write_pngs(str(folder), 3)
    (folder / "notes.txt").write_text("hello")
    with pytest.raises(fid.FIDError, match=r"notes\.txt is not readable"):
        fid.folder_reference(str(folder))
    with pytest.raises(fid.FIDError, match="no such file"):
        fid.InceptionFeatures(str(tmp_path / "missing.weights.h5"))
    with pytest.raises(fid.FIDError, match=">= 75"):
        fid.InceptionFeatures("random", input_size=32)
    broken = tmp_path / "broken.weights.h5"
    broken.write_bytes(b"not hdf5")
    with pytest.raises(fid.FIDError, match="cannot load the Inception weights") as error:
        fid.InceptionFeatures(str(broken), input_size=75)
    assert "\n" not in str(error.value)


@pytest.mark.slow
def test_inception_features_identify_their_weights(tmp_path):
    network = fid.InceptionFeatures("random", input_size=75, seed=0)
    images = np.random.default_rng(4).random((3, 16, 16, 1)).astype(np.float32)
    features = network(images)
    assert features.shape == (3, fid.FEATURE_DIM) and features.dtype == np.float64
    path = str(tmp_path / "inception.weights.h5")
    network.network.save_weights(path)
    loaded = fid.InceptionFeatures(path, input_size=75)
    assert loaded.weights_sha256 == network.weights_sha256 and path in loaded.description
    np.testing.assert_allclose(loaded(images), features, rtol=1e-5, atol=1e-6)
    other = fid.InceptionFeatures("random", input_size=75, seed=1)
    assert other.weights_sha256 != network.weights_sha256


def _cli_args(run, tmp_path):
    return [
        "--checkpoint", run.dir, "--num-samples", "6", "--batch-size", "4",
        "--inception-weights", "random", "--inception-size", "75",
        "--cache-dir", str(tmp_path / "cache"),
    ]  # fmt: skip


@pytest.mark.slow
def test_nvae_fid_end_to_end_on_a_tiny_run(tmp_path, capsys):
    run = Run(tmp_path / "run", tiny_config())
    common = [*_cli_args(run, tmp_path), "--num-reference", "5"]

    def fid_of(*extra):
        out = str(tmp_path / "fid.json")
        assert fid_cli.main([*common, *extra, "--json", out]) == 0, capsys.readouterr().err
        with open(out) as f:
            return json.load(f)

    first = fid_of()
    assert np.isfinite(first["fid"]) and first["fid"] > 0
    assert first["num_samples"] == 6 and first["num_reference"] == 5
    assert not first["reference_reused"] and os.path.isfile(first["reference_cache"])
    assert "InceptionV3" in first["network"] and "random" in first["network"]
    assert first["reference"] == "bundled_mnist train split"
    printed = capsys.readouterr()
    assert f"FID {first['fid']:.6g}:" in printed.out and "not comparable" in printed.out
    assert "5/5 images" in printed.err and "6/6 images" in printed.err  # progress bars

    # As the original: --temperature only for BN re-adjustment, samples at temperature 1, so
    # the same samples (seed 0) as the first call, scored against the cached reference.
    second = fid_of("--original-temperature", "--temperature", "0.5")
    assert second["reference_reused"] and second["reference_cache"] == first["reference_cache"]
    assert second["temperature"] == 1.0
    assert second["fid"] == pytest.approx(first["fid"], rel=1e-9)


def test_dataset_reference_images_and_keys(tmp_path):
    config = tiny_config()
    train, test = (
        fid.dataset_reference(config, split, 3, batch_size=2) for split in ("train", "test")
    )
    assert train.key != test.key and train.count == 3
    batches = list(train.batches(75))
    assert [len(b) for b in batches] == [2, 1] and batches[0].shape[1:] == (32, 32, 1)
    pixels = np.concatenate(batches)
    assert pixels.min() >= 0.0 and pixels.max() <= 1.0
    assert len(np.unique(pixels)) > 2  # grey levels, not the binarized model input


def test_nvae_fid_refuses_bad_input_with_one_line(tmp_path, capsys):
    run = Run(tmp_path / "run", tiny_config())
    for bad, message in (
        (["--reference", str(tmp_path / "nowhere")], "does not exist"),
        (["--inception-weights", str(tmp_path / "none.h5")], "no such file"),
        (["--num-samples", "1"], "--num-samples must be >= 2"),
        (["--temperature", "0"], "--temperature: must be a number > 0"),
    ):
        assert fid_cli.main([*_cli_args(run, tmp_path), *bad]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err
