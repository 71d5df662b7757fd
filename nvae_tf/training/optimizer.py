"""Adamax as the original's ``thirdparty/adamax.py`` computes it (docs/design.md#optimizer).

Keras' ``Adamax`` differs in two ways that matter for matching the original's dynamics: it
divides by ``u + eps`` (NVAE puts eps inside the max, ``u = max(b2*u, |g| + eps)``, with a large
eps of 1e-3), and its ``weight_decay`` is decoupled (AdamW style), while NVAE adds an L2 term to
the gradient before the moment updates. Hence this optimizer.

It also sums the gradients over replicas BEFORE clipping: Keras clips each replica's local
gradient and sums afterwards, so ``global_clipnorm`` would act on the wrong norm under
``tf.distribute`` and results would depend on the number of replicas.
"""

import keras
import tensorflow as tf


@keras.saving.register_keras_serializable(package="nvae_tf")
class NVAEAdamax(keras.optimizers.Optimizer):
    """Adamax with eps inside the max and coupled L2 weight decay on every variable.

    Per variable ``p`` with gradient ``g`` at step ``t`` (1-based)::

        g = g + l2_decay * p
        m = b1 * m + (1 - b1) * g
        u = max(b2 * u, |g| + eps)
        p = p - lr / (1 - b1**t) * m / u

    The decay covers all variables the optimizer is given (BN, biases, log-norms, ``h``), as in
    the original. Clipping, EMA, loss-scale wrapping and schedules come from the Keras base
    class; its own (decoupled) ``weight_decay`` is refused. Slots take the variable's dtype,
    i.e. float32 under the ``mixed_float16`` policy, where Keras keeps variables in float32.

    Args:
      learning_rate: float or ``LearningRateSchedule`` (the original's default 1e-2).
      beta_1: first-moment decay.
      beta_2: infinity-norm decay.
      epsilon: added to ``|g|`` inside the max (PyTorch semantics, NVAE uses 1e-3).
      l2_decay: coupled L2 coefficient (``--weight_decay``, default 3e-4).
      **kwargs: base ``keras.optimizers.Optimizer`` arguments (``clipnorm``,
        ``global_clipnorm``, ``use_ema``, ``ema_momentum``, ``name``, ...).
    """

    def __init__(
        self, learning_rate=1e-2, beta_1=0.9, beta_2=0.999, epsilon=1e-3, l2_decay=3e-4, **kwargs
    ):
        if kwargs.pop("weight_decay", None) is not None:
            raise ValueError(
                "NVAEAdamax uses coupled L2 decay: pass `l2_decay`, not the base "
                "class's decoupled `weight_decay`."
            )
        kwargs.setdefault("name", "nvae_adamax")
        super().__init__(learning_rate=learning_rate, weight_decay=None, **kwargs)
        self.beta_1 = beta_1
        self.beta_2 = beta_2
        self.epsilon = epsilon
        self.l2_decay = l2_decay
        # Set by ``GuardedOptimizer``: the rate at the run's global step (skipped steps count).
        self.learning_rate_fn = None

    def learning_rate_at(self, step):
        """The rate at ``step``: the schedule's value there, or the fixed rate."""
        if isinstance(self._learning_rate, keras.optimizers.schedules.LearningRateSchedule):
            return self._learning_rate(step)
        return super()._get_current_learning_rate()

    def _get_current_learning_rate(self):
        if self.learning_rate_fn is not None:
            return self.learning_rate_fn()
        return super()._get_current_learning_rate()

    def build(self, var_list):
        """Create the first-moment ``m`` and infinity-norm ``u`` slots (zeros): one pair per
        shape, each slot the stack of that shape's variables (see ``_grouped_update``)."""
        if self.built:
            return
        super().build(var_list)
        groups = {}
        for i, v in enumerate(var_list):
            groups.setdefault(tuple(v.shape), []).append(i)
        self._shape_groups = list(groups.values())
        self._m, self._u = [], []
        for j, indices in enumerate(self._shape_groups):
            shape = (len(indices), *var_list[indices[0]].shape)
            self._m.append(self.add_variable(shape, initializer="zeros", name=f"momentum_{j}"))
            self._u.append(self.add_variable(shape, initializer="zeros", name=f"norm_{j}"))

    def _clip_gradients(self, grads):
        """Sum over replicas, then clip the total (Keras' TF backend does it the other way)."""
        ctx = tf.distribute.get_replica_context()
        if ctx is not None and ctx.num_replicas_in_sync > 1:
            present = [i for i, g in enumerate(grads) if g is not None]
            summed = ctx.all_reduce(tf.distribute.ReduceOp.SUM, [grads[i] for i in present])
            grads = list(grads)
            for i, g in zip(present, summed):
                grads[i] = g
        return super()._clip_gradients(grads)

    def _all_reduce_sum_gradients(self, grads_and_vars):
        """Already summed in ``_clip_gradients``; Keras calls this hook after clipping."""
        return list(grads_and_vars)

    def _distributed_tf_update_step(self, distribution, grads_and_vars, learning_rate):
        """The update of the class docstring for all variables at once, shape by shape.

        Keras updates variable by variable (~30 graph ops each); NVAE has over a thousand
        variables of a few dozen shapes, so updating stacks of same-shape variables is a much
        smaller graph (faster to trace and to optimize) and runs as a few large kernels instead
        of thousands of tiny ones. Under ``tf.distribute`` it runs once per device on that
        device's copies.
        """
        grads = [None] * len(self._trainable_variables)
        for grad, var in grads_and_vars:
            grads[self._get_variable_index(var)] = grad
        variables = [
            v.value if isinstance(v, keras.Variable) else v for v in self._trainable_variables
        ]
        slots = [v.value for v in self._m + self._u]
        distribution.extended.update(
            slots[0], self._grouped_update, args=(slots, grads, variables, learning_rate),
            group=False,
        )  # fmt: skip

    def _grouped_update(self, _, slots, grads, variables, learning_rate):
        """The update on one device: ``slots`` are all ``m`` then all ``u``, one per shape
        group (``_`` is the first of them, the variable ``update`` was called for)."""
        m_slots, u_slots = slots[: len(self._m)], slots[len(self._m) :]
        dtype = m_slots[0].dtype
        b1 = tf.cast(self.beta_1, dtype)
        b2 = tf.cast(self.beta_2, dtype)
        eps = tf.cast(self.epsilon, dtype)
        l2_decay = tf.cast(self.l2_decay, dtype)
        t = tf.cast(self.iterations + 1, dtype)
        step_size = tf.cast(learning_rate, dtype) / (1.0 - tf.pow(b1, t))
        for indices, m, u in zip(self._shape_groups, m_slots, u_slots):
            shape = variables[indices[0]].shape
            # A variable without a gradient is left out of the step: its value and slots stay.
            missing = [grads[i] is None for i in indices]
            g = tf.stack(
                [tf.zeros(shape, dtype) if grads[i] is None else tf.cast(grads[i], dtype)
                 for i in indices]
            )  # fmt: skip
            p = tf.stack([tf.cast(variables[i], dtype) for i in indices])
            g = g + l2_decay * p
            new_m = b1 * m + (1.0 - b1) * g
            new_u = tf.maximum(b2 * u, tf.abs(g) + eps)
            if any(missing):
                keep = tf.reshape(tf.constant(missing), [-1] + [1] * len(shape))
                new_m, new_u = tf.where(keep, m, new_m), tf.where(keep, u, new_u)
            m.assign(new_m)
            u.assign(new_u)
            delta = step_size * new_m / new_u
            for i, d in zip(indices, tf.unstack(delta, num=len(indices))):
                if grads[i] is not None:
                    variables[i].assign_sub(tf.cast(d, variables[i].dtype))

    def get_config(self):
        config = super().get_config()
        config.pop("weight_decay", None)
        config.update(
            {
                "beta_1": self.beta_1,
                "beta_2": self.beta_2,
                "epsilon": self.epsilon,
                "l2_decay": self.l2_decay,
            }
        )
        return config
