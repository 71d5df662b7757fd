"""NVAE's weight regularizers: spectral regularization (paper §3.2) and BN scale (paper §3.1.1).

``SpectralRegularizer`` estimates the largest singular value of every conv kernel matrix by
power iteration and returns their sum; its left/right vectors are non-trainable variables of a
Keras layer so that they are tracked by the model and saved in checkpoints (the original kept
them outside its state dict; restoring them only spares the 40-iteration warm start; see
docs/design.md#spectral-regularization).

Distribution: ``u``, ``v`` and the ``initialized`` flag are ``ON_READ`` variables with
``ONLY_FIRST_REPLICA`` aggregation. Each replica updates its own copy with plain ``assign``
(no cross-replica communication); the copies stay identical because the kernels are mirrored,
and a read in cross-replica context (checkpointing) takes replica 0's value.
"""

import keras
import numpy as np
import tensorflow as tf

from nvae_tf.layers.tracking import CheckpointListsMixin
from nvae_tf.layers.weight_norm import normalized_stack

_NORMALIZE_EPS = 1e-3  # the original's normalization floor (docs/design.md#spectral-regularization)
# What one more bucket costs per power iteration (its ~20 small loop-body ops), in float32 matrix
# elements streamed. From timings of the small config's regularizer on 2 CPU cores: 2**16 to
# 2**20 alike, one bucket for all (2**22) slower.
BUCKET_OVERHEAD_ELEMENTS = 2**18


def _normalize(x):
    return x / tf.maximum(tf.norm(x, axis=-1, keepdims=True), _NORMALIZE_EPS)


def _read(variable):
    return tf.convert_to_tensor(variable)


def _padded_concat(tensors):
    """``(n_i, a_i, ...)`` tensors zero-padded at the end of each later axis to the largest
    size there, concatenated along axis 0."""
    sizes = [max(t.shape[k] for t in tensors) for k in range(1, tensors[0].shape.rank)]

    def pad(t):
        if list(t.shape[1:]) == sizes:
            return t
        return tf.pad(t, [[0, 0]] + [[0, n - m] for n, m in zip(sizes, t.shape[1:])])

    padded = [pad(t) for t in tensors]
    return padded[0] if len(padded) == 1 else tf.concat(padded, 0)


def _unpadded_split(x, bucket, variables):
    """``_padded_concat``'s inverse for a bucket's vectors: one tensor per group, shaped like
    its variable."""
    if len(bucket) == 1:
        return [x]
    shapes = [variables[g].shape for g in bucket]
    parts = tf.split(x, [s[0] for s in shapes], axis=0)
    return [p if p.shape[1] == s[1] else p[:, : s[1]] for p, s in zip(parts, shapes)]


def padding_buckets(shapes, overhead=BUCKET_OVERHEAD_ELEMENTS):
    """Partition shape groups into buckets whose matrices are zero-padded to one shape.

    A zero-padded matrix has the same singular values, and power iteration on it keeps the
    vectors' padding at zero, so each bucket runs as one batched matvec per half-iteration.
    Buckets are contiguous runs of the groups ordered by matrix size, chosen (dynamic
    programming) to minimize ``sum(overhead + padded elements)``: small groups merge, large
    ones stay alone and unpadded.

    Args:
      shapes: ``(layers, rows, cols)`` per group.
      overhead: the cost of one bucket, in matrix elements.

    Returns:
      A tuple of buckets, each a tuple of group indices in ascending order.
    """
    order = sorted(range(len(shapes)), key=lambda g: (shapes[g][1] * shapes[g][2], g))

    def cost(run):
        layers = sum(shapes[g][0] for g in run)
        return overhead + layers * max(shapes[g][1] for g in run) * max(shapes[g][2] for g in run)

    best = [0.0] + [float("inf")] * len(order)  # best[j]: cheapest split of order[:j]
    cut = [0] * (len(order) + 1)
    for j in range(1, len(order) + 1):
        for i in range(j):
            c = best[i] + cost(order[i:j])
            if c < best[j]:
                best[j], cut[j] = c, i
    buckets, j = [], len(order)
    while j:
        buckets.append(tuple(sorted(order[cut[j] : j])))
        j = cut[j]
    return tuple(sorted(buckets))


