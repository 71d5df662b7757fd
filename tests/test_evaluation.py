"""Importance-weighted evaluation: the estimator against an exact likelihood, bpd, nvae-eval."""

import json
import math
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow as tf
from support import colour_config, tiny_config
from tiny_runs import Run, write_colour_folder

from nvae_tf.inference.evaluation import evaluate, evaluation_dataset
from nvae_tf.inference.likelihood import bits_per_dim, iw_estimate, mean_and_standard_error
from nvae_tf.run_dir import restore_model
from trainers import evaluate as eval_cli

LOG_2PI = math.log(2 * math.pi)


# ----------------------------------------------------------------------------- estimator core


class LinearGaussian:
    """z ~ N(0, I), x | z ~ N(a z + b, s^2 I): log p(x) = log N(x; b, (a^2 + s^2) I) exactly.

    q(z | x) is the true posterior with a shifted mean and an inflated scale, so the ELBO is
    strictly below log p(x) and the IW bound has room to close the gap.
    """

    a, b, s, dims = 1.5, 0.3, 0.5, 4
    mean_shift, scale_factor = 0.4, 1.6

    def sample_x(self, n, rng):
        z = rng.standard_normal((n, self.dims))
        noise = rng.standard_normal((n, self.dims))
        return (self.a * z + self.b + self.s * noise).astype(np.float32)

    def exact_log_px(self, x):
        var = self.a**2 + self.s**2
        return np.sum(-0.5 * (LOG_2PI + np.log(var) + (x - self.b) ** 2 / var), axis=-1)

    def sample_fn(self, x):
        """(log_w, elbo) of n samples per image, as the estimator wants them."""
        var = self.a**2 + self.s**2
        q_mean = self.a * (x - self.b) / var + self.mean_shift
        q_std = self.scale_factor * self.s / math.sqrt(var)

        def normal_log_prob(v, mean, std):
            return -0.5 * (LOG_2PI + 2 * tf.math.log(std) + ((v - mean) / std) ** 2)

        def fn(n, seed):
            eps = tf.random.stateless_normal(tf.concat([[n], tf.shape(x)], 0), seed=seed)
            z = q_mean + q_std * eps
            log_w = tf.reduce_sum(
                normal_log_prob(x, self.a * z + self.b, tf.constant(self.s))
                + normal_log_prob(z, 0.0, tf.constant(1.0))
                - normal_log_prob(z, q_mean, tf.constant(q_std, tf.float32)),
                axis=-1,
            )
            return log_w, log_w  # the single-sample ELBO term is log_w itself

        return fn


def test_iw_estimate_converges_to_the_exact_likelihood_from_below():
    model = LinearGaussian()
    x = model.sample_x(2000, np.random.default_rng(0))
    exact = model.exact_log_px(x)

    @tf.function
    def estimate(k):
        return iw_estimate(model.sample_fn(tf.constant(x)), k, 64, tf.constant([7, 0]))

    gaps, ses = {}, {}
    for k in (1, 10, 100, 1000):  # K = 1000 takes 16 chunks of 64, the last one masked
        log_px, elbo = (v.numpy() for v in estimate(tf.constant(k)))
        gaps[k], ses[k] = mean_and_standard_error(exact - log_px)
        elbo_gap, elbo_se = mean_and_standard_error(exact - elbo)
        assert elbo_gap > 0.5 and elbo_gap > 10 * elbo_se  # the ELBO is clearly below
        assert gaps[k] > -3 * ses[k]  # never above the exact value in expectation
    assert gaps[1] > gaps[10] > gaps[100] > gaps[1000]
    assert gaps[1000] < 0.03 * gaps[1]
    assert abs(gaps[1000]) < 0.05


@pytest.mark.parametrize("k, per_pass", [(1000, 64), (1000, 1000), (5, 2), (3, 7)])
def test_iw_estimate_masks_the_overshoot_of_the_last_chunk(k, per_pass):
    def constant(n, seed):
        del seed
        return tf.fill([n, 3], -2.5), tf.fill([n, 3], -4.0)

    log_px, elbo = iw_estimate(constant, k, per_pass, tf.constant([0, 0]))
    np.testing.assert_allclose(log_px, -2.5, atol=1e-5)
    np.testing.assert_allclose(elbo, -4.0, atol=1e-5)


