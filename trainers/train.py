"""``nvae-train``: train NVAE on a config's dataset, writing the run directory ``--out``.

The loop itself (exact resume, strategies, callbacks) is ``nvae_tf.training.loop.train``.
"""

import sys

from trainers.cli import (
    UserError,
    add_config_args,
    entry_point,
    non_negative,
    parser,
    positive_int,
)


def build_parser():
    # Imported here, not at module level: TensorFlow loads after cli.quiet_tensorflow.
    from nvae_tf.config import PRECISIONS, RECOMPUTE
    from nvae_tf.training.distribute import STRATEGIES
    from nvae_tf.training.loop import (
        CHECKPOINT_EVERY,
        CHECKPOINT_MINUTES,
        IMAGE_EVERY,
        KEEP_CHECKPOINTS,
        LOG_EVERY,
    )
    from nvae_tf.training.watchdog import HANG_FACTOR, HANG_MIN_SECONDS

    p = parser(
        "Train NVAE. Writes config.yaml, checkpoints/, metrics.csv and tensorboard/ to "
        "--out, then prints the held-out ELBO."
    )
    p.prog = "nvae-train"
    add_config_args(
        p,
        required=False,
        config_help="YAML config file (see configs/); with --resume, defaults to the run's "
        "config.yaml",
    )
    p.add_argument("--data", metavar="DIR", help="dataset directory (sets data_dir)")
    p.add_argument("--out", required=True, metavar="DIR", help="run directory to write")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out exactly, from its newest intact checkpoint (starts "
        "the run if --out holds none yet)",
    )
    p.add_argument(
        "--init-from",
        metavar="RUN",
        help="start from the model weights of this run (same architecture, e.g. an imported "
        "pretrained model); optimizer, step and schedules start fresh",
    )
    p.add_argument(
        "--steps",
        type=positive_int,
        metavar="N",
        help="stop when the run's global step reaches N (steps before --resume "
        "count; the schedules still span the config's epochs)",
    )
    p.add_argument(
        "--strategy",
        choices=STRATEGIES,
        default="auto",
        help="auto: multi_worker with TF_CONFIG/--workers, mirrored with several "
        "GPUs, else one_device (default)",
    )
    p.add_argument(
        "--workers",
        metavar="HOST:PORT,...",
        help="multi-worker cluster (instead of TF_CONFIG); needs --task-index",
    )
    p.add_argument("--task-index", type=int, metavar="I", help="this worker's index in --workers")
    p.add_argument("--precision", choices=PRECISIONS, help="sets precision")
    p.add_argument("--recompute", choices=RECOMPUTE, help="sets recompute")
    p.add_argument("--jit-compile", action="store_true", help="sets jit_compile (XLA)")
    p.add_argument(
        "--log-every",
        type=positive_int,
        default=LOG_EVERY,
        metavar="N",
        help=f"steps between metrics rows (default {LOG_EVERY}; epoch ends always)",
    )
    p.add_argument(
        "--image-every",
        type=positive_int,
        default=IMAGE_EVERY,
        metavar="N",
        help=f"steps between TensorBoard image grids (default {IMAGE_EVERY}; and at the end)",
    )
    p.add_argument(
        "--checkpoint-every",
        type=positive_int,
        default=CHECKPOINT_EVERY,
        metavar="N",
        help=f"steps between checkpoints (default {CHECKPOINT_EVERY}; "
        "epoch ends and the end always)",
    )
    p.add_argument(
        "--checkpoint-minutes",
        type=non_negative,
        default=CHECKPOINT_MINUTES,
        metavar="M",
        help=f"also checkpoint when M minutes passed since the last save (default "
        f"{CHECKPOINT_MINUTES:g}; 0: by steps only)",
    )
    p.add_argument(
        "--keep-checkpoints",
        type=positive_int,
        default=KEEP_CHECKPOINTS,
        metavar="N",
        help=f"checkpoints to keep (default {KEEP_CHECKPOINTS})",
    )
    p.add_argument(
        "--hang-factor",
        type=non_negative,
        default=HANG_FACTOR,
        metavar="F",
        help=f"hang watchdog: a step over F x the recent median step time (and over "
        f"--hang-min-seconds) prints all stacks and exits with status 75 (default "
        f"{HANG_FACTOR:g}; 0: off)",
    )
    p.add_argument(
        "--hang-min-seconds",
        type=non_negative,
        default=HANG_MIN_SECONDS,
        metavar="S",
        help=f"hang watchdog: never declare a hang before S seconds (default {HANG_MIN_SECONDS:g})",
    )
    p.add_argument(
        "--rollbacks",
        type=int,
        default=0,
        metavar="N",
        help="on max_skipped_steps consecutive non-finite steps, roll back to the newest "
        "intact checkpoint with half the learning rate, up to N times (default 0: stop)",
    )
    p.add_argument(
        "--progress",
        type=int,
        choices=(0, 1, 2),
        default=1,
        help="0 quiet, 1 progress bar (default), 2 one line per epoch",
    )
    return p


def config_from_args(args):
    """The config a command line asks for: file (or the run's), then --set, then flags."""
    from nvae_tf.config import NVAEConfig
    from nvae_tf.run_dir import load_run_config

    if args.config:
        config = NVAEConfig.from_yaml(args.config)
    elif args.resume:
        config = load_run_config(args.out)
    else:
        raise UserError("--config is required (or --resume to continue the run in --out)")
    config = config.with_overrides(args.overrides)
    flags = {
        "data_dir": args.data,
        "precision": args.precision,
        "recompute": args.recompute,
        "jit_compile": True if args.jit_compile else None,
    }
    changes = {k: v for k, v in flags.items() if v is not None}
    return config.replace(**changes) if changes else config


@entry_point
def main(argv=None):
    args = build_parser().parse_args(argv)
    from nvae_tf.training.checkpointing import CheckpointSaveError
    from nvae_tf.training.distribute import make_strategy, set_cluster
    from nvae_tf.training.loop import TrainingDiverged, train

    if args.rollbacks < 0:
        raise UserError(f"--rollbacks must be >= 0, got {args.rollbacks}")

    config = config_from_args(args)
    strategy_name = args.strategy
    if args.workers:
        if args.task_index is None:
            raise UserError("--workers needs --task-index (this worker's position in the list)")
        set_cluster([w.strip() for w in args.workers.split(",") if w.strip()], args.task_index)
        strategy_name = "multi_worker" if strategy_name == "auto" else strategy_name
    elif args.task_index is not None:
        raise UserError("--task-index needs --workers")
    try:
        train(
            config,
            args.out,
            steps=args.steps,
            resume=args.resume,
            init_from=args.init_from,
            strategy=make_strategy(strategy_name),
            verbose=args.progress,
            log_every=args.log_every,
            image_every=args.image_every,
            checkpoint_every=args.checkpoint_every,
            checkpoint_minutes=args.checkpoint_minutes,
            keep_checkpoints=args.keep_checkpoints,
            hang_factor=args.hang_factor,
            hang_min_seconds=args.hang_min_seconds,
            max_rollbacks=args.rollbacks,
        )
    except (TrainingDiverged, CheckpointSaveError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
