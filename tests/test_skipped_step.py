"""A skipped (non-finite) step changes nothing but its counters; schedules follow the global step.

The original advances its schedules once per batch, whether or not the scaler skipped the
optimizer step; so does nvae-tf (``GuardedOptimizer.global_step``). A skipped step must leave
the weights, optimizer slots, BN moving statistics, spectral u/v and metric trackers bitwise
as they were (before, BN statistics turned NaN and poisoned every later checkpoint).
"""

import numpy as np
import pytest
import tensorflow as tf
from support import binary_images, tiny_config

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


def _check_nan_step_changes_nothing(model, step):
    before = _state(model)
    logs = step(_nan_batch())
    assert int(logs["consecutive_skips"]) == 1
    after = _state(model)
    changed = [k for k in before if not np.array_equal(before[k], after[k])]
    assert not changed, changed[:5]
    assert all(np.isfinite(float(logs[k])) for k in ("loss", "nelbo", "bpd"))


def test_skipped_steps_change_nothing_and_schedules_follow_the_global_step(seeded):
    model = _model(warmup_epochs=1, kl_anneal_portion=0.5, weight_decay_norm_anneal=True)
    optimizer = model.optimizer
    step = tf.function(model.train_step)
    step(binary_images(4, seed=0))  # a good step first: trackers, u/v and moments are non-zero
    _check_nan_step_changes_nothing(model, step)  # global step 1 -> 2, iterations stay 1
    step(_nan_batch())
    logs = step(binary_images(4, seed=2))  # applied at global step 3, after 2 skips
    assert int(optimizer.iterations.numpy()) == 2 and int(optimizer.skipped_steps.numpy()) == 2
    assert int(optimizer.global_step().numpy()) == 4
    for bn in model.batchnorm_layers():  # the good step after the skips: all finite
        assert np.isfinite(bn.moving_mean.numpy()).all()
        assert np.isfinite(bn.moving_variance.numpy()).all()
    # beta (logged as the epoch mean: steps 0 and 3 were applied), lambda and the learning
    # rate follow the global step, not the applied-step count.
    total, const = model.objective.total_steps, model.config.kl_const_portion
    betas = [float(kl_coefficient(s, total, 0.5, const)) for s in (0, 1, 3)]
    assert betas[2] != betas[1]
    np.testing.assert_allclose(float(logs["beta"]), (betas[0] + betas[2]) / 2, rtol=1e-6)
    schedule = optimizer.inner_optimizer._learning_rate
    np.testing.assert_allclose(float(optimizer.learning_rate), float(schedule(4)), rtol=1e-6)
    assert float(schedule(4)) != float(schedule(2))
    # A rollback's lower rate multiplies the schedule.
    optimizer.learning_rate_scale.assign(0.25)
    np.testing.assert_allclose(float(optimizer.learning_rate), 0.25 * float(schedule(4)), rtol=1e-6)


@pytest.mark.slow
def test_skipped_step_changes_nothing_under_recompute(seeded):
    model = _model(recompute="cell")
    step = tf.function(model.train_step)
    step(binary_images(4, seed=0))
    _check_nan_step_changes_nothing(model, step)
