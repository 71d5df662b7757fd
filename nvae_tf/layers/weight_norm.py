"""Weight-normalized 2-D convolution (paper App. A), the conv used throughout NVAE.

Keras 3 has no weight-norm layer, so this is our own: the effective kernel is
``exp(log_g) * v / (||v|| + 1e-5)`` per output channel, with ``log_g`` initialised to
``log(||v_init|| + 0.01)`` so that the layer starts at PyTorch's default init. The same
layer with ``weight_norm=False`` is the plain conv used inside the decoder cells; both expose
``kernel_matrix()`` for the spectral regularizer. See docs/design.md#weight-normalization.
"""

import contextlib
import math

import keras
import numpy as np
import tensorflow as tf

from nvae_tf.layers import lean_gradient, linear_ops
from nvae_tf.layers.depthwise import depthwise_conv2d_same

_NORM_EPS = 1e-5


def torch_uniform(fan_in):
    """PyTorch's default conv init, U(+-1/sqrt(fan_in)) (kaiming-uniform with a=sqrt(5))."""
    return SymmetricUniform(1.0 / math.sqrt(fan_in))


def _initial_value(value, dtype=None):
    """A NumPy initial value as float32, or cast to ``dtype`` when that is another type."""
    value = np.asarray(value, np.float32)
    dtype = keras.backend.standardize_dtype(dtype or "float32")
    return value if dtype == "float32" else keras.ops.cast(value, dtype)


@keras.saving.register_keras_serializable(package="nvae_tf")
class SymmetricUniform(keras.initializers.Initializer):
    """U(-bound, bound), drawn by NumPy's global generator (``keras.utils.set_random_seed``
    seeds it).

    Keras' ``RandomUniform`` runs ~6 eager TensorFlow ops per variable (its seed generator's
    update, the draw, the scaling): ~1 ms each, over a second of building a paper config with
    its >1,000 such variables. The same distribution, not the same numbers.
    """

    def __init__(self, bound):
        self.bound = float(bound)

    def __call__(self, shape, dtype=None):
        return _initial_value(np.random.uniform(-self.bound, self.bound, shape), dtype)

    def get_config(self):
        return {"bound": self.bound}


def kernel_norm(kernel, axes):
    """L2 norm of ``kernel`` over ``axes``, kept as size-1 dimensions."""
    return tf.sqrt(tf.reduce_sum(tf.square(kernel), axis=axes, keepdims=True))


def weight_normalize(v, log_g, axes):
    """``exp(log_g) * v / (||v|| + 1e-5)``, the norm over ``axes`` (one per output channel).

    ``log_g`` has ``v``'s shape without ``axes``: (Cout,) for one kernel, (N, Cout) for N
    stacked kernels. With a hand-written gradient: autodiff of the formula takes ~50 graph ops
    per conv, this ~20, and NVAE has hundreds of convs, weight-normalized every step. With
    ``g = exp(log_g)``, ``n = ||v||``, ``s = g / (n + eps)`` and ``d = <dw, w>`` per channel:
    ``dv = s * dw - w * d / (g * n)`` (the textbook ``s * (dw - v * <dw, v> / (n * (n + eps)))``
    with ``v = w / s``) and ``dlog_g = d``. Written with ``w``, which the convs keep for their
    own gradients anyway, rather than ``v``: ``v`` is then free after the forward pass (MNIST's
    paper config: ~90 MB less at the step's peak).
    """
    g_shape = [1 if i in axes else d for i, d in enumerate(v.shape)]

    @lean_gradient.custom_gradient
    def normalize(v, log_g):
        axes_t = tf.constant(axes)  # one constant for the three reductions
        n = kernel_norm(v, axes_t)
        g = tf.reshape(tf.exp(log_g), g_shape)
        scale = g / (n + _NORM_EPS)
        w = v * scale

        def grad(dw):
            dot = tf.reduce_sum(dw * w, axis=axes_t, keepdims=True)
            dv = scale * dw - w * tf.math.divide_no_nan(dot, g * n)  # g underflowed: 0
            return dv, tf.reshape(dot, log_g.shape)

        return w, grad

    return normalize(v, log_g)


