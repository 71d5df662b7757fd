"""An optimizer wrapper that skips non-finite steps on every replica, with optional loss scaling.

Keras' ``LossScaleOptimizer`` already skips a step whose gradients are not finite, inside the
distribution-safe control flow that ``tf.distribute`` needs. Two things are added:
  * the finiteness test is all-reduced, so a NaN on any replica skips the step on all of them
    (Keras tests each replica's local, not yet reduced, gradients);
  * a fixed scale of 1 when dynamic scaling is off (float32 / bfloat16), where a skip must
    not shrink the scale.
It counts skipped steps (total and consecutive) so training can be stopped when stuck, and
drives the learning-rate schedule by the run's global step (applied + skipped steps: the batches
consumed, as the original's per-batch scheduler), times ``learning_rate_scale`` (lowered by a
rollback, see ``nvae_tf.training.rollback``). All of it is checkpointed with the optimizer.
"""

import contextlib

import keras
import tensorflow as tf

from nvae_tf import graph_optimization
from nvae_tf.training.optimizer import NVAEAdamax
from nvae_tf.training.schedules import NVAELearningRate

INITIAL_LOSS_SCALE = 2.0**10  # as the original (docs/design.md#mixed-precision-and-memory)
STACK_AT_MOST = 2**16  # elements of a tensor that global_norm stacks with its same-shape peers


def global_norm(tensors):
    """``tf.linalg.global_norm`` (None entries skipped) in far fewer graph ops.

    TensorFlow takes one ``L2Loss`` per tensor: ~1,300 ops for NVAE's gradients, most of them
    biases, BN scales and weight-norm gains of a few dozen shapes. Tensors of up to
    ``STACK_AT_MOST`` elements are stacked by shape and dtype (copying ~12 MB on MNIST's
    paper config), larger ones keep their own ``L2Loss``. Equal to rounding.
    """
    groups = {}
    for t in tensors:
        if t is not None:
            small = t.shape.num_elements() is not None and t.shape.num_elements() <= STACK_AT_MOST
            key = (tuple(t.shape), t.dtype) if small else object()  # its own group
            groups.setdefault(key, []).append(t)
    halves = [
        tf.cast(tf.nn.l2_loss(ts[0] if len(ts) == 1 else tf.stack(ts)), tf.float32)
        for ts in groups.values()
    ]
    return tf.sqrt(2.0 * tf.add_n(halves)) if halves else tf.constant(0.0)


