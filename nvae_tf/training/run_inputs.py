"""What a training run reads, checked before it writes anything: the config against the run
directory (``--resume``), the output's writability, the dataset sizes, the data pipelines and
the fixed held-out probe batch. With several workers, all agree before the chief writes.
``RunInputs`` is a mixin of the loop's ``_Run``, whose fields it fills in.
"""

import sys

from nvae_tf.config import ConfigError

PROBE_IMAGES = 64  # fixed held-out batch for per-group KL, active units and image grids


def check_options(at_least_one, at_least_zero):
    """One-line ``ConfigError`` for a ``train()`` interval or limit out of range."""
    for name, value in at_least_one.items():
        if not value >= 1:
            raise ConfigError(f"{name} must be >= 1, got {value}")
    for name, value in at_least_zero.items():
        if not value >= 0:
            raise ConfigError(f"{name} must be >= 0, got {value}")


class RunInputs:
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
        from nvae_tf.run_dir import check_init_from, check_run_dir, check_writable

        self.saved_config = check_run_dir(self.out_dir, self.config, self.resume)
        if self.init_from:
            check_init_from(self.init_from, self.config)
        if self.resume and self.saved_config is None:
            if self.chief:
                print(f"--resume: {self.out_dir} holds no run yet; starting one", file=sys.stderr)
            self.resume = False
        if self.chief:
            check_writable(self.out_dir)
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
        self.make_datasets()

    def make_datasets(self, seed=None):
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