@contextlib.contextmanager
def normalized_together(layers):
    """Within the block, ``layers``' weight-normalized convs take kernels normalized together.

    Kernels of one shape are stacked and normalized by one ``weight_normalize``, then handed
    to their layers' next calls in the same graph and replica: the same values and gradients
    as each conv normalizing its own kernel, with ~25 graph ops fewer per conv (MNIST paper
    config: 150 convs in 21 shapes), which is tracing and Grappler time at start-up. Every
    given layer must be called in the block: an uncalled one would get zero gradients instead
    of none. Not under ``tf.recompute_grad``, which does not differentiate captured tensors.
    """
    groups = {}
    for layer in layers:
        if layer.weight_norm:
            groups.setdefault((tuple(layer.kernel.shape), layer.depthwise), []).append(layer)
    for group in groups.values():
        axes = tuple(a + 1 for a in group[0]._norm_axes())
        v = tf.stack([layer._masked_kernel() for layer in group])
        log_g = tf.stack([tf.convert_to_tensor(layer.log_g) for layer in group])
        stack = weight_normalize(v, log_g, axes)
        group[0]._group_stack.set((tuple(id(layer) for layer in group), stack))
        for layer, kernel in zip(group, tf.unstack(stack)):
            layer._given_kernel.set(kernel)
    try:
        yield
    finally:
        for group in groups.values():
            for layer in group:
                layer._given_kernel.clear()


def normalized_stack(layers):
    """The kernels of ``layers`` as ``normalized_together`` last stacked them in the graph and
    replica traced now, when ``layers`` are exactly one of its shape groups; else None.

    Lets the spectral regularizer take a group's matrices with one reshape of the stack
    instead of a reshape per conv, a new stack and their gradients (same values)."""
    last = layers[0]._group_stack.get() if layers else None
    if last is None or last[0] != tuple(id(layer) for layer in layers):
        return None
    return last[1]


class _LastKernel:
    """A value set while tracing, and where: a conv's last effective kernel, one given to it,
    or (on a group's first conv) the stack ``normalized_together`` built for the group."""

    key = None
    value = None

    def set(self, value):
        self.key, self.value = _trace_key(), value

    def get(self):
        """The value if it was set in the graph and replica being traced now, else None."""
        return self.value if self.key is not None and self.key == _trace_key() else None

    def clear(self):
        self.key = self.value = None


def _trace_key():
    """The graph and replica being traced (None when executing eagerly)."""
    if tf.executing_eagerly():
        return None
    return (tf.compat.v1.get_default_graph(), id(tf.distribute.get_replica_context()))


