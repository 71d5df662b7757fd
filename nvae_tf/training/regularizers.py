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

_NORMALIZE_EPS = 1e-3  # the original's normalization floor (docs/design.md#spectral-regularization)


def _normalize(x):
    return x / tf.maximum(tf.norm(x, axis=-1, keepdims=True), _NORMALIZE_EPS)


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
        self.u_vars, self.v_vars = [], []

    def build(self, input_shape=None):
        raise ValueError("SpectralRegularizer is built with build_for(conv_layers)")

    def build_for(self, conv_layers):
        """Create one (u, v) pair of stacked vectors per distinct kernel-matrix shape.

        Args:
          conv_layers: built layers with ``kernel_matrix()`` returning the transposed
            (cols, rows) weight matrix; ``u`` has one entry per row (output channel).
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
            cols, rows = layer.kernel_matrix().shape
            groups.setdefault((rows, cols), []).append(i)
        self._convs = _Refs(conv_layers)
        self._groups = tuple(tuple(idx) for idx in groups.values())
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
        # w_t per shape group: (layers, cols, rows) = W^T, so W^T u = w_t u and W v = v^T w_t.
        w_t = [
            tf.stack(
                [
                    tf.cast(
                        self._convs.items[i].kernel_matrix(self.reuse_forward_kernels), tf.float32
                    )
                    for i in idx
                ]
            )
            for idx in self._groups
        ]
        w_const = [tf.stop_gradient(w) for w in w_t]

        def step(i, us, vs):
            vs = [_normalize(tf.linalg.matvec(w, u)) for w, u in zip(w_const, us)]
            # W v as the row vector v^T W^T: oneDNN's transposed batched matvec is ~30% slower
            # on these memory-bound shapes.
            us = [_normalize(tf.matmul(v[:, None, :], w)[:, 0, :]) for w, v in zip(w_const, vs)]
            return i + 1, us, vs

        # One loop for all groups: one loop body to trace and run instead of one per group.
        _, us, vs = tf.while_loop(
            lambda i, us, vs: i < iters,
            step,
            (
                tf.constant(0),
                [tf.convert_to_tensor(u) for u in self.u_vars],
                [tf.convert_to_tensor(v) for v in self.v_vars],
            ),
        )
        total = tf.constant(0.0, tf.float32)
        for w, u, v, u_var, v_var in zip(w_t, us, vs, self.u_vars, self.v_vars):
            u_var.assign(u)
            v_var.assign(v)
            u, v = tf.stop_gradient(u), tf.stop_gradient(v)
            total += tf.reduce_sum(v * tf.linalg.matvec(w, u))
        self.initialized.assign(True)
        return total

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
    return tf.reduce_sum(tf.math.segment_max(tf.abs(tf.concat(gammas, 0)), segments))
