"""The training loop behind ``nvae-train``: ``train(config, out_dir, ...)``.

The run directory (see ``nvae_tf.run_dir``) receives ``config.yaml``, checkpoints,
``metrics.csv`` and TensorBoard logs; at the end the held-out ELBO is evaluated and printed.
``trainers/train.py`` is its command line; the tuner calls ``train`` directly.

Exact resume. ``model.fit`` creates its own data iterators, and the ``DistributedIterator`` that
``tf.distribute`` hands out cannot be checkpointed (TF issue #56372), so fit cannot restore the
data position. This module therefore runs a small loop with the same callbacks: each process reads
its batches from a plain ``tf.data`` iterator, which is checkpointed with the model (weights,
batch-norm statistics, spectral vectors, noise generator), the optimizer (step, moments, loss
scale, EMA, skip counters) and the metric trackers, and splits each batch over its replicas;
one ``tf.function`` runs ``model.train_step`` under ``strategy.run``. A resumed run therefore
reproduces an uninterrupted one step for step (given deterministic ops). Under
``MultiWorkerMirroredStrategy`` each worker reads its own shard, so the chief's iterator state
does not fit the others: there the data stream restarts on resume, reseeded by the step.
``model.fit(load_dataset(...), ...)`` keeps working for library users with the same callbacks.

Parts: ``run_inputs`` (checks before writing), ``resume`` (what a run continues from),
``step_loop`` (the loop), ``checkpointing``, ``held_out`` (evaluation), ``signals``,
``watchdog`` and ``rollback`` (long-run reliability).
"""

import dataclasses
import os
import shutil
import tempfile
import time

from nvae_tf.config import ConfigError
from nvae_tf.run_dir import RUN_LOGS
from nvae_tf.training.run_inputs import RunInputs, check_options
from nvae_tf.training.signals import StopOnSignal, TrainingInterrupted
from nvae_tf.training.watchdog import HANG_FACTOR, HANG_MIN_SECONDS

LOG_EVERY = 100  # the original logs every 100 steps (docs/design.md#training-loop)
IMAGE_EVERY = 1000  # ... and writes a reconstruction grid every 1000
CHECKPOINT_EVERY = 1000
CHECKPOINT_MINUTES = 5.0  # ... and at least this often, so a kill costs minutes of work
KEEP_CHECKPOINTS = 3
SCHEDULE_VALUES = ("beta", "reg_weight")  # reported by train_step but not results
METRICS_FILE, TENSORBOARD_DIR = RUN_LOGS

__all__ = ["TrainingDiverged", "TrainingInterrupted", "train"]


class TrainingDiverged(RuntimeError):
    """Training stopped because too many consecutive steps were non-finite (one-line message)."""


def train(
    config,
    out_dir,
    *,
    steps=None,
    resume=False,
    init_from=None,
    strategy=None,
    verbose=1,
    callbacks=(),
    log_every=LOG_EVERY,
    image_every=IMAGE_EVERY,
    checkpoint_every=CHECKPOINT_EVERY,
    checkpoint_minutes=CHECKPOINT_MINUTES,
    keep_checkpoints=KEEP_CHECKPOINTS,
    hang_factor=HANG_FACTOR,
    hang_min_seconds=HANG_MIN_SECONDS,
    max_rollbacks=0,
):
    """Train ``config`` into the run directory ``out_dir``; returns the final metrics.

    Args:
      config: the ``NVAEConfig`` (its ``batch_size`` is per replica).
      out_dir: run directory; created (must not hold a run) unless ``resume``.
      steps: stop once the run's global step (batches trained, from its start, skipped
        non-finite steps included) reaches ``steps``; the schedules still span ``epochs``.
      resume: continue the run in ``out_dir`` from its newest intact checkpoint (from scratch
        if it has none). Only the fields in ``nvae_tf.run_dir.RESUMABLE_KEYS`` may differ
        from its ``config.yaml``.
      init_from: start a new run from the model weights of the run directory ``init_from``
        (same architecture; e.g. an imported pretrained model). The optimizer, step,
        schedules and data start fresh.
      strategy: a ``tf.distribute`` strategy (default ``make_strategy("auto")``).
      verbose: 0 silent, 1 progress bar, 2 one line per epoch.
      callbacks: extra Keras callbacks (e.g. a tuner's), called after the built-in ones.
      log_every, image_every, checkpoint_every: intervals in steps for metrics rows
        (CSV + TensorBoard), TensorBoard image grids and checkpoints; epoch ends always log
        and checkpoint. checkpoint_minutes: also checkpoint when this much wall time passed
        since the last save (0: by steps only; not used with several workers).
        keep_checkpoints: how many checkpoints to keep.
      hang_factor, hang_min_seconds: the hang watchdog (``nvae_tf.training.watchdog``;
        ``hang_factor=0`` disables it). max_rollbacks: rollbacks allowed on a streak of
        non-finite steps (``nvae_tf.training.rollback``); 0 stops instead.

    Returns:
      ``{"step", "skipped_steps", "train_<metric>" (epoch-to-date means of the last epoch
      trained), "test_nelbo", "test_bpd", "test_images"}``.

    Raises:
      ConfigError, DataError, RunDirectoryError: bad input, raised before anything is written
        (a fresh run that fails before its first checkpoint removes what it wrote).
      CheckpointSaveError: a save failed (previous checkpoint kept, nothing partial left).
      TrainingDiverged: ``max_skipped_steps`` consecutive non-finite steps (and no rollback).
      TrainingInterrupted: SIGINT/SIGTERM (the current step is checkpointed first).
    """
    import keras

    from nvae_tf.training.distribute import is_chief, make_strategy, precision_policy

    check_options(
        at_least_one=dict(
            steps=steps or 1,
            log_every=log_every,
            image_every=image_every,
            checkpoint_every=checkpoint_every,
            keep_checkpoints=keep_checkpoints,
        ),
        at_least_zero=dict(
            checkpoint_minutes=checkpoint_minutes,
            hang_factor=hang_factor,
            hang_min_seconds=hang_min_seconds,
            max_rollbacks=max_rollbacks,
        ),
    )
    if init_from and resume:
        raise ConfigError("--init-from starts a new run: it cannot be combined with --resume")
    with StopOnSignal() as stop:
        strategy = strategy or make_strategy("auto")
        keras.utils.set_random_seed(config.seed)  # identical initialization on every worker
        chief = is_chief(strategy)
        run = _Run(config, out_dir, strategy, resume, chief, stop, init_from=init_from)
        run.check_inputs()  # config, run directory and data, on every worker, before any writing
        with precision_policy(config.precision):
            return run.train(
                steps=steps,
                verbose=verbose if run.chief else 0,
                extra_callbacks=list(callbacks),
                log_every=log_every,
                image_every=image_every,
                checkpoint_every=checkpoint_every,
                checkpoint_seconds=None if run.multi_worker else 60.0 * checkpoint_minutes,
                keep_checkpoints=keep_checkpoints,
                watchdog=(hang_factor, hang_min_seconds),
                max_rollbacks=max_rollbacks,
            )


