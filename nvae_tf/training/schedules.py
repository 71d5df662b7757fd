"""Step-dependent training coefficients: learning rate, KL warm-up beta, lambda.

See docs/design.md#learning-rate, docs/design.md#kl-warm-up and
docs/design.md#regularizer-weight.

All take the global step (the per-replica iteration count, 0-based, as the original's
``global_step``) and are written with TF ops so they work on a step variable inside
``tf.function``.
"""

import math

import keras
import tensorflow as tf


@keras.saving.register_keras_serializable(package="nvae_tf")
class NVAELearningRate(keras.optimizers.schedules.LearningRateSchedule):
    """NVAE's learning rate: per-iteration linear warm-up, then cosine stepped once per epoch.

    With ``W = warmup_epochs``, ``WI = W * steps_per_epoch``, ``T = epochs - W - 1`` and
    ``e = step // steps_per_epoch``::

        step < WI : lr = lr_max * step / WI                      (step 0 -> 0)
        otherwise : lr = lr_min + (lr_0 - lr_min) * (1 + cos(pi * k / T)) / 2,
                    k = clip(e - W, 0, T),  lr_0 = lr_max * (WI - 1) / WI  (lr_max if WI == 0)

    So epoch ``W`` keeps the last warm-up value ``lr_0``, the scheduler's first step happens at
    epoch ``W + 1`` and the last epoch ``epochs - 1`` (k = T) gets exactly ``lr_min``; steps
    past the end stay at ``lr_min``; ``T <= 0`` means no cosine epoch (``lr_0`` throughout).
    This matches the original exactly: ``CosineAnnealingLR.step()`` without an epoch uses
    PyTorch's recursive (chainable) form, started from the optimizer's current lr (the last
    warm-up value, not ``lr_max``), and its ratios telescope to the closed form above. The
    same formula with ``lr_max`` in place of ``lr_0`` is an approximation (relative gap 1/WI).
    """

    def __init__(self, learning_rate, learning_rate_min, warmup_epochs, epochs, steps_per_epoch):
        if steps_per_epoch < 1:
            raise ValueError(f"steps_per_epoch must be >= 1, got {steps_per_epoch}")
        self.learning_rate = float(learning_rate)
        self.learning_rate_min = float(learning_rate_min)
        self.warmup_epochs = int(warmup_epochs)
        self.epochs = int(epochs)
        self.steps_per_epoch = int(steps_per_epoch)

    def __call__(self, step):
        lr_max, lr_min = self.learning_rate, self.learning_rate_min
        warmup_iters = self.warmup_epochs * self.steps_per_epoch
        t_max = self.epochs - self.warmup_epochs - 1
        lr_0 = lr_max * (warmup_iters - 1) / warmup_iters if warmup_iters > 0 else lr_max

        step = tf.cast(step, tf.int64)
        epoch = step // self.steps_per_epoch
        if t_max > 0:
            k = tf.cast(tf.clip_by_value(epoch - self.warmup_epochs, 0, t_max), tf.float64)
            cosine = lr_min + (lr_0 - lr_min) * (1.0 + tf.cos(math.pi * k / t_max)) / 2.0
        else:
            cosine = tf.constant(lr_0, tf.float64)
        if warmup_iters > 0:
            warm = lr_max * tf.cast(step, tf.float64) / warmup_iters
            lr = tf.where(step < warmup_iters, warm, cosine)
        else:
            lr = cosine
        return tf.cast(lr, tf.float32)

    def get_config(self):
        return {
            "learning_rate": self.learning_rate,
            "learning_rate_min": self.learning_rate_min,
            "warmup_epochs": self.warmup_epochs,
            "epochs": self.epochs,
            "steps_per_epoch": self.steps_per_epoch,
        }


def kl_coefficient(step, total_steps, anneal_portion=0.3, const_portion=1e-4, min_coeff=1e-4):
    """KL warm-up beta (docs/design.md#kl-warm-up): ``max(min((step - c) / A, 1), min_coeff)``.

    ``A = anneal_portion * total_steps``, ``c = const_portion * total_steps``; ``total_steps``
    is epochs times the per-replica steps per epoch, as in the original. ``A == 0`` gives 1
    (no warm-up) instead of dividing by zero. Returns a float32 scalar tensor.
    """
    step = tf.cast(step, tf.float32)
    total_steps = tf.cast(total_steps, tf.float32)
    anneal = anneal_portion * total_steps
    const = const_portion * total_steps
    ramp = tf.where(anneal > 0, (step - const) / tf.maximum(anneal, 1e-30), 1.0)
    return tf.maximum(tf.minimum(ramp, 1.0), min_coeff)


def regularizer_weight(beta, weight_decay_norm, anneal, weight_decay_norm_init):
    """Weight lambda of the spectral and BN regularizers (paper App. A), float32 scalar tensor.

    Without ``anneal`` it is the constant ``weight_decay_norm``. With it, the geometric
    interpolation ``exp((1 - beta) * ln(init) + beta * ln(final))`` tied to the KL coefficient
    ``beta``: ``weight_decay_norm_init`` at beta = 0, ``weight_decay_norm`` once beta = 1.
    """
    if not anneal:
        return tf.constant(weight_decay_norm, tf.float32)
    beta = tf.cast(beta, tf.float32)
    log_init = tf.math.log(tf.constant(weight_decay_norm_init, tf.float32))
    log_final = tf.math.log(tf.constant(weight_decay_norm, tf.float32))
    return tf.exp((1.0 - beta) * log_init + beta * log_final)
