"""Child process: nvae-tf under the side-by-side protocol (bench_protocol), as users run it.

- training: the model built, compiled and its optimizer built as ``nvae-train`` does (the
  default strategy, the config's precision policy), stepped by the library's own compiled
  step (``training.distribute.make_train_step``) with the logs fetched every step;
- sampling: ``model.sample(n, temperature)`` (one compiled graph, as ``nvae-sample`` runs it);
- IW evaluation: ``model.log_likelihood(x, num_samples=K)``.

No environment variables are set beyond what ``nvae-train`` itself sets.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import bench_protocol as protocol
from bench_setups import synthetic_images

from trainers.cli import add_config_args, load_config, quiet_tensorflow

STEPS_PER_EPOCH = 1000  # only sets the schedules' lengths


def build(config):
    """The model with its optimizer, under the default strategy, as ``nvae-train`` builds it."""
    import keras

    from nvae_tf.model import NVAE
    from nvae_tf.training.distribute import make_strategy

    strategy = make_strategy("auto")
    keras.utils.set_random_seed(config.seed)
    with strategy.scope():
        model = NVAE(config)
        model.compile(STEPS_PER_EPOCH, jit_compile=config.jit_compile)
        model.optimizer.build(model.trainable_variables)
    return model, strategy


def operations(model, strategy, x_train, x_eval_for):
    import tensorflow as tf

    from nvae_tf.training.distribute import distribute_batch, make_train_step

    step = make_train_step(model, strategy)
    batch = distribute_batch(strategy, tf.constant(x_train))
    gpu = bool(tf.config.list_logical_devices("GPU"))
    return protocol.Operations(
        train_step=lambda: {k: v.numpy().item() for k, v in step(batch).items()},
        sample=lambda n, temperature: model.sample(n, temperature).numpy(),
        iw_evaluate=lambda n, k: model.log_likelihood(x_eval_for(n), num_samples=k).numpy(),
        count_params=lambda: sum(int(tf.size(v)) for v in model.trainable_variables),
        peak_device_mb=(lambda: tf.config.experimental.get_memory_info("GPU:0")["peak"] / 2**20)
        if gpu
        else None,
    )


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_config_args(p)
    p.add_argument("--batch", type=int, required=True)
    protocol.add_child_args(p)
    args = p.parse_args(argv)
    protocol.check_counts(p, args)
    quiet_tensorflow()
    import keras
    import tensorflow as tf

    from nvae_tf.training.distribute import precision_policy

    config = load_config(args).replace(batch_size=args.batch)

    def images(batch, seed):
        binary = config.decoder == "bernoulli"
        return synthetic_images(batch, config.image_size, config.image_channels, binary, seed)

    x_train = images(args.batch, 0)
    with precision_policy(config.precision):
        model, strategy = build(config)
        ops = operations(model, strategy, x_train, lambda b: tf.constant(images(b, 1)))
        figures = protocol.ChildFigures(
            batch=args.batch,
            batch_sum=float(x_train.sum()),
            versions={
                "tensorflow": tf.__version__,
                "keras": keras.__version__,
                "python": protocol.python_version(),
            },
        )
        protocol.measure(ops, figures, args)


if __name__ == "__main__":
    main()
