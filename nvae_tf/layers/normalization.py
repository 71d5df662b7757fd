"""Batch normalization as NVAE uses it (paper §3.1.1) and the fused-in-spirit BN + Swish.

Momentum 0.95 / epsilon 1e-5 (PyTorch momentum 0.05, eps 1e-5), statistics synchronized across
replicas (docs/design.md#batch-normalization). ``update_stats=False`` normalizes with batch
statistics without touching the moving averages: the recompute pass of
``nvae_tf.layers.recompute`` needs it, since a second update per step would change the
statistics (``tf.recompute_grad`` has no such switch).
"""

import contextlib
import threading

import keras
import tensorflow as tf
from keras import ops

from nvae_tf.layers import lean_gradient, ordering

BN_MOMENTUM = 0.95
BN_EPSILON = 1e-5
_EMPTY = tf.constant([], tf.float32)  # FusedBatchNormV3's unused mean/variance in training
# Inputs the fused kernels take as they are, statistics in float32 inside: under
# mixed_bfloat16 no activation-sized cast each way (MNIST b16 step ~10% faster on a CPU).
FUSED_INPUT_DTYPES = ("float32", "bfloat16")


@keras.saving.register_keras_serializable(package="nvae_tf")
class BatchNorm(keras.layers.BatchNormalization):
    """Keras BatchNormalization with NVAE's constants and an ``update_stats`` switch."""

    def __init__(self, momentum=BN_MOMENTUM, epsilon=BN_EPSILON, synchronized=True, **kwargs):
        super().__init__(momentum=momentum, epsilon=epsilon, synchronized=synchronized, **kwargs)

    def call(self, inputs, training=None, update_stats=True, swish=False, then=None):
        """``swish=True`` applies Swish after normalizing (``BNSwish``), inside the same
        hand-written training gradient. ``then``: a conv layer applied to the result (returns
        its output); in float32 training with fused kernels, the conv's kernel gradient then
        recomputes its input instead of keeping it (``layers/linear_ops.py``)."""
        linear = None
        if then is not None:
            if training and self.trainable and self.compute_dtype == "float32":
                linear = then.as_linear_op() if self._fusable(inputs) else None
            if linear is None:
                return then(self.call(inputs, training, update_stats, swish))
        if not (training and self.trainable):
            out = self._inference(inputs)
            # Written out, Grappler's remapper fuses it into one kernel (Keras' silu has a
            # custom-gradient wrapper that hides the pattern): 1.7x faster BN + Swish on CPU.
            return out * tf.sigmoid(out) if swish else out
        fusable = self._fusable(inputs) and inputs.dtype.name in FUSED_INPUT_DTYPES
        x = inputs if fusable else ops.cast(inputs, "float32")
        gamma, beta = self._float32_or(self.gamma, 1.0), self._float32_or(self.beta, 0.0)
        if fusable:
            out, mean, variance = fused_batch_norm_train(
                x, gamma, beta, self.epsilon, swish, then=linear
            )
            if linear is not None and then.use_bias:
                out = tf.nn.bias_add(out, ops.cast(then.bias, "float32"))
        else:
            mean, variance, count = self._moments_and_count(x)
            out = tf.nn.batch_normalization(x, mean, variance, beta, gamma, self.epsilon)
            if swish:
                out = keras.activations.silu(out)
            variance = variance * (count / (count - 1.0))
        if update_stats:
            # The moving variance takes the Bessel-corrected batch variance, as PyTorch's BN
            # (and so the original) does; normalizing uses the biased one.
            for moving, batch in ((self.moving_mean, mean), (self.moving_variance, variance)):
                _update_moving_average(moving, batch, self.momentum)
        return ops.cast(out, self.compute_dtype)

    def _inference(self, inputs):
        if not self._per_channel_nhwc(inputs):
            return super().call(inputs, training=False)
        # One fused kernel (one pass over x) instead of Keras' multiply and add.
        x = inputs if inputs.dtype.name in FUSED_INPUT_DTYPES else ops.cast(inputs, "float32")
        out = tf.compat.v1.nn.fused_batch_norm(
            x,
            self._float32_or(self.gamma, 1.0),
            self._float32_or(self.beta, 0.0),
            mean=self.moving_mean,
            variance=self.moving_variance,
            epsilon=self.epsilon,
            is_training=False,
        )[0]
        return ops.cast(out, self.compute_dtype)

    def affine(self):
        """Inference-mode BN as ``x * scale + shift`` per channel (float32), for folding it
        into a neighbouring convolution."""
        scale = self._float32_or(self.gamma, 1.0) * tf.math.rsqrt(
            ops.cast(self.moving_variance, "float32") + self.epsilon
        )
        shift = self._float32_or(self.beta, 0.0) - ops.cast(self.moving_mean, "float32") * scale
        return scale, shift

    def _float32_or(self, weight, default):
        if weight is None:  # scale=False / center=False
            return tf.fill(tf.shape(self.moving_mean), default)
        return ops.cast(weight, "float32")

    def _fusable(self, x):
        """One fused kernel for NHWC inputs when no statistics are shared across replicas."""
        ctx = tf.distribute.get_replica_context()
        shared = self.synchronized and ctx is not None and ctx.num_replicas_in_sync > 1
        return not shared and self._per_channel_nhwc(x)

    def _per_channel_nhwc(self, x):
        """4-D input normalized per channel (last axis): the layout the fused kernels take."""
        return len(x.shape) == 4 and list(self._reduction_axes) == [0, 1, 2]

    def _moments_and_count(self, x):
        """Batch mean, biased variance and the number of values behind each (all replicas).

        Keras' synchronized moments take var = E[x^2] - E[x]^2 in one float32 pass, which
        loses most digits when |mean| >> std (|mean|/std = 100: ~0.2% error in the output).
        Two passes (global mean, then global mean squared deviation) cost one more all-reduce
        and are exact to rounding, on one replica or many.
        """
        if self.synchronized:
            return synchronized_moments(x, self._reduction_axes)
        mean, variance = super()._moments(x, None)
        count = tf.cast(tf.size(x) // tf.size(mean), tf.float32)
        return mean, variance, count


_queued = threading.local()  # per thread: tf.distribute traces each replica on its own


def _update_moving_average(moving, batch, momentum):
    """``moving <- moving_average_update(moving, batch, momentum)``, now or queued."""
    queue = getattr(_queued, "updates", None)
    if queue is None:
        moving.assign_sub((moving - batch) * (1.0 - momentum))
    else:
        queue.append((moving, batch, momentum))


@contextlib.contextmanager
def queued_moving_averages():
    """Training BNs inside queue their moving-average updates instead of applying them.

    Yields the queue: ``(moving variable, batch statistic, momentum)`` per update, for the
    caller to apply, e.g. ``nvae_tf.training.step_state.StepState`` together with its
    skipped-step guard: per statistic one read and one write, instead of four ops for the
    update and three more for the guard (~2,000 graph ops fewer on MNIST's paper config).
    """
    previous = getattr(_queued, "updates", None)
    _queued.updates = queue = []
    try:
        yield queue
    finally:
        _queued.updates = previous


def moving_average_update(moving, batch, momentum):
    """The new moving average (arithmetic only; stacked operands work the same)."""
    return moving - (moving - batch) * (1.0 - momentum)


def fused_batch_norm_train(x, gamma, beta, epsilon, swish=False, then=None):
    """Training-mode BN (then Swish when ``swish``) of NHWC ``x``, with one fused kernel each
    way: 2x faster than the op-by-op form on CPU.

    Returns the output, the batch mean and the Bessel-corrected batch variance (what the moving
    average takes). The gradient is written by hand, for two reasons: autodiff of the
    six-output op builds dead zeros for every unused output (~1,500 graph ops in MNIST's step),
    and Swish's input need not be kept for the backward pass: it is recomputed from ``x``
    (kept anyway) and the batch statistics, one activation-sized tensor less per layer.

    ``then``: ``(op, kernel)``, a conv of ``layers/linear_ops.py`` applied to the output, whose
    kernel gradient then reads the recomputed output instead of a kept one.
    """
    n = x.shape[:3].num_elements()  # static when known: no graph ops
    if n is None:
        n = tf.cast(tf.size(x) // tf.shape(x)[-1], tf.float32)
    op, kernel = then or (None, None)
    stats = []

    @lean_gradient.custom_gradient
    def normalize(x, gamma, beta, *kernel_arg):
        y, mean, variance, *reserve = tf.raw_ops.FusedBatchNormV3(
            x=x, scale=gamma, offset=beta, mean=_EMPTY, variance=_EMPTY,
            epsilon=epsilon, is_training=True,
        )  # fmt: skip
        stats.extend([mean, variance])

        def grad(d_out):
            d_y, d_kernel = d_out, ()
            if swish or op:
                # The BN output again, as x * scale + shift, inside the fused kernels below.
                scale = gamma * tf.math.rsqrt(variance * ((n - 1.0) / n) + epsilon)
                shift = beta - mean * scale
                x_late = ordering.after(x, d_out)
                if op:
                    if swish:
                        out_again = _affine_swish(x_late, scale, shift)
                    else:
                        out_again = x_late * scale + shift
                    d_y, d_k = op.backward(out_again, kernel_arg[0], d_out)
                    d_kernel = (d_k,)
                if swish:
                    d_y = _affine_swish_gradient(x_late, scale, shift, d_y)
            d_x, d_gamma, d_beta = tf.raw_ops.FusedBatchNormGradV3(
                y_backprop=d_y, x=x, scale=gamma, reserve_space_1=reserve[0],
                reserve_space_2=reserve[1], reserve_space_3=reserve[2], epsilon=epsilon,
                is_training=True,
            )[:3]  # fmt: skip
            return (d_x, d_gamma, d_beta, *d_kernel)

        out = y * tf.sigmoid(y) if swish else y
        return (op.forward(out, kernel_arg[0]) if op else out), grad

    out = normalize(x, gamma, beta, *([kernel] if op else []))
    return out, stats[0], stats[1]


# The backward pass's elementwise chains, compiled by XLA into one loop each (TensorFlow runs
# a kernel and a pass over memory per op): MNIST training step 6-9% faster on a CPU.
@tf.function(jit_compile=True, autograph=False)
def _affine_swish(x, scale, shift):
    """Swish(x * scale + shift), per channel, in float32; returned in ``x``'s dtype."""
    y = tf.cast(x, scale.dtype) * scale + shift
    return tf.cast(y * tf.sigmoid(y), x.dtype)


@tf.function(jit_compile=True, autograph=False)
def _affine_swish_gradient(x, scale, shift, d):
    """The gradient ``d`` of Swish(y) taken back to y = x * scale + shift (float32 inside;
    returned in ``d``'s dtype)."""
    y = tf.cast(x, scale.dtype) * scale + shift
    s = tf.sigmoid(y)
    return tf.cast(tf.cast(d, scale.dtype) * (s * (1.0 + y * (1.0 - s))), d.dtype)


def synchronized_moments(x, axes):
    """Mean and (biased) variance over ``axes`` and over all replicas in sync, two-pass, and
    the number of values per statistic."""
    ctx = tf.distribute.get_replica_context()
    sync = ctx is not None and ctx.num_replicas_in_sync > 1
    x = tf.cast(x, tf.float32)
    local_sum = tf.reduce_sum(x, axis=axes, keepdims=True)
    count = tf.cast(
        tf.size(x, out_type=tf.int64) // tf.size(local_sum, out_type=tf.int64), tf.float32
    )
    if sync:
        local_sum, count = ctx.all_reduce(tf.distribute.ReduceOp.SUM, [local_sum, count])
    mean = local_sum / count
    squares = tf.reduce_sum(tf.square(x - mean), axis=axes, keepdims=True)
    if sync:
        squares = ctx.all_reduce(tf.distribute.ReduceOp.SUM, squares)
    return tf.squeeze(mean, axes), tf.squeeze(squares / count, axes), count


@keras.saving.register_keras_serializable(package="nvae_tf")
class BNSwish(keras.layers.Layer):
    """BatchNorm followed by Swish (x * sigmoid(x))."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.bn = BatchNorm(name="bn")

    def build(self, input_shape):
        self.bn.build(input_shape)

    def call(self, x, training=None, update_stats=True, then=None):
        """``then``: a conv layer applied to the result (see ``BatchNorm.call``)."""
        return self.bn(x, training=training, update_stats=update_stats, swish=True, then=then)
