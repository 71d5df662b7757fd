"""A skipped (non-finite) step changes nothing but its counters; schedules follow the global step.

The original advances its schedules once per batch, whether or not the scaler skipped the
optimizer step; so does nvae-tf (``GuardedOptimizer.global_step``). A skipped step must leave
the weights, optimizer slots, BN moving statistics, spectral u/v and metric trackers bitwise
as they were (before, BN statistics turned NaN and poisoned every later checkpoint).
"""

import numpy as np
import pytest
import tensorflow as tf
from conftest import binary_images, tiny_config

from nvae_tf.model import NVAE
from nvae_tf.training.schedules import kl_coefficient

COUNTERS = ("skipped_steps", "consecutive_skips")


def _model(**overrides):
    model = NVAE(tiny_config(**overrides))
    model.compile(steps_per_epoch=10)
    model.optimizer.build(model.trainable_variables)
    return model


def _state(model):
    """Every variable of the model, its optimizer and its metric trackers, by path."""
    variables = (
        list(model.variables)
        + [v for m in model.metrics for v in m.variables]
        + [v for v in model.optimizer.variables if v.path.split("/")[-1] not in COUNTERS]
    )
    return {f"{i}:{v.path}": np.array(v.numpy()) for i, v in enumerate(variables)}


def _nan_batch(seed=1):
    x = binary_images(4, seed=seed).numpy()
    x[0, 5, 5, 0] = np.nan
    return tf.constant(x)


@pytest.mark.parametrize("recompute", ["none", "cell"])
def test_nan_batch_leaves_every_variable_bitwise_unchanged(recompute, seeded):
    model = _model(recompute=recompute)
    step = tf.function(model.train_step)
    step(binary_images(4, seed=0))  # a good step first: trackers, u/v and moments are non-zero
    before = _state(model)
    logs = step(_nan_batch())
    assert int(logs["skipped_steps"]) == 1 and int(logs["consecutive_skips"]) == 1
    after = _state(model)
    changed = [k for k in before if not np.array_equal(before[k], after[k], equal_nan=False)]
    assert not changed, changed[:5]
    assert all(np.isfinite(float(logs[k])) for k in ("loss", "nelbo", "bpd"))
    # The next good step trains normally and every BN statistic stays finite.
    logs = step(binary_images(4, seed=2))
    assert int(logs["consecutive_skips"]) == 0
    for bn in model.batchnorm_layers():
        assert np.isfinite(bn.moving_mean.numpy()).all()
        assert np.isfinite(bn.moving_variance.numpy()).all()
    assert np.isfinite(float(logs["loss"]))


def test_schedules_follow_the_global_step_after_skips(seeded):
    """After k skipped batches, beta, lambda and the learning rate are those of step k + applied."""
    model = _model(warmup_epochs=1, kl_anneal_portion=0.5, weight_decay_norm_anneal=True)
    step = tf.function(model.train_step)
    for _ in range(3):
        step(_nan_batch())
    logs = step(binary_images(4, seed=0))  # the 4th batch: global step 3 when it ran
    optimizer = model.optimizer
    assert int(optimizer.iterations.numpy()) == 1 and int(optimizer.skipped_steps.numpy()) == 3
    assert int(optimizer.global_step().numpy()) == 4
    total = model.objective.total_steps
    beta_3 = float(kl_coefficient(3, total, 0.5, model.config.kl_const_portion))
    beta_0 = float(kl_coefficient(0, total, 0.5, model.config.kl_const_portion))
    assert beta_3 != beta_0
    np.testing.assert_allclose(float(logs["beta"]), beta_3, rtol=1e-6)
    schedule = optimizer.inner_optimizer._learning_rate
    np.testing.assert_allclose(float(optimizer.learning_rate), float(schedule(4)), rtol=1e-6)
    assert float(schedule(4)) != float(schedule(1))


def test_learning_rate_scale_multiplies_the_schedule(seeded):
    model = _model(warmup_epochs=0)
    optimizer = model.optimizer
    base = float(optimizer.learning_rate)
    optimizer.learning_rate_scale.assign(0.25)
    np.testing.assert_allclose(float(optimizer.learning_rate), 0.25 * base, rtol=1e-6)
