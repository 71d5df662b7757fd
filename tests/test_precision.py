"""Mixed precision: float16 with dynamic loss scaling from 2^10, bfloat16, float32.

What the original does and what we do: docs/design.md#mixed-precision-and-memory.

On this CPU float16 convolutions are very slow, so the model is the tiny 16x16 RGB config
(base width 4, logistic mixture, one flow pair per group). Every model is built under its
policy and gets the float32 model's weights, so the runs differ only by arithmetic precision.
Tolerances on the loss (a per-image sum of ~5000 nats): float16 rtol 2e-4, bfloat16 rtol 2e-3
(bfloat16 keeps 8 bits of mantissa, float16 11); the KL term (~300 nats) 5x those. Seen on the
untrained tiny model: float16 loss 5e-7, KL 4e-5; bfloat16 loss 1e-6, KL 7e-4.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf
from support import colour_config, colour_images

from nvae_tf.inference.likelihood import importance_weighted
from nvae_tf.model import NVAE

pytestmark = pytest.mark.usefixtures("seeded")

TOLERANCE = {"mixed_float16": 2e-4, "mixed_bfloat16": 2e-3}
SEED = [7, 1]


def build(policy):
    keras.mixed_precision.set_global_policy(policy)
    try:
        model = NVAE(colour_config(precision=policy))
        model.compile(steps_per_epoch=10)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    return model


@pytest.fixture(scope="module")
def reference():
    """The float32 model, its initial weights, forward terms and one train step's logs."""
    keras.utils.set_random_seed(13)
    model = build("float32")
    weights = model.get_weights()
    x = colour_images(4)
    terms = model.objective(model, model(x, training=True, seed=SEED), x, 0)
    logs = model.train_step(x)
    return {
        "weights": weights,
        "x": x,
        "terms": {k: float(v) for k, v in terms._asdict().items()},
        "logs": {k: float(v) for k, v in logs.items()},
    }


@pytest.fixture(scope="module", params=["mixed_float16", "mixed_bfloat16"])
def mixed(request, reference):
    """One model per policy for the module; the tests below run in file order per policy
    (the forward comparison before the train step that changes the weights)."""
    policy = request.param
    model = build(policy)
    model.set_weights(reference["weights"])
    return policy, model


def test_mixed_model_computes_in_low_precision_with_float32_variables(mixed):
    policy, model = mixed
    low = policy.split("_")[1]
    assert model.compute_dtype == low and model.dtype_policy.name == policy
    assert all(
        v.dtype == "float32"
        for v in model.weights
        if v.dtype != "int64" and "bool" not in str(v.dtype)
    )
    conv = model.stem
    assert conv.compute_dtype == low and conv.effective_kernel().dtype == tf.float32


def test_forward_loss_close_to_float32(mixed, reference):
    policy, model = mixed
    x = reference["x"]
    terms = model.objective(model, model(x, training=True, seed=SEED), x, 0)
    for name in ("loss", "nelbo", "recon", "kl", "spectral", "bn_penalty"):
        assert getattr(terms, name).dtype == tf.float32, name
        np.testing.assert_allclose(
            float(getattr(terms, name)),
            reference["terms"][name],
            rtol=TOLERANCE[policy] * (5 if name == "kl" else 1),
            err_msg=name,
        )


def test_train_step_runs_and_loss_close_to_float32(mixed, reference):
    policy, model = mixed
    before = [v.numpy() for v in model.trainable_variables]
    logs = model.train_step(reference["x"])
    np.testing.assert_allclose(
        float(logs["loss"]), reference["logs"]["loss"], rtol=TOLERANCE[policy]
    )
    assert int(logs["skipped_steps"]) == 0
    assert np.isfinite(float(logs["grad_norm"]))
    changed = [not np.array_equal(v.numpy(), b) for v, b in zip(model.trainable_variables, before)]
    assert np.mean(changed) > 0.9
    assert all(np.all(np.isfinite(v.numpy())) for v in model.trainable_variables)


@pytest.mark.parametrize(
    "policy, scale, dynamic",
    [("float32", 1.0, False), ("mixed_bfloat16", 1.0, False), ("mixed_float16", 1024.0, True)],
)
def test_initial_loss_scale(policy, scale, dynamic):
    keras.mixed_precision.set_global_policy(policy)
    model = NVAE(colour_config(precision=policy, num_nf=0, num_latent_per_group=4))
    model.compile(steps_per_epoch=10)
    optimizer = model.optimizer
    optimizer.build(model.trainable_variables)
    assert float(optimizer.scale_loss(tf.constant(1.0))) == scale
    assert optimizer.dynamic is dynamic
    assert float(optimizer.dynamic_scale) == scale


def test_float16_overflow_skips_the_step_and_halves_the_scale():
    keras.mixed_precision.set_global_policy("mixed_float16")
    model = NVAE(colour_config(precision="mixed_float16", num_nf=0, num_latent_per_group=4))
    model.compile(steps_per_epoch=10)
    optimizer = model.optimizer
    variables = model.trainable_variables
    optimizer.build(variables)
    before = [v.numpy() for v in variables]
    grads = [tf.zeros_like(v) for v in variables]
    grads[0] = tf.fill(variables[0].shape, np.inf)
    optimizer.apply(grads, variables)
    assert int(optimizer.skipped_steps) == 1
    assert float(optimizer.dynamic_scale) == 512.0
    for v, b in zip(variables, before):
        np.testing.assert_array_equal(v.numpy(), b)


def test_distribution_outputs_are_float32(mixed):
    _, model = mixed
    x = colour_images(2)
    out = model(x, training=False, seed=SEED)
    for name in ("kl", "log_q", "log_p", "kl_per_channel", "logits"):
        assert getattr(out, name).dtype == tf.float32, name
        assert np.all(np.isfinite(getattr(out, name).numpy())), name
    assert out.output_distribution.log_prob(x).dtype == tf.float32
    for mean, std in zip(out.posterior_mean, out.posterior_stddev):
        assert mean.dtype == std.dtype == tf.float32
    assert model.spectral_regularizer().dtype == tf.float32
    ll, elbo = importance_weighted(model, x, 3, seed=SEED)  # logsumexp over samples
    assert ll.dtype == elbo.dtype == tf.float32 and np.all(np.isfinite(ll.numpy()))
    images = model.sample(2, seed=SEED)
    assert images.dtype == tf.float32 and images.shape == (2, 16, 16, 3)
