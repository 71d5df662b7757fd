"""Inverse autoregressive flows on the approximate posterior (paper §3.2; docs/design.md#flows).

NVAE applies ``num_nf`` pairs of volume-preserving shift flows to every group's posterior
sample: ``z <- z - mu(z)`` where ``mu`` is a masked (autoregressive) conv net, so ``mu`` at
position ``(h, w, c)`` sees only raster-earlier pixels and, at the same pixel, channels
``< c``. The Jacobian is unit lower-triangular, the log-det is exactly 0. Each pair is one
cell in raster order followed by one "mirrored" cell (spatial mask flipped in H and W, channel
order kept). The masked convs are Keras 3 layers (TFP's ``AutoregressiveNetwork`` is a tf-keras
object whose weights Keras 3 would not track); ``shift_iaf`` hands them to TFP as a bijector.
"""

import math

import keras
import numpy as np
import tensorflow as tf
import tensorflow_probability as tfp

from nvae_tf.layers.tracking import CheckpointListsMixin
from nvae_tf.layers.weight_norm import Conv2D

tfb = tfp.bijectors


def _channel_mask(in_channels, out_channels, zero_diag):
    """Centre-tap mask, (Cout, Cin), as the original ``channel_mask`` for dense convs."""
    if in_channels % out_channels and out_channels % in_channels:
        raise ValueError(
            f"masked conv needs one of Cin={in_channels}, Cout={out_channels} to divide the other"
        )
    mask = np.ones((out_channels, in_channels), np.float32)
    if out_channels >= in_channels:
        # Output block i (ratio r channels) sees input channels < i (and i itself unless
        # zero_diag).
        r = out_channels // in_channels
        for i in range(in_channels):
            mask[i * r : (i + 1) * r, i if zero_diag else i + 1 :] = 0.0
    else:
        # Output i sees input blocks < i (and block i unless zero_diag), blocks of r channels.
        r = in_channels // out_channels
        for i in range(out_channels):
            mask[i, i * r if zero_diag else (i + 1) * r :] = 0.0
    return mask


def conv_mask(kernel_size, in_channels, out_channels, zero_diag, mirror, depthwise=False):
    """Autoregressive kernel mask in TF layout: (k, k, Cin, Cout), or (k, k, C, 1) if depthwise.

    All taps in rows above the centre and left of the centre in the centre row are open; the
    centre tap carries the channel mask (depthwise: 1, or 0 with ``zero_diag``). ``mirror`` flips
    the spatial mask in H and W (reversed raster order) and keeps the channel order.
    """
    k = int(kernel_size)
    m = (k - 1) // 2
    spatial = np.zeros((k, k), np.float32)
    spatial[:m, :] = 1.0
    spatial[m, :m] = 1.0
    if depthwise:
        if in_channels != out_channels:
            raise ValueError(f"depthwise mask needs Cin == Cout ({in_channels} != {out_channels})")
        mask = np.repeat(spatial[:, :, None, None], in_channels, axis=2)
        mask[m, m] = 0.0 if zero_diag else 1.0
    else:
        mask = np.tile(spatial[:, :, None, None], (1, 1, in_channels, out_channels))
        mask[m, m] = _channel_mask(in_channels, out_channels, zero_diag).T
    if mirror:
        mask = mask[::-1, ::-1]
    return np.ascontiguousarray(mask)


@keras.saving.register_keras_serializable(package="nvae_tf")
class MaskedConv2D(Conv2D):
    """Weight-normalized autoregressive conv (the original ``ARConv2d``), stride 1.

    The mask (``conv_mask``) multiplies the raw kernel before the weight norm, so masked taps
    are exactly zero and the initial log-norm is that of the masked kernel.

    Args:
      filters: output channels (== input channels if ``depthwise``).
      kernel_size: odd square kernel size.
      zero_diag: close the centre tap's diagonal channel block (strict autoregression).
      mirror: reverse the spatial (raster) order.
      use_bias, depthwise, log_g_offset: as in ``Conv2D``.
    """

    def __init__(
        self,
        filters,
        kernel_size,
        zero_diag=False,
        mirror=False,
        use_bias=True,
        depthwise=False,
        log_g_offset=0.0,
        **kwargs,
    ):
        super().__init__(
            filters,
            kernel_size,
            strides=1,
            use_bias=use_bias,
            weight_norm=True,
            depthwise=depthwise,
            log_g_offset=log_g_offset,
            **kwargs,
        )
        self.zero_diag = bool(zero_diag)
        self.mirror = bool(mirror)

    def kernel_mask(self, in_channels):
        return conv_mask(
            self.kernel_size, in_channels, self.filters, self.zero_diag, self.mirror, self.depthwise
        )

    def get_config(self):
        config = super().get_config()
        del config["strides"], config["weight_norm"]
        return {**config, "zero_diag": self.zero_diag, "mirror": self.mirror}