@keras.saving.register_keras_serializable(package="nvae_tf")
class GuardedOptimizer(keras.optimizers.LossScaleOptimizer):
    """Wraps ``inner_optimizer``; ``dynamic=True`` for float16 dynamic loss scaling."""

    def __init__(
        self,
        inner_optimizer,
        dynamic=False,
        initial_scale=INITIAL_LOSS_SCALE,
        dynamic_growth_steps=2000,
        **kwargs,
    ):
        super().__init__(
            inner_optimizer,
            initial_scale=initial_scale if dynamic else 1.0,
            dynamic_growth_steps=dynamic_growth_steps,
            **kwargs,
        )
        self.dynamic = bool(dynamic)
        self._known_global_norm = None  # set for the duration of one ``apply``

    def build(self, var_list):
        if self.built:
            return
        super().build(var_list)
        self.skipped_steps = self.add_variable(
            (), initializer="zeros", dtype="int64", name="skipped_steps"
        )
        self.consecutive_skips = self.add_variable(
            (), initializer="zeros", dtype="int64", name="consecutive_skips"
        )
        self.learning_rate_scale = self.add_variable(
            (), initializer="ones", dtype="float32", name="learning_rate_scale"
        )
        self.rollbacks = self.add_variable((), initializer="zeros", dtype="int64", name="rollbacks")
        inner = self.inner_optimizer
        if hasattr(inner, "learning_rate_at"):
            inner.learning_rate_fn = lambda: (
                inner.learning_rate_at(self.global_step()) * self.learning_rate_scale
            )

    def global_step(self):
        """Batches consumed (int64 tensor): applied steps plus skipped ones."""
        return tf.cast(self.iterations, tf.int64) + self.skipped_steps

    def apply(self, grads, trainable_variables=None, global_norm=None):
        """Keras' ``apply``; ``global_norm``, when the caller has it already, is the one the
        finiteness test uses (one norm per step instead of two: ~1,300 graph ops each in a
        paper config). Ignored with several replicas, whose threads share this object."""
        ctx = tf.distribute.get_replica_context()
        one_replica = ctx is not None and ctx.num_replicas_in_sync == 1
        self._known_global_norm = global_norm if one_replica else None
        # Keras' skip-or-apply cond captures every gradient and variable: kept functional, it
        # spares Grappler ~5,000 nodes (see functional_control_flow).
        lean = (
            graph_optimization.functional_control_flow()
            if one_replica
            else contextlib.nullcontext()
        )
        try:
            with lean:
                return super().apply(grads, trainable_variables)
        finally:
            self._known_global_norm = None

    def check_finite(self, grads):
        # One test of the global norm instead of Keras' two ops per gradient (thousands of graph
        # ops here): any NaN or Inf makes it non-finite, as does a norm beyond float32's range
        # (~1.8e19), a step that would have to be skipped anyway.
        norm = self._known_global_norm
        if norm is None:
            norm = global_norm(grads)
        finite = tf.math.is_finite(norm)
        ctx = tf.distribute.get_replica_context()
        if ctx is not None and ctx.num_replicas_in_sync > 1:
            bad = ctx.all_reduce(tf.distribute.ReduceOp.SUM, 1.0 - tf.cast(finite, tf.float32))
            finite = tf.equal(bad, 0.0)
        return finite

    def _stateful_handle_finite_grads(self, grads, trainable_variables):
        self.consecutive_skips.assign(0)
        if self.dynamic:
            return super()._stateful_handle_finite_grads(grads, trainable_variables)
        self.inner_optimizer.apply(grads, trainable_variables=trainable_variables)

    def _stateful_handle_non_finite_grads(self):
        self.skipped_steps.assign_add(1)
        self.consecutive_skips.assign_add(1)
        if self.dynamic:
            super()._stateful_handle_non_finite_grads()

    def get_config(self):
        return {**super().get_config(), "dynamic": self.dynamic}


def schedule_step(optimizer):
    """The step the KL and lambda schedules follow: the run's global step when the optimizer
    counts skipped steps (a ``GuardedOptimizer``), else its applied steps."""
    if getattr(optimizer, "skipped_steps", None) is not None:
        return optimizer.global_step()
    return optimizer.iterations


@contextlib.contextmanager
def ema_weights(model):
    """Temporarily swap in the EMA of the weights when the run keeps one."""
    if not model.config.ema_decay:
        yield
        return
    backup = [v.numpy() for v in model.trainable_variables]
    model.optimizer.finalize_variable_values(model.trainable_variables)
    try:
        yield
    finally:
        for variable, value in zip(model.trainable_variables, backup):
            variable.assign(value)


def make_optimizer(config, steps_per_epoch):
    """NVAE's Adamax with warm-up + cosine learning rate (docs/design.md#optimizer), guarded."""
    schedule = NVAELearningRate(
        config.learning_rate,
        config.learning_rate_min,
        config.warmup_epochs,
        config.epochs,
        steps_per_epoch,
    )
    inner = NVAEAdamax(
        learning_rate=schedule,
        epsilon=config.adamax_epsilon,
        l2_decay=config.weight_decay,
        global_clipnorm=config.grad_clip_norm or None,
        use_ema=config.ema_decay > 0,
        ema_momentum=config.ema_decay or 0.99,
    )
    return GuardedOptimizer(inner, dynamic=config.precision == "mixed_float16")