@dataclasses.dataclass
class _Run(RunInputs):
    """One invocation of training on one process: checks, set-up, the loop, evaluation."""

    config: object
    out_dir: str
    strategy: object
    resume: bool
    chief: bool
    stop: StopOnSignal
    init_from: str = None  # run directory whose model weights start this run
    # Filled in by check_inputs():
    saved_config: object = None  # the run's config.yaml when resuming
    global_batch: int = None  # batch_size x replicas
    num_train: int = None
    num_test: int = None
    steps_per_epoch: int = None  # num_train // global_batch (the loader length, drop_last)
    multi_worker: bool = False
    train_data: object = None  # this worker's pipelines
    test_data: object = None
    probe_images: object = None  # the fixed held-out batch of the diagnostics and grids
    _score: object = None  # the held-out scoring (HeldOutScore)

    # --- set-up -------------------------------------------------------------------------
    @property
    def metrics_path(self):
        return os.path.join(self.out_dir, METRICS_FILE)

    def _write_run_dir(self):
        from nvae_tf.run_dir import config_path

        os.makedirs(self.out_dir, exist_ok=True)
        self.config.to_yaml(config_path(self.out_dir))

    def _build_model(self):
        from nvae_tf.model import NVAE

        with self.strategy.scope():
            model = NVAE(self.config)
            model.compile(self.steps_per_epoch, jit_compile=self.config.jit_compile)
            model.optimizer.build(model.trainable_variables)  # before the first traced step
        return model

    def _callbacks(self, manager, writer, verbose, log_every, image_every, saves):
        from nvae_tf.training import callbacks as cb
        from nvae_tf.training.checkpointing import CheckpointSaver

        guard = cb.SkipGuard(self.config.max_skipped_steps)
        chain = [cb.TrainingDiagnostics(self.probe_images, log_every), guard]
        if self.chief:
            chain += [
                cb.CSVMetrics(self.metrics_path, cb.metric_columns(self.config)),
                cb.TensorBoardScalars(writer),
                cb.TensorBoardImages(writer, self.probe_images, image_every),
            ]
        # Saves come after the step's metrics row: a kill between the two then only repeats
        # the row (dropped on resume), never loses it.
        chain.append(CheckpointSaver(manager, *saves))
        if verbose:
            chain.append(cb.ProgressBar(verbose))
        return chain, guard

    # --- training -----------------------------------------------------------------------
    def train(self, **options):
        """Set up, restore, loop, evaluate; a fresh run that fails before its first
        checkpoint removes what it wrote, so the same command can simply be run again."""
        from nvae_tf.run_dir import remove_failed_start

        created = self.chief and not os.path.exists(self.out_dir)
        try:
            return self._train(**options)
        except BaseException:
            if self.chief and not self.resume:
                remove_failed_start(self.out_dir, created)
            raise

    def _train(
        self,
        *,
        steps,
        verbose,
        extra_callbacks,
        log_every,
        image_every,
        checkpoint_every,
        checkpoint_seconds,
        keep_checkpoints,
        watchdog,
        max_rollbacks,
    ):
        import keras
        import tensorflow as tf

        from nvae_tf.model import TRAIN_METRICS
        from nvae_tf.run_dir import checkpoint_dir, remove_partial_saves
        from nvae_tf.training.callbacks import CSVMetrics, global_step
        from nvae_tf.training.resume import restore_run
        from nvae_tf.training.rollback import Rollback
        from nvae_tf.training.step_loop import StepLoop

        c = self.config
        if self.chief:
            self._write_run_dir()
            remove_partial_saves(checkpoint_dir(self.out_dir))  # before looking for the newest
        model = self._build_model()
        checkpoint, iterator, restored, step = restore_run(self, model)
        total = c.epochs * self.steps_per_epoch
        stop_at = min(total, steps) if steps else total
        # Only the chief writes the run directory; other workers save (all must take part)
        # into a temporary directory, removed at the end.
        save_dir = (
            checkpoint_dir(self.out_dir)
            if self.chief
            else tempfile.mkdtemp(prefix="nvae-worker-ckpt-")
        )
        writer = None
        try:
            if self.chief:
                CSVMetrics.truncate_after(self.metrics_path, step)
                writer = tf.summary.create_file_writer(os.path.join(self.out_dir, TENSORBOARD_DIR))
            manager = tf.train.CheckpointManager(checkpoint, save_dir, keep_checkpoints)
            chain, guard = self._callbacks(
                manager,
                writer,
                verbose,
                log_every,
                image_every,
                (checkpoint_every, checkpoint_seconds),
            )
            callbacks = keras.callbacks.CallbackList(
                chain + extra_callbacks,
                add_history=True,
                model=model,
                verbose=verbose,
                epochs=c.epochs,
                steps=self.steps_per_epoch,
            )
            if verbose:
                self._announce(restored, step, stop_at, total)
            started = time.time()
            loop = StepLoop(
                self,
                model,
                iterator,
                callbacks,
                chain,
                guard,
                Rollback(checkpoint, save_dir, max_rollbacks),
                manager,
            )
            logs, evaluated = loop.run_to(stop_at, watchdog)
            if guard.message:
                raise TrainingDiverged(guard.message)
            step = global_step(model)
            if self.stop.signal:
                raise TrainingInterrupted(
                    self.stop.signal,
                    f"{self.stop.signal}: stopped at step {step} and saved a checkpoint; "
                    "continue with --resume",
                )
            if evaluated and evaluated[0] == step:
                test = evaluated[1]
            else:
                test = self.evaluate(model)
            result = {
                "step": step,
                "skipped_steps": int(model.optimizer.skipped_steps.numpy()),
                **{
                    f"train_{k}": float(v)
                    for k, v in logs.items()
                    if k in TRAIN_METRICS and k not in SCHEDULE_VALUES
                },
                **{f"test_{k}": v for k, v in test.items()},
            }
            if verbose:
                self._report(result, time.time() - started)
            return result
        finally:
            if writer is not None:
                writer.close()
            if not self.chief:
                shutil.rmtree(save_dir, ignore_errors=True)

    # --- evaluation ---------------------------------------------------------------------
    def evaluate(self, model):
        """Held-out negative ELBO (``nvae_tf.training.held_out``): nelbo, bpd, images."""
        from nvae_tf.training.held_out import HeldOutScore

        if self._score is None:
            self._score = HeldOutScore(model, self.config, self.strategy, self.multi_worker)
        return self._score(self.test_data)

    # --- reporting ----------------------------------------------------------------------
    def _announce(self, restored, step, stop_at, total):
        c, spe = self.config, self.steps_per_epoch
        where = (
            f"resuming {self.out_dir} from {os.path.basename(restored)} (step {step})"
            if restored
            else f"training into {self.out_dir}"
        )
        print(
            f"{where}: {c.dataset}, {self.num_train} train / {self.num_test} test images, "
            f"global batch {self.global_batch} ({self.strategy.num_replicas_in_sync} "
            f"replica(s)), {spe} steps/epoch, {c.epochs} epochs = {total} steps"
            + (f", stopping at step {stop_at}" if stop_at < total else "")
        )

    def _report(self, result, seconds):
        spe = self.steps_per_epoch
        print(
            f"step {result['step']} (epoch {result['step'] / spe:.2f} of {self.config.epochs})"
            f", {result['skipped_steps']} skipped step(s), {seconds:.0f} s"
        )
        print(
            f"held-out ELBO on {result['test_images']} test images: "
            f"{-result['test_nelbo']:.2f} nats/image, {result['test_bpd']:.4f} bits/dim "
            f"(negative ELBO {result['test_nelbo']:.2f} nats)"
        )
        print(f"run directory: {self.out_dir}")