def test_iw_estimate_runs_its_passes_one_at_a_time():
    """A traced while loop may run iterations side by side; chunking is there to bound memory."""

    def constant(n, seed):
        del seed
        return tf.fill([n, 3], -2.5), tf.fill([n, 3], -4.0)

    traced = tf.function(lambda: iw_estimate(constant, 1000, 64, tf.constant([0, 0])))
    ops = traced.get_concrete_function().graph.get_operations()
    loops = [op for op in ops if op.type in ("While", "StatelessWhile")]
    assert loops
    assert all(op.get_attr("parallel_iterations") == 1 for op in loops)


@pytest.mark.parametrize("k, per_pass, passes", [(100, 64, [50, 50]), (1000, 64, [63] * 16)])
def test_iw_estimate_balances_its_passes(k, per_pass, passes):
    seen = []

    def recording(n, seed):
        del seed
        seen.append(int(n))  # eager: the loop runs in Python
        return tf.zeros([n, 2]), tf.zeros([n, 2])

    iw_estimate(recording, k, per_pass, tf.constant([0, 0]))
    assert seen == passes


def test_standard_error_is_the_std_over_sqrt_n():
    values = np.array([1.0, 2.0, 4.0, 7.0])
    mean, se = mean_and_standard_error(values)
    assert mean == pytest.approx(3.5)
    assert se == pytest.approx(np.std(values, ddof=1) / 2.0)


# ----------------------------------------------------------------------------- bits per dim


def test_bits_per_dim_uses_the_mnist_crop_and_all_colour_channels(tmp_path):
    mnist, colour = tiny_config(), colour_config(data_dir=str(tmp_path))
    assert mnist.num_output_dims == 784
    assert colour.num_output_dims == 3 * 16 * 16
    assert bits_per_dim(784 * math.log(2.0), mnist.num_output_dims) == pytest.approx(1.0)
    assert bits_per_dim(100.0, colour.num_output_dims) == pytest.approx(100.0 / (math.log(2) * 768))


# ----------------------------------------------------------------------------- nvae-eval


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    data = write_colour_folder(str(root / "data"), image_size=16, num_test=8)
    return {
        "mnist": Run(root / "mnist", tiny_config()),
        "colour": Run(root / "colour", colour_config(data_dir=data)),
    }


@pytest.mark.parametrize(
    "kind, num_images, dims",
    [("mnist", 16, 784), pytest.param("colour", None, 768, marks=pytest.mark.slow)],
)
def test_eval_cli_json_matches_the_library_call(runs, tmp_path, capsys, kind, num_images, dims):
    run = runs[kind]
    out = tmp_path / "result.json"
    argv = [
        "--checkpoint",
        run.dir,
        "--num-iw-samples",
        "3",
        "--batch-size",
        "8",
        "--seed",
        "5",
        "--json",
        str(out),
    ]
    if num_images:
        argv += ["--num-images", str(num_images)]
    assert eval_cli.main(argv) == 0
    assert "NLL" in capsys.readouterr().out
    result = json.loads(out.read_text())

    model = restore_model(run.dir)
    dataset = evaluation_dataset(run.config, "test", 8, 5, num_images)
    expected = evaluate(model, dataset, 3, seed=5)
    for key in (
        "nll_nats",
        "nll_bpd",
        "elbo_nats",
        "elbo_bpd",
        "num_iw_samples",
        "num_images",
        "nll_nats_se",
        "nll_bpd_se",
        "elbo_nats_se",
        "elbo_bpd_se",
        "kl_per_group",
        "active_units",
        "active_units_per_group",
        "num_latent_channels",
    ):
        np.testing.assert_allclose(result[key], expected[key], rtol=1e-4, err_msg=key)
    assert result["num_images"] == (num_images or 8)
    assert result["num_iw_samples"] == 3 and result["num_output_dims"] == dims
    for name in ("nll", "elbo"):
        assert result[f"{name}_bpd"] == pytest.approx(result[f"{name}_nats"] / (math.log(2) * dims))
        assert result[f"{name}_bpd_se"] == pytest.approx(
            result[f"{name}_nats_se"] / (math.log(2) * dims)
        )
    assert len(result["kl_per_group"]) == run.config.num_groups
    assert result["num_latent_channels"] == run.config.num_groups * run.config.num_latent_per_group


