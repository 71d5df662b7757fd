"""Dataset-level evaluation (docs/design.md#evaluation): importance-weighted NLL and ELBO with
standard errors, KL per latent group and the number of active latent channels.

Every batch runs one compiled step: K posterior samples per image in chunks
(``nvae_tf.inference.likelihood``), plus one more posterior pass for the KL statistics. With a
``tf.distribute`` strategy each replica takes its share of the batch and the per-image values
are gathered. Results are means over images with standard errors over images; ``elbo_*`` are
the negative ELBO, the upper bound on ``nll_*`` that bpd tables report.
"""

import numpy as np
import tensorflow as tf

from nvae_tf import graph_optimization
from nvae_tf.inference.likelihood import bits_per_dim, importance_weighted, mean_and_standard_error
from nvae_tf.model import ACTIVE_KL_THRESHOLD


def evaluation_dataset(config, split, batch_size, seed, num_images=None):
    """The ``split`` in fixed order, batches of ``batch_size``, optionally its first images.

    ``seed`` drives the data noise (MNIST's dynamic binarization), so a run is reproducible.
    """
    from nvae_tf.data import load_dataset

    dataset = load_dataset(
        config, split, global_batch_size=batch_size, shuffle=False, repeat=False, seed=seed
    )
    if num_images is not None:
        dataset = dataset.unbatch().take(num_images).batch(batch_size)
    return dataset


def evaluate(
    model,
    dataset,
    num_samples=1000,
    *,
    max_images_per_pass=256,
    seed=0,
    strategy=None,
    progress=None,
):
    """Evaluate ``model`` on every image of ``dataset`` (batches of images in [0, 1]).

    ``num_samples`` is K, drawn ``max(1, max_images_per_pass // batch)`` at a time per
    replica.
    ``seed`` fixes all posterior samples; ``progress(num_images_done)`` is called after
    each batch. Returns a JSON-ready dict (see ``summarize``).
    """
    strategy = strategy or tf.distribute.get_strategy()
    step = _make_step(model, strategy, int(num_samples), int(max_images_per_pass))
    base_seed = tf.constant([seed, 0], tf.int64)
    parts = {"log_likelihood": [], "elbo": [], "kl": []}
    kl_channel_sum = 0.0
    done = 0
    for index, batch in enumerate(strategy.experimental_distribute_dataset(dataset)):
        outputs = step(batch, tf.random.experimental.stateless_fold_in(base_seed, index))
        for name, value in zip(("log_likelihood", "elbo", "kl"), outputs[:3]):
            parts[name] += [v.numpy() for v in strategy.experimental_local_results(value)]
        kl_channel_sum += sum(v.numpy() for v in strategy.experimental_local_results(outputs[3]))
        done += sum(len(v) for v in parts["elbo"][-strategy.num_replicas_in_sync :])
        if progress is not None:
            progress(done)
    if done == 0:
        raise ValueError("the evaluation dataset is empty")
    values = {name: np.concatenate(v) for name, v in parts.items()}
    return summarize(
        values["log_likelihood"],
        values["elbo"],
        values["kl"],
        kl_channel_sum / done,
        num_samples,
        model.config.num_output_dims,
    )


def _make_step(model, strategy, num_samples, max_images_per_pass):
    @graph_optimization.function(reduce_retracing=True, cache_graph=True)
    def step(batch, seed):
        def replica_step(x):
            x = x[0] if isinstance(x, (tuple, list)) else x
            replica = tf.distribute.get_replica_context().replica_id_in_sync_group
            replica_seed = tf.random.experimental.stateless_fold_in(seed, replica)
            iw_seed, kl_seed = (
                tf.cast(tf.random.experimental.stateless_fold_in(replica_seed, i), tf.int64)
                for i in (0, 1)
            )
            log_likelihood, elbo = importance_weighted(
                model, x, num_samples, max_images_per_pass, iw_seed
            )
            out = model(x, training=False, seed=kl_seed)
            n = tf.cast(tf.shape(x)[0], tf.float32)
            # kl_per_channel is a batch mean (NaN for an empty replica batch): make it a sum.
            kl_channel_sum = tf.where(n > 0, out.kl_per_channel * n, 0.0)
            return log_likelihood, elbo, out.kl, kl_channel_sum

        return strategy.run(replica_step, args=(batch,))

    return step


def summarize(log_likelihood, elbo, kl, kl_per_channel, num_samples, num_dims):
    """The evaluation record from per-image values in nats.

    ``log_likelihood``, ``elbo``: (N,); ``kl``: (N, groups); ``kl_per_channel``: (groups,
    channels) averaged over images. ``num_dims`` is D of bpd = nats / (ln 2 * D).
    """
    result = {}
    for name, values in (("nll", -np.asarray(log_likelihood)), ("elbo", -np.asarray(elbo))):
        mean, se = mean_and_standard_error(values)
        result[f"{name}_nats"] = mean
        result[f"{name}_nats_se"] = se
        result[f"{name}_bpd"] = bits_per_dim(mean, num_dims)
        result[f"{name}_bpd_se"] = bits_per_dim(se, num_dims)
    active = np.asarray(kl_per_channel) > ACTIVE_KL_THRESHOLD
    result.update(
        {
            "num_iw_samples": int(num_samples),
            "num_images": len(elbo),
            "num_output_dims": int(num_dims),
            "kl_per_group": [float(v) for v in np.mean(kl, axis=0)],
            "active_units": int(active.sum()),
            "active_units_per_group": [int(v) for v in active.sum(axis=1)],
            "num_latent_channels": int(active.size),
        }
    )
    return result
