"""``nvae-tune``: search NVAE hyperparameters with keras-tuner, using short training runs.

Each trial is the base config (``--config``, ``--set``) with values sampled from the search space
(``--space``, see ``nvae_tf.training.tuning``), trained for ``--steps-per-trial`` steps (the first steps of
the config's own schedule) and scored by the held-out negative ELBO in bits/dim. A trial whose
config is invalid or whose training diverges is recorded as failed, with its reason, and the
search goes on. ``--out`` receives:

    best_config.yaml  the best trial's full config, ready for ``nvae-train --config``
    trials.csv        every trial, best first: id, status, test_bpd, steps, values, reason
    trials/<id>/      each trial's run directory (as written by nvae-train)
    keras_tuner/      keras-tuner's state; the same command again resumes the search
    search.yaml       what defines the search, so a resume cannot silently change it

Both result files are rewritten after every trial.
"""

import math
import os
import sys

from trainers.cli import UserError, add_config_args, entry_point, load_config, parser, positive_int

SEARCH_FILE = "search.yaml"


def build_parser():
    from nvae_tf.config import PRECISIONS
    from nvae_tf.training.tuning import TUNERS

    p = parser(
        "Search NVAE hyperparameters with keras-tuner: short training runs scored by the "
        "held-out negative ELBO (bits/dim). Run the same command again to resume."
    )
    add_config_args(p)
    p.add_argument(
        "--space",
        required=True,
        metavar="YAML",
        help="search space: config field -> {choice: [...]} | {range: [lo, hi]} "
        "(optional step) | {log_range: [lo, hi]} (see configs/search_space.yaml)",
    )
    p.add_argument("--out", required=True, metavar="DIR", help="search directory")
    p.add_argument("--data", metavar="DIR", help="dataset directory (sets data_dir)")
    p.add_argument(
        "--tuner",
        choices=TUNERS,
        default="random",
        help="random (default), bayesian (needs scipy and scikit-learn) or hyperband "
        "(successive halving over trials of 1/9, 1/3 and all of "
        "--steps-per-trial; promoted trials continue their parent's run; its "
        "first bracket is 13 trials)",
    )
    p.add_argument(
        "--max-trials",
        type=positive_int,
        default=10,
        metavar="N",
        help="trials in all, counting those a resumed search already ran (default 10)",
    )
    p.add_argument(
        "--steps-per-trial",
        type=positive_int,
        default=200,
        metavar="N",
        help="training steps of a trial: the first N steps of the config's own "
        "schedule (default 200)",
    )
    p.add_argument(
        "--strategy",
        choices=("auto", "one_device", "mirrored"),
        default="auto",
        help="as nvae-train (trials run one after another in this process): auto "
        "(default) uses every local GPU",
    )
    p.add_argument("--precision", choices=PRECISIONS, help="sets precision")
    p.add_argument(
        "--progress",
        type=int,
        choices=(0, 1, 2),
        default=1,
        help="training output of each trial: 0 none, 1 progress bar (default), "
        "2 one line per epoch",
    )
    return p


def _check_same_search(out, identity):
    """Check that a resumed search in ``out`` is the one recorded there (True if none is)."""
    import yaml

    path = os.path.join(out, SEARCH_FILE)
    if not os.path.isfile(path):
        return True
    with open(path) as f:
        saved = yaml.safe_load(f) or {}
    changed = [key for key in identity if saved.get(key) != identity[key]]
    if changed:
        raise UserError(
            f"{out} holds a different search ({', '.join(changed)} changed): "
            "choose a new --out, or repeat that search's command to resume it"
        )
    return False


def _record_search(out, identity):
    import yaml

    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, SEARCH_FILE), "w") as f:
        yaml.safe_dump(identity, f, sort_keys=False)


def _trial_trainer(strategy, verbose):
    """``nvae_tf.training.loop.train`` for one trial; divergence marks the trial as failed."""
    import keras_tuner

    from nvae_tf.training.loop import TrainingDiverged, train

    def run(config, run_dir, *, steps, resume):
        try:
            return train(
                config, run_dir, steps=steps, resume=resume, strategy=strategy, verbose=verbose
            )
        except TrainingDiverged as e:
            raise keras_tuner.errors.FailedTrialError(f"diverged: {e}") from None

    return run


def print_summary(rows, out):
    """The trials table, best first, and where the best config is."""
    from nvae_tf.training.tuning import BEST_CONFIG, OBJECTIVE

    def text(value):
        if value is None:
            return "-"
        if isinstance(value, float):
            return f"{value:.4g}" if math.isfinite(value) else str(value)
        return str(value)

    if not rows:
        print("no trials yet")
        return
    columns = list(rows[0])
    cells = [[text(row[c]) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    print(f"\nTrials, best first ({OBJECTIVE}: held-out negative ELBO, bits/dim):")
    for line in [columns] + cells:
        print("  ".join(v.ljust(w) for v, w in zip(line, widths)).rstrip())
    done = [r for r in rows if r["status"] == "COMPLETED"]
    failed = sum(r["status"] == "FAILED" for r in rows)
    print(f"{len(rows)} trial(s): {len(done)} completed, {failed} failed")
    if done:
        path = os.path.join(out, BEST_CONFIG)
        print(
            f"best: trial {done[0]['trial_id']} ({OBJECTIVE} {text(done[0][OBJECTIVE])}); "
            f"config written to {path}"
        )
        print(f"train it with: nvae-train --config {path} --out RUN_DIR")


@entry_point
def main(argv=None):
    args = build_parser().parse_args(argv)
    from nvae_tf.run_dir import RESUMABLE_KEYS
    from nvae_tf.training.distribute import cluster_size, make_strategy
    from nvae_tf.training.tuning import NVAEHyperModel, TuningError, load_search_space, make_tuner

    config = load_config(args)
    changes = {
        k: v for k, v in (("data_dir", args.data), ("precision", args.precision)) if v is not None
    }
    config = config.replace(**changes) if changes else config
    params, raw_space = load_search_space(args.space)
    identity = {
        "tuner": args.tuner,
        "steps_per_trial": args.steps_per_trial,
        "space": raw_space,
        "config": {k: v for k, v in config.to_dict().items() if k not in RESUMABLE_KEYS},
    }
    new_search = _check_same_search(args.out, identity)
    if args.strategy == "auto" and cluster_size() > 1:
        raise UserError(
            "nvae-tune runs its trials in one process, but TF_CONFIG names a "
            "cluster: unset it, or pass --strategy one_device or mirrored"
        )
    strategy = make_strategy(args.strategy)
    from keras_tuner.src import config as keras_tuner_config  # no public switch in 1.4

    keras_tuner_config.DEBUG = False  # no traceback per failed trial: its reason is printed,
    # and the traceback stays in keras_tuner/trial_<id>/trial.json
    hypermodel = NVAEHyperModel(config, params, _trial_trainer(strategy, args.progress))
    try:
        tuner = make_tuner(
            args.tuner,
            hypermodel,
            args.out,
            max_trials=args.max_trials,
            steps_per_trial=args.steps_per_trial,
            seed=config.seed,
        )
    except TuningError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if new_search:
        _record_search(args.out, identity)
    status = 0
    try:
        tuner.search_space_summary()
        tuner.search()
    except TuningError as e:
        print(f"error: {e}", file=sys.stderr)
        status = 1
    finally:
        print_summary(tuner.write_results(), args.out)
    return status


if __name__ == "__main__":
    raise SystemExit(main())