@keras.saving.register_keras_serializable(package="nvae_tf")
class Conv2D(keras.layers.Layer):
    """NHWC conv with symmetric zero padding ``kernel_size // 2`` (PyTorch ``padding=k//2``).

    Args:
      filters: output channels.
      kernel_size: odd square kernel size.
      strides: 1 or 2.
      use_bias: add a bias.
      weight_norm: weight-normalize the kernel (paper App. A); False gives a plain conv.
      depthwise: depthwise conv (``groups == channels``); then ``filters`` must equal the input
        channels.
      log_g_offset: added to the initial log-norm; flows use ``-log(10)`` (docs/design.md#flows).
    """

    def __init__(
        self,
        filters,
        kernel_size,
        strides=1,
        use_bias=True,
        weight_norm=True,
        depthwise=False,
        log_g_offset=0.0,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if kernel_size % 2 != 1:
            raise ValueError(f"kernel_size must be odd, got {kernel_size}")
        if strides not in (1, 2):
            raise ValueError(f"strides must be 1 or 2, got {strides}")
        self.filters = int(filters)
        self.kernel_size = int(kernel_size)
        self.strides = int(strides)
        self.use_bias = bool(use_bias)
        self.weight_norm = bool(weight_norm)
        self.depthwise = bool(depthwise)
        self.log_g_offset = float(log_g_offset)
        self._forward_kernel = _LastKernel()
        self._given_kernel = _LastKernel()  # from normalized_together
        self._group_stack = _LastKernel()  # (layer ids, stack) of the group this layer leads

    def kernel_mask(self, in_channels):
        """Multiplicative kernel mask (None = unmasked); masked subclasses override it."""
        return None

    def build(self, input_shape):
        cin = int(input_shape[-1])
        k = self.kernel_size
        if self.depthwise:
            if self.filters != cin:
                raise ValueError(
                    f"depthwise conv needs filters == input channels ({self.filters} != {cin})"
                )
            shape, fan_in = (k, k, cin, 1), k * k
        else:
            shape, fan_in = (k, k, cin, self.filters), cin * k * k
        self.in_channels = cin
        self._mask = self.kernel_mask(cin)
        # autocast=False: under mixed precision the weight norm runs in float32 (as the
        # original) and only the effective kernel is cast to the compute dtype.
        self.kernel = self.add_weight(
            name="kernel", shape=shape, initializer=torch_uniform(fan_in), autocast=False
        )
        if self.weight_norm:
            self.log_g = self.add_weight(
                name="log_g", shape=(self.filters,), initializer=self._initial_log_g, autocast=False
            )
        if self.use_bias:
            self.bias = self.add_weight(
                name="bias", shape=(self.filters,), initializer=torch_uniform(fan_in)
            )

    def _initial_log_g(self, shape, dtype=None):
        """log(||v_init|| + 0.01): the effective kernel starts equal to the raw init."""
        with tf.init_scope():  # eager even when Keras builds inside a scratch graph
            kernel = self.kernel.numpy()  # in NumPy: no eager ops per conv
        if self._mask is not None:
            kernel = kernel * self._mask
        norm = np.sqrt(np.sum(np.square(kernel), axis=self._norm_axes())).reshape(-1)
        return _initial_value(np.log(norm + 0.01) + self.log_g_offset, dtype)

    def _masked_kernel(self):
        kernel = tf.convert_to_tensor(self.kernel)
        return kernel if self._mask is None else kernel * self._mask

    def _norm_axes(self):
        # Per output channel: over (kh, kw, Cin) for dense kernels, over (kh, kw) for depthwise.
        return (0, 1, 3) if self.depthwise else (0, 1, 2)

    def effective_kernel(self):
        """The kernel actually convolved, in float32 (masked, then weight-normalized)."""
        v = self._masked_kernel()
        if not self.weight_norm:
            return v
        return weight_normalize(v, tf.convert_to_tensor(self.log_g), self._norm_axes())

    @property
    def kernel_matrix_shape(self):
        """``kernel_matrix()``'s shape, without computing it."""
        return (self.kernel.shape.num_elements() // self.filters, self.filters)

    def kernel_matrix(self, reuse_forward=False):
        """Effective kernel as a (Cin/groups * kh * kw, Cout) matrix, for spectral norms.

        The transpose of PyTorch's (Cout, Cin/groups * kh * kw) weight matrix up to a column
        order (same singular values), obtained by a free reshape rather than a transpose.
        With ``reuse_forward``, the kernel this layer's last call computed in the same graph
        and replica is reused when there is one, so that a training step weight-normalizes each
        kernel once (the tensor is the same, and so are the gradients through it).
        """
        last = self._forward_kernel.get() if reuse_forward else None
        if last is None:
            last = self.effective_kernel()
        return tf.reshape(last, (-1, self.filters))

    def call(self, x, subsampled=False):
        """``subsampled``: ``x`` holds just the pixels a 1x1 stride-2 conv reads (every other
        row and column); they are convolved with stride 1."""
        if subsampled and (self.kernel_size != 1 or self.depthwise):
            raise ValueError("subsampled inputs are for 1x1 dense convs")
        kernel = self._call_kernel(x.dtype)
        bias = tf.cast(self.bias, x.dtype) if self.use_bias else None
        if (self.strides == 1 or subsampled) and self.kernel_size == 1 and not self.depthwise:
            return linear_ops.pointwise_conv2d(x, kernel, bias)
        p = self.kernel_size // 2
        if self.strides == 1:
            # "SAME" is the symmetric k // 2 padding here and takes oneDNN's fast kernels;
            # explicit paddings fall back to slower ones on CPU.
            y = (
                depthwise_conv2d_same(x, kernel)
                if self.depthwise
                else tf.nn.conv2d(x, kernel, 1, "SAME")
            )
        else:
            if p:
                x = tf.pad(x, [[0, 0], [p, p], [p, p], [0, 0]])
            y = (
                tf.nn.depthwise_conv2d(x, kernel, (1, 2, 2, 1), "VALID")
                if self.depthwise
                else tf.nn.conv2d(x, kernel, 2, "VALID")
            )
        return y if bias is None else tf.nn.bias_add(y, bias)

    def as_linear_op(self):
        """``(op, kernel)`` (``layers/linear_ops.py``, float32) standing for this conv's next
        call without its bias, or None for strided convs and even kernels."""
        if self.strides != 1 or self.kernel_size % 2 == 0:
            return None
        if self.depthwise:
            op = linear_ops.DepthwiseSame
        else:
            op = linear_ops.Pointwise if self.kernel_size == 1 else linear_ops.DenseSame
        return op, self._call_kernel(tf.float32)

    def _call_kernel(self, dtype):
        """The kernel of a call: given by ``normalized_together`` or computed here; recorded
        for the spectral regularizer."""
        kernel = self._given_kernel.get()
        if kernel is None:
            kernel = self.effective_kernel()
        self._forward_kernel.set(kernel)
        return tf.cast(kernel, dtype)

    def compute_output_shape(self, input_shape):
        b, h, w, _ = input_shape
        s = self.strides
        return (
            b,
            None if h is None else (h + s - 1) // s,
            None if w is None else (w + s - 1) // s,
            self.filters,
        )

    def get_config(self):
        return {
            **super().get_config(),
            "filters": self.filters,
            "kernel_size": self.kernel_size,
            "strides": self.strides,
            "use_bias": self.use_bias,
            "weight_norm": self.weight_norm,
            "depthwise": self.depthwise,
            "log_g_offset": self.log_g_offset,
        }
