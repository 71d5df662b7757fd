"""The held-out score of a training run: single-sample negative ELBO on the whole test split.

Computed at evaluated epoch ends (the original's schedule, ``evaluation_due``) and at the end
of training, with fixed posterior noise (so evaluations are comparable) and the EMA weights if
the run keeps them. Each worker scores its shard; the sums are added over workers.
"""

import tensorflow as tf

from nvae_tf import graph_optimization
from nvae_tf.inference.likelihood import bits_per_dim
from nvae_tf.training.distribute import sum_over_workers, worker_id
from nvae_tf.training.guarded_optimizer import ema_weights

EVAL_SEED = 7  # fixed posterior noise for held-out ELBOs: comparable across evaluations


class HeldOutScore:
    """``score(test_data)`` -> ``{"nelbo": nats/image, "bpd": bits/dim, "images": count}``."""

    def __init__(self, model, config, strategy, multi_worker):
        self.model = model
        self.config = config
        self.strategy = strategy
        self.multi_worker = multi_worker

        @graph_optimization.function(reduce_retracing=True)
        def score(x, seed):
            out = model(x, training=False, seed=seed)
            return tf.reduce_sum(tf.cast(out.negative_elbo(x), tf.float64))

        self._score = score

    def __call__(self, test_data):
        total, count = 0.0, 0
        with ema_weights(self.model):
            for i, x in enumerate(test_data):
                seed = tf.constant([EVAL_SEED, worker_id(self.strategy) * 2**31 + i], tf.int64)
                total += float(self._score(x, seed))
                count += int(x.shape[0])
        if self.multi_worker:
            total, count = sum_over_workers(self.strategy, [total, float(count)])
        nelbo = total / count
        return {
            "nelbo": nelbo,
            "bpd": bits_per_dim(nelbo, self.config.num_output_dims),
            "images": int(count),
        }


def evaluation_due(epoch, epochs):
    """The original's validation schedule: every epoch up to 50 epochs, else every 20 + last."""
    return epochs <= 50 or (epoch + 1) % 20 == 0 or epoch + 1 == epochs