@pytest.mark.slow
def test_evaluate_equals_the_per_batch_model_likelihood(runs):
    """The dataset loop adds nothing of its own: one batch gives the model's own numbers."""
    run = runs["mnist"]
    model = restore_model(run.dir)
    x = next(iter(evaluation_dataset(run.config, "test", 8, 1)))
    seed = tf.constant([3, 0], tf.int64)
    batch_seed = tf.random.experimental.stateless_fold_in(
        tf.random.experimental.stateless_fold_in(seed, 0), 0
    )  # batch 0, replica 0
    iw_seed = tf.cast(tf.random.experimental.stateless_fold_in(batch_seed, 0), tf.int64)
    expected = -model.log_likelihood(x, 4, 256, seed=iw_seed).numpy()
    result = evaluate(model, tf.data.Dataset.from_tensors(x), 4, seed=3)
    assert result["nll_nats"] == pytest.approx(expected.mean(), rel=1e-5)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--checkpoint", "/nonexistent/run"], "config.yaml"),
        (["--num-iw-samples", "0"], "argument --num-iw-samples: must be >= 1"),
        (["--batch-size", "-2"], "argument --batch-size: must be >= 1"),
    ],
)
def test_eval_cli_user_errors_are_one_line(runs, capsys, argv, message):
    if argv[0] != "--checkpoint":
        argv = ["--checkpoint", runs["mnist"].dir] + argv
    assert eval_cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


@pytest.mark.slow
def test_evaluation_distributed_over_two_replicas(runs, tmp_path):
    """MirroredStrategy on two logical CPUs: every image once, numbers as on one device."""
    script = textwrap.dedent(f"""
        import json, tensorflow as tf
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
        from nvae_tf.run_dir import restore_model
        from nvae_tf.inference.evaluation import evaluate, evaluation_dataset
        from nvae_tf.run_dir import load_run_config
        run = {runs["mnist"].dir!r}
        config = load_run_config(run)
        strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
        with strategy.scope():
            model = restore_model(run)
        dataset = evaluation_dataset(config, "test", 16, 1, num_images=32)
        results = {{"mirrored": evaluate(model, dataset, 16, seed=2, strategy=strategy),
                    "single": evaluate(model, dataset, 16, seed=2)}}
        print(strategy.num_replicas_in_sync)
        json.dump(results, open({str(tmp_path / "out.json")!r}, "w"))
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split()[-1] == "2"
    results = json.loads((tmp_path / "out.json").read_text())
    mirrored, single = results["mirrored"], results["single"]
    assert mirrored["num_images"] == single["num_images"] == 32
    for key in ("nll_nats", "elbo_nats"):  # other posterior samples, same estimate
        # Two independent estimates: their difference has the standard error of both.
        se = math.hypot(mirrored[key + "_se"], single[key + "_se"])
        assert mirrored[key] == pytest.approx(single[key], abs=3 * se)
        assert mirrored[key] != single[key]


def test_restore_model_takes_the_moving_averages_of_an_ema_run(tmp_path):
    """EMA runs are evaluated with the averaged weights, through Keras' own EMA API."""
    run = Run(tmp_path / "run", tiny_config(ema_decay=0.9))
    variables = run.model.trainable_variables
    optimizer = run.manager.checkpoint.optimizer
    steps = []
    for _ in range(2):  # Keras starts the average at the first step's weights
        optimizer.apply([tf.ones_like(v) for v in variables], variables)
        steps.append([v.numpy() for v in variables])
    run.save()

    raw = restore_model(run.dir, use_ema=False)
    averaged = restore_model(run.dir)
    changed = 0
    for i, (v_raw, v_avg) in enumerate(zip(raw.trainable_variables, averaged.trainable_variables)):
        first, last = steps[0][i], steps[1][i]
        np.testing.assert_array_equal(v_raw.numpy(), last)
        np.testing.assert_allclose(v_avg.numpy(), 0.9 * first + 0.1 * last, rtol=1e-5, atol=1e-6)
        changed += not np.allclose(first, last)
    assert changed > len(variables) // 2
