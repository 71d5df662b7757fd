"""What a training run continues from: the newest intact checkpoint (model, optimizer, metric
averages and, on one worker, the data position) under ``--resume``, or a warm start's weights.

A resumed run on one worker with the same data reproduces the uninterrupted one step for step;
elsewhere (several workers, other data) the data stream restarts, reseeded by the step.
"""

import sys

import tensorflow as tf

from nvae_tf.run_dir import RunDirectoryError, checkpoint_dir, intact_checkpoint, restore_model
from nvae_tf.training.callbacks import global_step


def restore_run(run, model):
    """Restore ``run``'s newest intact checkpoint (with ``--resume``) or its warm start's
    weights (``init_from``) into the built ``model``, and position the data.

    Returns the ``tf.train.Checkpoint`` the run saves (the data iterator's position included
    on one worker), the iterator, the restored checkpoint's path (None when none) and the
    global step to continue from.
    """
    # Keras metrics are not trackable themselves; their variables are (epoch averages).
    metrics = {f"{m.name}_{v.name}": v for m in model.metrics for v in m.variables}
    state = {"model": model, "optimizer": model.optimizer, "metrics": metrics}
    directory = checkpoint_dir(run.out_dir)
    aside = run.chief and not run.multi_worker  # others may be reading the directory
    path = intact_checkpoint(directory, set_aside=aside) if run.resume else None
    if run.resume and path is None and run.chief:
        print(
            f"--resume: no checkpoint in {directory} yet; starting from scratch",
            file=sys.stderr,
        )
    if path:
        try:
            tf.train.Checkpoint(**state).restore(
                path
            ).expect_partial().assert_existing_objects_matched()
        except AssertionError:  # e.g. written by a version without some of today's state
            raise RunDirectoryError(
                f"--resume: {path} does not hold this version's training state (model, "
                "optimizer and metrics); continue it with the nvae-tf that wrote it"
            ) from None
    elif run.init_from:  # a warm start: the weights only (EMA weights if it kept them)
        source = restore_model(run.init_from)
        for variable, value in zip(model.weights, source.weights, strict=True):
            variable.assign(value)
    step = global_step(model)
    saved = run.saved_config
    same_data = saved is None or saved.data_dir == run.config.data_dir
    exact = not run.multi_worker and same_data
    if path and not exact:  # a fresh, reseeded stream: the saved position does not apply
        run.make_datasets(seed=run.config.seed + step)
    iterator = iter(run.train_data)
    if path and exact:
        tf.train.Checkpoint(data=iterator).restore(
            path
        ).expect_partial().assert_existing_objects_matched()
    if not run.multi_worker:
        state["data"] = iterator
    return tf.train.Checkpoint(**state), iterator, path, step
