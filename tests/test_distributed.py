"""Data parallelism on 2 logical CPU devices (MirroredStrategy) against one device.

The logical devices must be configured before TensorFlow touches any device, so the body runs
in a subprocess: this file executed as a script (``python tests/test_distributed.py OUT``). It
writes its measurements as JSON; the tests below check them. The rest of the suite keeps its
single-device setup.

Making the two runs comparable:
  * The sampling noise is per replica (each replica has its own generator stream) and the
    replicated batch is split, so the posterior samples would differ from the single-device
    run. The worker patches the posterior to "sample" its mean (z = mu(x)), which removes the
    noise and keeps the gradients of every weight (a deterministic auto-encoding pass).
  * KL balancing (docs/design.md#kl-balancing) weights the groups by the LOCAL replica batch
    mean of the KL, as in the original (which does not all-reduce it), so it legitimately
    differs between 1 and 2 replicas while beta < 1; the comparison runs with
    ``kl_balance: false``.
  * Everything else is replica-exact: BN statistics are all-reduced, gradients are summed over
    replicas of (local mean loss / replicas), the spectral power-iteration vectors start equal.
Tolerances: loss and NELBO rtol 1e-5; weights after one Adamax step (lr 1e-2) atol 3e-5, i.e.
0.3% of the step: Adamax's first step is lr * g / (|g| + 1e-3), which turns the float32
rounding differences of tiny gradients (e.g. a BN beta followed by a linear conv and another
BN has a true gradient of 0) into weight differences up to 10x larger, and one device runs
batch norm as the fused kernel while replicas use the two-pass synchronized form (seen:
~1.3e-5); BN moving statistics atol 1e-6 (means ~1e-2, variances ~1; seen: ~3e-7).
"""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("distributed") / "report.json"
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "TF_CPP_MIN_LOG_LEVEL": "3",
        "CUDA_VISIBLE_DEVICES": "",
    }
    proc = subprocess.run(
        [sys.executable, str(HERE / "test_distributed.py"), str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return json.loads(out.read_text())


pytestmark = pytest.mark.slow


def test_two_replicas(report):
    assert report["replicas"] == 2


def test_one_step_matches_one_device(report):
    single, multi = report["single"], report["multi"]
    np.testing.assert_allclose(multi["loss"], single["loss"], rtol=1e-5)
    np.testing.assert_allclose(multi["nelbo"], single["nelbo"], rtol=1e-5)
    # (grad_norm is not compared: train_step computes it from each replica's local gradients.)
    # The weights moved (lr > 0 at step 0 with warmup_epochs 0) and by the same amount.
    assert report["max_weight_change"] > 1e-3
    assert report["max_weight_diff"] <= 3e-5, report["largest_weight_diffs"]
    # Both replicas hold the same weights after the step.
    assert report["replica_weight_spread"] == 0.0


def test_gradient_clipping_uses_the_summed_gradient(report):
    """Clipping the replicas' gradient sum, not each replica's part: one device's result."""
    clipped = report["clipped"]
    assert clipped["diff_from_unclipped"] > 1e-4  # the clip was active
    assert clipped["max_weight_diff"] <= 3e-5, clipped


def test_batchnorm_is_synchronized(report):
    # Layer level: each replica sees different data; the moving variance follows the
    # variance of the whole global batch, not the mean of the replicas' variances.
    layer = report["bn_layer"]
    np.testing.assert_allclose(layer["moving_mean"], layer["global_mean_update"], rtol=1e-5)
    np.testing.assert_allclose(layer["moving_variance"], layer["global_var_update"], rtol=1e-5)
    assert not np.allclose(layer["moving_variance"], layer["local_var_update"], rtol=1e-3)
    # Model level: all moving statistics equal the single-device run's after one step.
    assert report["max_bn_stat_diff"] <= 1e-6, report["max_bn_stat_diff"]
    assert report["bn_stats_moved"]


def test_nan_on_one_replica_skips_the_step_everywhere(report):
    nan = report["nan_step"]
    assert nan["skipped_steps"] == [1, 1]
    assert nan["consecutive_skips"] == [1, 1]
    assert nan["max_weight_change"] == 0.0
    # Nothing else moved either, on either replica: BN statistics, spectral u/v, optimizer
    # slots, metric trackers (whose epoch means, the logged loss, stay finite).
    assert nan["changed_variables"] == 0
    assert nan["replica_losses_finite"] == [True, True]
    # And a clean step afterwards resets the consecutive count and moves the weights.
    assert nan["after_clean_step"]["consecutive_skips"] == [0, 0]
    assert nan["after_clean_step"]["skipped_steps"] == [1, 1]
    assert nan["after_clean_step"]["max_weight_change"] > 1e-4


# ----------------------------------------------------------------------------- the worker


def _worker(out_path):  # pragma: no cover - runs in the subprocess
    import tensorflow as tf

    cpus = tf.config.list_physical_devices("CPU")
    tf.config.set_logical_device_configuration(
        cpus[0], [tf.config.LogicalDeviceConfiguration()] * 2
    )

    import keras
    import tensorflow_probability as tfp

    sys.path.insert(0, str(HERE))
    from support import binary_images, tiny_config

    from nvae_tf.layers import latent_group
    from nvae_tf.layers.normalization import BatchNorm
    from nvae_tf.model import NVAE

    tfd = tfp.distributions

    class MeanSampledNormal(tfd.Normal):
        """Normal whose samples are its mean: the same z on any number of replicas."""

        def _sample_n(self, n, seed=None):
            return tf.broadcast_to(self.loc, tf.concat([[n], tf.shape(self.loc)], axis=0))

    def mean_sampled(factory):
        def make(*args, **kwargs):
            d = factory(*args, **kwargs)
            return MeanSampledNormal(loc=d.loc, scale=d.scale)

        return make

    latent_group.latent_normal = mean_sampled(latent_group.latent_normal)
    latent_group.residual_normal = mean_sampled(latent_group.residual_normal)

    import time

    start = time.time()

    def mark(what):
        print(f"[{time.time() - start:6.1f}s] {what}", file=sys.stderr, flush=True)

    keras.utils.set_random_seed(0)
    report = {}
    devices = ["/cpu:0", "/cpu:1"]
    strategy = tf.distribute.MirroredStrategy(devices)
    report["replicas"] = strategy.num_replicas_in_sync

    # --- BN layer level ---------------------------------------------------------------------
    rng = np.random.default_rng(0)
    parts = [
        rng.normal(0.0, 1.0, (3, 4, 4, 5)).astype("float32"),
        rng.normal(2.0, 3.0, (3, 4, 4, 5)).astype("float32"),
    ]
    with strategy.scope():
        bn = BatchNorm()
        bn.build((None, 4, 4, 5))
    values = strategy.experimental_distribute_values_from_function(
        lambda ctx: tf.constant(parts[ctx.replica_id_in_sync_group])
    )
    strategy.run(lambda v: bn(v, training=True), args=(values,))
    whole = np.concatenate(parts)
    local_var = np.mean([p.var(axis=(0, 1, 2)) for p in parts], axis=0)
    mark("bn layer")
    report["bn_layer"] = {
        "moving_mean": bn.moving_mean.numpy().tolist(),
        "moving_variance": bn.moving_variance.numpy().tolist(),
        "global_mean_update": (0.05 * whole.mean(axis=(0, 1, 2))).tolist(),
        # Bessel-corrected over the 96 values per channel of the global batch (PyTorch's BN).
        "global_var_update": (0.95 + 0.05 * whole.var(axis=(0, 1, 2), ddof=1)).tolist(),
        "local_var_update": (0.95 + 0.05 * local_var * 48 / 47).tolist(),
    }

    # --- one train step: 1 device, global batch 8 vs 2 replicas x 4 -----------------------------
    config = tiny_config(kl_balance=False, batch_size=4, weight_decay_norm=1e-2)
    x = binary_images(8, seed=3)
    single = NVAE(config)
    single.compile(steps_per_epoch=10)
    initial = single.get_weights()
    logs = single.train_step(x)
    mark("single-device step")
    report["single"] = {k: float(logs[k]) for k in ("loss", "nelbo", "grad_norm")}

    with strategy.scope():
        multi = NVAE(config)
        multi.compile(steps_per_epoch=10)
        # Optimizer slots must exist before a replicated step (they cannot be made in one).
        multi.optimizer.build(multi.trainable_variables)
    multi.set_weights(initial)
    trainable_before = [v.numpy() for v in multi.trainable_variables]
    batch = next(
        iter(
            strategy.experimental_distribute_dataset(tf.data.Dataset.from_tensor_slices(x).batch(8))
        )
    )
    logs = strategy.run(multi.train_step, args=(batch,))
    mark("replicated step")
    local = {
        k: [float(v) for v in strategy.experimental_local_results(logs[k])]
        for k in ("loss", "nelbo", "grad_norm")
    }
    report["local"] = local
    # Each replica's value is its local mean; their mean is the global-batch mean.
    report["multi"] = {k: float(np.mean(v)) for k, v in local.items()}
    report["multi"]["grad_norm"] = local["grad_norm"][0]  # from all-reduced gradients
    after_single = [v.numpy() for v in single.trainable_variables]
    after_multi = [v.numpy() for v in multi.trainable_variables]
    report["max_weight_change"] = max(
        float(np.abs(a - b).max()) for a, b in zip(after_single, trainable_before)
    )
    diffs = {
        v.path: float(np.abs(a - b).max())
        for v, a, b in zip(single.trainable_variables, after_single, after_multi)
    }
    report["max_weight_diff"] = max(diffs.values())
    report["largest_weight_diffs"] = sorted(diffs.items(), key=lambda kv: -kv[1])[:5]
    spread = 0.0
    for v in multi.trainable_variables:
        copies = [c.numpy() for c in strategy.experimental_local_results(v.value)]
        spread = max(spread, float(np.abs(copies[0] - copies[1]).max()))
    report["replica_weight_spread"] = spread
    worst, moved = 0.0, False
    for a, b in zip(single.batchnorm_layers(), multi.batchnorm_layers()):
        for va, vb in ((a.moving_mean, b.moving_mean), (a.moving_variance, b.moving_variance)):
            worst = max(worst, float(np.abs(va.numpy() - vb.numpy()).max()))
        moved = moved or bool(np.abs(a.moving_mean.numpy()).max() > 1e-3)
    report["max_bn_stat_diff"] = worst
    report["bn_stats_moved"] = moved

    # --- global-norm clipping acts on the gradient summed over replicas ---------------------
    clipped_config = config.replace(grad_clip_norm=0.05)  # far below the gradient norm
    single_clipped = NVAE(clipped_config)
    single_clipped.compile(steps_per_epoch=10)
    single_clipped.set_weights(initial)
    single_clipped.train_step(x)
    with strategy.scope():
        multi_clipped = NVAE(clipped_config)
        multi_clipped.compile(steps_per_epoch=10)
        multi_clipped.optimizer.build(multi_clipped.trainable_variables)
    multi_clipped.set_weights(initial)
    strategy.run(multi_clipped.train_step, args=(batch,))
    mark("clipped steps")
    report["clipped"] = {
        "max_weight_diff": max(
            float(np.abs(a.numpy() - b.numpy()).max())
            for a, b in zip(single_clipped.trainable_variables, multi_clipped.trainable_variables)
        ),
        "diff_from_unclipped": max(
            float(np.abs(a.numpy() - b).max())
            for a, b in zip(single_clipped.trainable_variables, after_single)
        ),
    }
    print("clipped:", report["clipped"], file=sys.stderr)

    # --- NaN on replica 1 only --------------------------------------------------------------
    objective = multi.objective

    def poisoned(model, outputs, images, iteration):
        terms = objective(model, outputs, images, iteration)
        replica = tf.distribute.get_replica_context().replica_id_in_sync_group
        return terms._replace(loss=terms.loss + tf.where(tf.equal(replica, 1), float("nan"), 0.0))

    def counters():
        opt = multi.optimizer
        return {
            name: [
                int(c.numpy())
                for c in strategy.experimental_local_results(getattr(opt, name).value)
            ]
            for name in ("skipped_steps", "consecutive_skips")
        }

    def every_copy():
        """Each replica's copy of every model, metric and optimizer variable but the counters."""
        variables = (
            list(multi.variables)
            + [v for m in multi.metrics for v in m.variables]
            + [v for v in multi.optimizer.variables if v.path.split("/")[-1] not in names]
        )
        return [
            np.array(c.numpy())
            for v in variables
            for c in strategy.experimental_local_results(getattr(v, "value", v))
        ]

    names = ("skipped_steps", "consecutive_skips")
    multi.objective = poisoned
    before = [v.numpy() for v in multi.trainable_variables]
    state_before = every_copy()
    logs = strategy.run(multi.train_step, args=(batch,))
    mark("poisoned step")
    nan = counters()
    nan["changed_variables"] = sum(
        not np.array_equal(a, b) for a, b in zip(state_before, every_copy())
    )
    nan["replica_losses_finite"] = [
        bool(np.isfinite(float(v))) for v in strategy.experimental_local_results(logs["loss"])
    ]
    nan["max_weight_change"] = max(
        float(np.abs(v.numpy() - b).max()) for v, b in zip(multi.trainable_variables, before)
    )
    multi.objective = objective
    before = [v.numpy() for v in multi.trainable_variables]
    strategy.run(multi.train_step, args=(batch,))
    mark("clean step")
    nan["after_clean_step"] = counters()
    nan["after_clean_step"]["max_weight_change"] = max(
        float(np.abs(v.numpy() - b).max()) for v, b in zip(multi.trainable_variables, before)
    )
    report["nan_step"] = nan

    pathlib.Path(out_path).write_text(json.dumps(report))


if __name__ == "__main__":
    _worker(sys.argv[1])