@keras.saving.register_keras_serializable(package="nvae_tf")
class AutoregressiveShift(keras.layers.Layer):
    """One IAF cell (the original ``CellAR``): ``z -> z - mu(z)``, log-det 0.

    ``mu`` = masked 3x3 conv C -> C*expansion (no bias, zero_diag), ELU, masked depthwise 5x5
    (no bias), ELU, then the mu head: ELU again and a masked 1x1 conv back to C (bias, weights
    scaled by 0.1 at init through ``log_g_offset=-log(10)``).

    Args:
      channels: latent channels C (20 in NVAE).
      expansion: hidden expansion ratio (6 in NVAE).
      mirror: reversed raster order (the second cell of each pair).
    """

    def __init__(self, channels=20, expansion=6, mirror=False, **kwargs):
        # z stays float32 under mixed precision (as the original); only mu runs in the
        # compute dtype.
        kwargs.setdefault("autocast", False)
        super().__init__(**kwargs)
        self.channels = int(channels)
        self.expansion = int(expansion)
        self.mirror = bool(mirror)
        hidden = self.channels * self.expansion
        self.conv_in = MaskedConv2D(
            hidden, 3, zero_diag=True, mirror=self.mirror, use_bias=False, name="conv_in"
        )
        self.conv_dw = MaskedConv2D(
            hidden, 5, mirror=self.mirror, use_bias=False, depthwise=True, name="conv_dw"
        )
        self.conv_mu = MaskedConv2D(
            self.channels,
            1,
            mirror=self.mirror,
            use_bias=True,
            log_g_offset=-math.log(10.0),
            name="conv_mu",
        )

    def build(self, input_shape):
        if int(input_shape[-1]) != self.channels:
            raise ValueError(f"expected {self.channels} channels, got {input_shape[-1]}")
        hidden_shape = tuple(input_shape[:-1]) + (self.channels * self.expansion,)
        self.conv_in.build(input_shape)
        self.conv_dw.build(hidden_shape)
        self.conv_mu.build(hidden_shape)

    def shift(self, z):
        """The autoregressive shift ``mu(z)``."""
        s = tf.nn.elu(self.conv_in(tf.cast(z, self.compute_dtype)))
        s = tf.nn.elu(self.conv_dw(s))
        # The mu head applies ELU once more: a double ELU in a row, a known quirk of the
        # original (NVlabs/NVAE issue #25) kept there, and here, so the architecture matches its
        # checkpoints (docs/design.md#original-quirks-we-keep).
        return self.conv_mu(tf.nn.elu(s))

    def call(self, z):
        return z - tf.cast(self.shift(z), z.dtype)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {
            **super().get_config(),
            "channels": self.channels,
            "expansion": self.expansion,
            "mirror": self.mirror,
        }


def _on_4d(fn, x):
    """Apply an NHWC function to ``x`` with any number of leading sample/batch dims."""
    shape = tf.shape(x)
    y = fn(tf.reshape(x, tf.concat([[-1], shape[-3:]], axis=0)))
    return tf.reshape(y, shape)


def shift_iaf(cell: "AutoregressiveShift", name: str = "shift_iaf") -> tfb.Bijector:
    """One IAF cell ``z -> z - mu(z)`` as a TFP bijector (event (H, W, C), log-det 0).

    TFP's shift-only ``MaskedAutoregressiveFlow`` maps ``y -> y - mu(y)`` in its (fast)
    inverse, so the cell is that flow inverted; its forward, the cell's inverse, is solved
    autoregressively by TFP (H*W*C passes: cheap for checks, NVAE never inverts its flows).
    """
    if not cell.built:  # its variables cannot be created inside TFP's inversion loop
        cell.build((None, None, None, cell.channels))

    def shift(y):
        return tf.cast(_on_4d(cell.shift, y), y.dtype), None

    return tfb.Invert(
        tfb.MaskedAutoregressiveFlow(shift_and_log_scale_fn=shift, event_ndims=3), name=name
    )


@keras.saving.register_keras_serializable(package="nvae_tf")
class PosteriorFlow(CheckpointListsMixin, keras.layers.Layer):
    """The ``num_pairs`` IAF pairs of one latent group (the original's ``num_nf`` pairs).

    Cells alternate normal / mirrored raster order. ``call(z)`` returns ``(z_out, log_det)``
    with ``log_det`` the per-sample log |det dz_out/dz| (all zeros, float32, shape (B,)):
    ``log q(z_out) = log q(z) - log_det``.

    Args:
      num_pairs: number of (normal, mirrored) cell pairs.
      channels: latent channels per group.
      expansion: hidden expansion ratio of each cell.
    """

    def __init__(self, num_pairs, channels=20, expansion=6, **kwargs):
        kwargs.setdefault("autocast", False)  # keep z in float32 (see AutoregressiveShift)
        super().__init__(**kwargs)
        self.num_pairs = int(num_pairs)
        self.channels = int(channels)
        self.expansion = int(expansion)
        # The cells in application order: normal, mirrored, normal, ...
        self.cells = [
            AutoregressiveShift(self.channels, self.expansion, mirror=bool(i % 2), name=f"cell_{i}")
            for i in range(2 * self.num_pairs)
        ]

    def build(self, input_shape):
        for cell in self.cells:
            cell.build(input_shape)

    def call(self, z):
        for cell in self.cells:
            z = cell(z)
        return z, tf.zeros(tf.shape(z)[:1], tf.float32)

    def bijector(self):
        """The flow as a ``tfb.Chain`` of ``shift_iaf`` cells (Chain applies its list last-first)."""
        return tfb.Chain(
            [
                shift_iaf(cell, name=f"shift_iaf_{i}")
                for i, cell in reversed(list(enumerate(self.cells)))
            ],
            name="posterior_flow",
        )

    def compute_output_shape(self, input_shape):
        return input_shape, (input_shape[0],)

    def get_config(self):
        return {
            **super().get_config(),
            "num_pairs": self.num_pairs,
            "channels": self.channels,
            "expansion": self.expansion,
        }