class _Refs:
    """Holds the conv layers without letting Keras or tf.train track them a second time."""

    def __init__(self, items):
        self.items = tuple(items)


@keras.saving.register_keras_serializable(package="nvae_tf")
class SpectralRegularizer(CheckpointListsMixin, keras.layers.Layer):
    """``SR = sum over conv layers of sigma_max(W)``, by batched power iteration.

    Construct empty, then ``build_for(conv_layers)`` once the layers are built. Every call runs
    ``num_power_iter`` iterations (``10 * num_power_iter`` on the first call), updates ``u``/``v``
    in place and returns ``sum u^T W v`` (float32) with the gradient flowing into the kernels only.

    Args:
      num_power_iter: power iterations per call after the first (4 in NVAE).
      reuse_forward_kernels: take each conv's effective kernel from its forward call in the same
        graph (one weight normalization per conv per step instead of two). Only where the
        forward pass is recorded normally: not under recompute, which reruns it in the
        backward pass.
    """

    def __init__(self, num_power_iter=4, reuse_forward_kernels=False, **kwargs):
        kwargs.setdefault("dtype", "float32")  # read kernels in float32 under mixed precision
        super().__init__(**kwargs)
        if int(num_power_iter) < 1:
            raise ValueError(f"num_power_iter must be >= 1, got {num_power_iter}")
        self.num_power_iter = int(num_power_iter)
        self.reuse_forward_kernels = bool(reuse_forward_kernels)
        self._convs = _Refs(())
        self._groups = ()
        self._buckets = ()
        self.u_vars, self.v_vars = [], []

    def build(self, input_shape=None):
        raise ValueError("SpectralRegularizer is built with build_for(conv_layers)")

    def build_for(self, conv_layers):
        """Create one (u, v) pair of stacked vectors per distinct kernel-matrix shape.

        Args:
          conv_layers: built layers with ``kernel_matrix()`` returning the transposed
            (cols, rows) weight matrix and ``kernel_matrix_shape`` its shape; ``u`` has one
            entry per row (output channel).
        """
        if self.built:
            raise ValueError("SpectralRegularizer.build_for was already called")
        conv_layers = tuple(conv_layers)
        if not conv_layers:
            raise ValueError("SpectralRegularizer needs at least one conv layer")
        groups = {}  # (rows, cols) -> layer indices, in first-occurrence order
        for i, layer in enumerate(conv_layers):
            if not layer.built:
                raise ValueError(f"layer {layer.name} must be built before build_for")
            cols, rows = layer.kernel_matrix_shape
            groups.setdefault((rows, cols), []).append(i)
        self._convs = _Refs(conv_layers)
        self._groups = tuple(tuple(idx) for idx in groups.values())
        self._buckets = padding_buckets(
            [(len(idx), rows, cols) for (rows, cols), idx in groups.items()]
        )
        with keras.name_scope(self.name, caller=self):
            # Left / right singular vector estimates, one (layers, rows) / (layers, cols)
            # variable per shape group.
            self.u_vars = [
                self._state(f"u_{rows}x{cols}", (len(idx), rows))
                for (rows, cols), idx in groups.items()
            ]
            self.v_vars = [
                self._state(f"v_{rows}x{cols}", (len(idx), cols))
                for (rows, cols), idx in groups.items()
            ]
            self.initialized = self._state("initialized", (), "zeros", dtype="bool")
        self.built = True

    @staticmethod
    def _state(name, shape, initializer="random_normal", dtype="float32"):
        return keras.Variable(
            keras.initializers.get(initializer),
            shape=shape,
            dtype=dtype,
            trainable=False,
            autocast=False,
            synchronization="on_read",
            aggregation="only_first_replica",
            name=name,
        )

    def __call__(self):
        # Keras' Layer.__call__ insists on one argument; pass a placeholder None so the call
        # still gets Keras' scoping (float32 autocast scope under a mixed-precision model).
        return super().__call__(None)

    def call(self, _unused):
        iters = tf.where(
            tf.convert_to_tensor(self.initialized), self.num_power_iter, 10 * self.num_power_iter
        )
        # Per shape group, w_t = W^T stacked: (layers, cols, rows), so W^T u = w_t u and
        # W v = v^T w_t; then per bucket, the groups zero-padded to one shape and concatenated.
        w_t = [self._stacked_matrices([self._convs.items[i] for i in idx]) for idx in self._groups]
        w_b = [_padded_concat([w_t[g] for g in bucket]) for bucket in self._buckets]
        u_b = [_padded_concat([_read(self.u_vars[g]) for g in b]) for b in self._buckets]
        v_b = [_padded_concat([_read(self.v_vars[g]) for g in b]) for b in self._buckets]
        w_const = [tf.stop_gradient(w) for w in w_b]

        def step(i, us, vs):
            vs = [_normalize(tf.linalg.matvec(w, u)) for w, u in zip(w_const, us)]
            # W v as the row vector v^T W^T: oneDNN's transposed batched matvec is ~30% slower
            # on these memory-bound shapes.
            us = [_normalize(tf.matmul(v[:, None, :], w)[:, 0, :]) for w, v in zip(w_const, vs)]
            return i + 1, us, vs

        # One loop for all buckets: one loop body to trace and run instead of one per bucket.
        _, us, vs = tf.while_loop(lambda i, us, vs: i < iters, step, (tf.constant(0), u_b, v_b))
        for bucket, u, v in zip(self._buckets, us, vs):
            for variables, vectors in ((self.u_vars, u), (self.v_vars, v)):
                for g, part in zip(bucket, _unpadded_split(vectors, bucket, variables)):
                    variables[g].assign(part)
        total = tf.add_n(
            [
                tf.reduce_sum(tf.stop_gradient(v) * tf.linalg.matvec(w, tf.stop_gradient(u)))
                for w, u, v in zip(w_b, us, vs)
            ]
        )
        self.initialized.assign(True)
        return total

    def _stacked_matrices(self, convs):
        """``(layers, cols, rows)``: the convs' kernel matrices (W^T), stacked."""
        stack = normalized_stack(convs) if self.reuse_forward_kernels else None
        if stack is not None:  # the forward pass's stack: the same values, one reshape
            return tf.cast(tf.reshape(stack, (len(convs), -1, convs[0].filters)), tf.float32)
        matrices = [conv.kernel_matrix(self.reuse_forward_kernels) for conv in convs]
        return tf.stack([tf.cast(m, tf.float32) for m in matrices])

    def get_config(self):
        return {
            **super().get_config(),
            "num_power_iter": self.num_power_iter,
            "reuse_forward_kernels": self.reuse_forward_kernels,
        }


def batchnorm_penalty(bn_layers):
    """``sum over BN layers of max_c |gamma_c|`` (float32); layers without a scale are skipped.

    All scales go through one concatenation and one segment max: per-layer reductions cost
    ~10 graph ops per layer with their gradients, ~2,000 in a paper config's step.
    """
    gammas = [
        tf.cast(layer.gamma, tf.float32)
        for layer in bn_layers
        if getattr(layer, "gamma", None) is not None
    ]
    if not gammas:
        return tf.constant(0.0, tf.float32)
    segments = np.repeat(np.arange(len(gammas)), [int(g.shape[0]) for g in gammas])
    # The unsorted form: XLA (jit_compile) has no kernel for the sorted SegmentMax.
    maxima = tf.math.unsorted_segment_max(tf.abs(tf.concat(gammas, 0)), segments, len(gammas))
    return tf.reduce_sum(maxima)
