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
"""

import contextlib
import dataclasses
import os
import shutil
import signal
import sys
import tempfile
import threading
import time

from nvae_tf.config import ConfigError

LOG_EVERY = 100  # the original logs every 100 steps (docs/design.md#training-loop)
IMAGE_EVERY = 1000  # ... and writes a reconstruction grid every 1000
CHECKPOINT_EVERY = 1000
KEEP_CHECKPOINTS = 3
PROBE_IMAGES = 64  # fixed held-out batch for per-group KL, active units and image grids
EVAL_SEED = 7  # fixed posterior noise for held-out ELBOs: comparable across evaluations
SCHEDULE_VALUES = ("beta", "reg_weight")  # reported by train_step but not results
METRICS_FILE = "metrics.csv"
TENSORBOARD_DIR = "tensorboard"


class TrainingDiverged(RuntimeError):
    """Training stopped because too many consecutive steps were non-finite (one-line message)."""


class TrainingInterrupted(KeyboardInterrupt):
    """SIGINT/SIGTERM stopped training after a step; a checkpoint of that step was saved."""


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
    keep_checkpoints=KEEP_CHECKPOINTS,
):
    """Train ``config`` into the run directory ``out_dir``; returns the final metrics.

    Args:
      config: the ``NVAEConfig`` (its ``batch_size`` is per replica).
      out_dir: run directory; created (must not hold a run) unless ``resume``.
      steps: stop once the run's global step (batches trained, from its start, skipped
        non-finite steps included) reaches ``steps``; the schedules still span ``epochs``.
      resume: continue the run in ``out_dir`` from its latest checkpoint. Only the fields
        in ``nvae_tf.run_dir.RESUMABLE_KEYS`` may differ from its ``config.yaml``.
      init_from: start a new run from the model weights of the run directory ``init_from``
        (same architecture; e.g. an imported pretrained model). The optimizer, step,
        schedules and data start fresh.
      strategy: a ``tf.distribute`` strategy (default ``make_strategy("auto")``).
      verbose: 0 silent, 1 progress bar, 2 one line per epoch.
      callbacks: extra Keras callbacks (e.g. a tuner's), called after the built-in ones.
      log_every, image_every, checkpoint_every: intervals in steps for metrics rows
        (CSV + TensorBoard), TensorBoard image grids and checkpoints; epoch ends always log
        and checkpoint. keep_checkpoints: how many checkpoints to keep.

    Returns:
      ``{"step", "skipped_steps", "train_<metric>" (epoch-to-date means of the last epoch
      trained), "test_nelbo", "test_bpd", "test_images"}``.

    Raises:
      ConfigError, DataError, RunDirectoryError: bad input, raised before anything is written.
      TrainingDiverged: ``max_skipped_steps`` consecutive non-finite steps.
      TrainingInterrupted: SIGINT/SIGTERM (the current step is checkpointed first).
    """
    import keras

    from nvae_tf.training.distribute import is_chief, make_strategy, precision_policy

    for name, value in (
        ("steps", steps or 1),
        ("log_every", log_every),
        ("image_every", image_every),
        ("checkpoint_every", checkpoint_every),
        ("keep_checkpoints", keep_checkpoints),
    ):
        if int(value) < 1:
            raise ConfigError(f"{name} must be >= 1, got {value}")
    strategy = strategy or make_strategy("auto")
    keras.utils.set_random_seed(config.seed)  # identical initialization on every worker
    if init_from and resume:
        raise ConfigError("--init-from starts a new run: it cannot be combined with --resume")
    run = _Run(config, out_dir, strategy, resume, chief=is_chief(strategy), init_from=init_from)
    run.check_inputs()  # config, run directory and data, on every worker, before any writing
    with precision_policy(config.precision):
        return run.train(
            steps=steps,
            verbose=verbose if run.chief else 0,
            extra_callbacks=list(callbacks),
            log_every=log_every,
            image_every=image_every,
            checkpoint_every=checkpoint_every,
            keep_checkpoints=keep_checkpoints,
        )


@dataclasses.dataclass
class _Run:
    """One invocation of training on one process: checks, set-up, the loop, evaluation."""

    config: object
    out_dir: str
    strategy: object
    resume: bool
    chief: bool
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
    _score: object = None  # the compiled held-out scoring function

    # --- checks (nothing is written before these pass) ------------------------------------
    def check_inputs(self):
        """Validate everything; with several workers, all agree before the chief writes."""
        from nvae_tf.training.distribute import is_multi_worker, sum_over_workers

        error = None
        try:
            self._check_inputs()
        except Exception as e:  # any failure: tell the other workers first, then raise it
            error = e
        if is_multi_worker(self.strategy):  # also a barrier: no worker sees the chief's writes
            failed = sum_over_workers(self.strategy, [float(error is not None)])[0]
            if failed and error is None:
                raise ConfigError(
                    f"{int(failed)} other worker(s) rejected the run's inputs; "
                    "see their error messages"
                )
        if error is not None:
            raise error

    def _check_inputs(self):
        from nvae_tf.data import num_examples
        from nvae_tf.run_dir import check_init_from, check_run_dir

        self.saved_config = check_run_dir(self.out_dir, self.config, self.resume)
        if self.init_from:
            check_init_from(self.init_from, self.config)
        c, replicas = self.config, self.strategy.num_replicas_in_sync
        self.global_batch = c.batch_size * replicas
        self.num_train = num_examples(c, "train")
        self.num_test = num_examples(c, "test")
        self.steps_per_epoch = self.num_train // self.global_batch
        if self.steps_per_epoch < 1:
            raise ConfigError(
                f"the global batch ({c.batch_size} per replica x {replicas} "
                f"replica(s) = {self.global_batch}) is larger than the "
                f"{self.num_train} training images: lower batch_size"
            )
        if self.num_test < 1:
            raise ConfigError(f"dataset {c.dataset} has no test images to evaluate on")
        self._make_datasets()

    def _make_datasets(self, seed=None):
        """Train/test pipelines of this worker and the probe batch (raises DataError)."""
        from nvae_tf.data import load_dataset
        from nvae_tf.training.distribute import input_context, is_multi_worker, num_workers

        c = self.config
        context = input_context(self.strategy) if is_multi_worker(self.strategy) else None
        workers = num_workers(self.strategy)
        self.multi_worker = context is not None
        self.train_data = load_dataset(
            c, "train", global_batch_size=self.global_batch, input_context=context, seed=seed
        )
        self.test_data = load_dataset(
            c, "test", global_batch_size=c.batch_size * workers, input_context=context
        )
        if self.probe_images is None:
            probe = load_dataset(c, "test", global_batch_size=min(PROBE_IMAGES, self.num_test))
            self.probe_images = next(iter(probe))

    # --- set-up -------------------------------------------------------------------------
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

    def _restore(self, model):
        """Restore the latest checkpoint (if any) and create the data iterator to continue."""
        import tensorflow as tf

        from nvae_tf.run_dir import checkpoint_dir, restore_model
        from nvae_tf.training.callbacks import global_step

        # Keras metrics are not trackable themselves; their variables are (epoch averages).
        metrics = {f"{m.name}_{v.name}": v for m in model.metrics for v in m.variables}
        state = {"model": model, "optimizer": model.optimizer, "metrics": metrics}
        path = tf.train.latest_checkpoint(checkpoint_dir(self.out_dir)) if self.resume else None
        if path:
            tf.train.Checkpoint(**state).restore(
                path
            ).expect_partial().assert_existing_objects_matched()
        elif self.init_from:  # a warm start: the weights only (EMA weights if it kept them)
            source = restore_model(self.init_from)
            for variable, value in zip(model.weights, source.weights, strict=True):
                variable.assign(value)
        step = global_step(model)
        saved = self.saved_config
        same_data = saved is None or saved.data_dir == self.config.data_dir
        exact = not self.multi_worker and same_data
        if path and not exact:  # a fresh, reseeded stream: the saved position does not apply
            self._make_datasets(seed=self.config.seed + step)
        iterator = iter(self.train_data)
        if path and exact:
            tf.train.Checkpoint(data=iterator).restore(
                path
            ).expect_partial().assert_existing_objects_matched()
        if not self.multi_worker:
            state["data"] = iterator
        return tf.train.Checkpoint(**state), iterator, path, step

    def _callbacks(self, model, manager, writer, verbose, log_every, image_every, checkpoint_every):
        from nvae_tf.training import callbacks as cb

        guard = cb.SkipGuard(self.config.max_skipped_steps)
        chain = [
            cb.TrainingDiagnostics(self.probe_images, log_every),
            guard,
            cb.CheckpointSaver(manager, checkpoint_every),
        ]
        if self.chief:
            chain += [
                cb.CSVMetrics(
                    os.path.join(self.out_dir, METRICS_FILE), cb.metric_columns(self.config)
                ),
                cb.TensorBoardScalars(writer),
                cb.TensorBoardImages(writer, self.probe_images, image_every),
            ]
        if verbose:
            chain.append(cb.ProgressBar(verbose))
        return chain, guard

    # --- training -----------------------------------------------------------------------
    def train(
        self,
        *,
        steps,
        verbose,
        extra_callbacks,
        log_every,
        image_every,
        checkpoint_every,
        keep_checkpoints,
    ):
        import keras
        import tensorflow as tf

        from nvae_tf.model import TRAIN_METRICS
        from nvae_tf.run_dir import checkpoint_dir, remove_partial_saves
        from nvae_tf.training.callbacks import CSVMetrics

        c = self.config
        if self.chief:
            self._write_run_dir()
        model = self._build_model()
        checkpoint, iterator, restored, step = self._restore(model)
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
                remove_partial_saves(save_dir)
                CSVMetrics.truncate_after(os.path.join(self.out_dir, METRICS_FILE), step)
                writer = tf.summary.create_file_writer(os.path.join(self.out_dir, TENSORBOARD_DIR))
            manager = tf.train.CheckpointManager(checkpoint, save_dir, keep_checkpoints)
            chain, guard = self._callbacks(
                model, manager, writer, verbose, log_every, image_every, checkpoint_every
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
            with _StopOnSignal() as stop:
                logs, evaluated = self._loop(model, iterator, callbacks, stop_at, stop)
            if guard.message:
                raise TrainingDiverged(guard.message)
            step = _global_step(model)
            if stop.signal:
                print(
                    f"{stop.signal}: stopped at step {step} and saved a checkpoint; continue "
                    "with --resume",
                    file=sys.stderr,
                )
                raise TrainingInterrupted()
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

    def _loop(self, model, iterator, callbacks, stop_at, stop):
        """Keras fit's callback protocol over the checkpointed iterator, up to ``stop_at``."""
        from nvae_tf.training.distribute import distribute_batch

        train_step = _make_train_step(model, self.strategy)
        step, logs, evaluated, epoch_open = _global_step(model), {}, None, False
        model.stop_training = False
        callbacks.on_train_begin()
        while step < stop_at and not model.stop_training:
            epoch, batch = divmod(step, self.steps_per_epoch)
            if not epoch_open:
                if batch == 0:  # a resumed mid-epoch run keeps its restored epoch averages
                    model.reset_metrics()
                callbacks.on_epoch_begin(epoch)
                epoch_open = True
            callbacks.on_train_batch_begin(batch)
            logs = train_step(distribute_batch(self.strategy, next(iterator)))
            logs = {k: v.numpy().item() for k, v in logs.items()}
            callbacks.on_train_batch_end(batch, logs)
            step = _global_step(model)
            if stop.signal:
                model.stop_training = True
            if step % self.steps_per_epoch == 0:
                epoch_logs = dict(logs)
                if not model.stop_training and _evaluation_due(epoch, self.config.epochs):
                    test = self.evaluate(model)
                    evaluated = (step, test)
                    epoch_logs.update({"val_nelbo": test["nelbo"], "val_bpd": test["bpd"]})
                callbacks.on_epoch_end(epoch, epoch_logs)
                epoch_open = False
        callbacks.on_train_end(logs)
        return logs, evaluated

    # --- evaluation ---------------------------------------------------------------------
    def evaluate(self, model):
        """Single-sample negative ELBO on the whole test split: nats/image and bits/dim.

        Each worker scores its shard (fixed posterior noise, EMA weights if trained with EMA);
        the sums are added over workers.
        """
        import tensorflow as tf

        from nvae_tf.inference.likelihood import bits_per_dim
        from nvae_tf.training.distribute import sum_over_workers, worker_id

        if self._score is None:

            @tf.function(reduce_retracing=True)
            def score(x, seed):
                out = model(x, training=False, seed=seed)
                return tf.reduce_sum(tf.cast(out.negative_elbo(x), tf.float64))

            self._score = score
        total, count = 0.0, 0
        with _ema_weights(model):
            for i, x in enumerate(self.test_data):
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


def _make_train_step(model, strategy):
    """One ``tf.function``: ``model.train_step`` on every replica, logs reduced across them."""
    import tensorflow as tf

    @tf.function(jit_compile=bool(model.config.jit_compile), reduce_retracing=True)
    def train_step(batch):
        logs = strategy.run(model.train_step, args=(batch,))

        def reduce(value):
            # Counters arrive as optimizer variables, identical on every replica.
            first = tf.convert_to_tensor(strategy.experimental_local_results(value)[0])
            if first.dtype.is_floating:
                return strategy.reduce("MEAN", value, axis=None)
            return first

        return {name: reduce(value) for name, value in logs.items()}

    return train_step


def _global_step(model):
    from nvae_tf.training.callbacks import global_step

    return global_step(model)


def _evaluation_due(epoch, epochs):
    """The original's validation schedule: every epoch up to 50 epochs, else every 20 + last."""
    return epochs <= 50 or (epoch + 1) % 20 == 0 or epoch + 1 == epochs


@contextlib.contextmanager
def _ema_weights(model):
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


class _StopOnSignal:
    """Turn the first SIGINT/SIGTERM into a stop after the current step; a second one aborts."""

    def __init__(self):
        self.signal = None
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame):
        if self.signal:
            raise KeyboardInterrupt
        self.signal = signal.Signals(signum).name
        print(
            f"\n{self.signal}: stopping after this step (send it again to abort at once)",
            file=sys.stderr,
        )
