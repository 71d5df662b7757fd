"""``nvae-train``: train NVAE on a config's dataset, writing the run directory ``--out``.

The loop itself (exact resume, strategies, callbacks) is ``nvae_tf.training.loop.train``.
"""

import sys

from nvae_tf.training.loop import (
    CHECKPOINT_EVERY,
    IMAGE_EVERY,
    KEEP_CHECKPOINTS,
    LOG_EVERY,
    TrainingDiverged,
    train,
)
from trainers.cli import UserError, entry_point, parser, positive_int


def build_parser():
    from nvae_tf.config import PRECISIONS, RECOMPUTE
    from nvae_tf.training.distribute import STRATEGIES

    p = parser(
        "Train NVAE. Writes config.yaml, checkpoints/, metrics.csv and tensorboard/ to "
        "--out, then prints the held-out ELBO."
    )
    p.prog = "nvae-train"
    p.add_argument(
        "--config",
        help="YAML config file (see configs/); with --resume, defaults to the run's config.yaml",
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config field (repeatable)",
    )
    p.add_argument("--data", metavar="DIR", help="dataset directory (sets data_dir)")
    p.add_argument("--out", required=True, metavar="DIR", help="run directory to write")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out from its latest checkpoint, exactly",
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
        "--keep-checkpoints",
        type=positive_int,
        default=KEEP_CHECKPOINTS,
        metavar="N",
        help=f"checkpoints to keep (default {KEEP_CHECKPOINTS})",
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
    from nvae_tf.training.distribute import make_strategy, set_cluster

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
            keep_checkpoints=args.keep_checkpoints,
        )
    except TrainingDiverged as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
