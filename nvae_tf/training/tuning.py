"""Hyperparameter search over ``NVAEConfig`` with keras-tuner: search space, HyperModel, tuner.

A search space is a small YAML mapping from config field names to one of::

    learning_rate: {log_range: [1.0e-3, 1.0e-2]}      # log-uniform between the bounds
    kl_anneal_portion: {range: [0.1, 0.5]}           # uniform; `step: 0.1` makes it a grid
    num_groups_per_scale: {range: [2, 8], step: 2}   # int fields stay ints
    num_nf: {choice: [0, 1, 2]}                      # one of the listed values

Two extra names set a pair of fields together, because the paper always keeps them equal:
``num_channels`` (``num_channels_enc`` and ``num_channels_dec``) and ``num_cell_per_cond``
(``num_cell_per_cond_enc`` and ``num_cell_per_cond_dec``).

``NVAEHyperModel.build(hp)`` samples the space and returns the trial's ``NVAEConfig`` (the base
config with the sampled values); ``fit`` trains it for a fixed number of steps and reports the
held-out negative ELBO in bits/dim. An invalid sampled config or a diverging run raises
``keras_tuner.errors.FailedTrialError`` with the reason, so the search goes on.

``make_tuner`` pairs it with a random, Bayesian or Hyperband oracle in an ``NVAETuner``, which
trains each trial as an ``nvae-train`` run directory ``DIR/trials/<trial_id>``, keeps
keras-tuner's resumable state in ``DIR/keras_tuner`` and rewrites ``DIR/trials.csv`` and
``DIR/best_config.yaml`` after every trial.
"""

import csv
import dataclasses
import math
import os
import shutil
import typing

import keras
import keras_tuner
import tensorflow as tf

from nvae_tf.config import ConfigError, NVAEConfig, _coerce, read_yaml
from nvae_tf.data import DataError
from nvae_tf.files import write_atomically
from nvae_tf.run_dir import config_path

OBJECTIVE = "test_bpd"  # held-out negative ELBO, bits/dim (lower is better): train()'s key
TUNERS = ("random", "bayesian", "hyperband")
PROJECT = "keras_tuner"  # keras-tuner's state: DIR/keras_tuner/{oracle.json,trial_*/trial.json}
TRIALS_DIR = "trials"  # each trial is an nvae-train run directory: DIR/trials/<trial_id>/
TRIALS_CSV = "trials.csv"
BEST_CONFIG = "best_config.yaml"
MAX_CONSECUTIVE_FAILURES = 5
HYPERBAND_MAX_EPOCHS = 9  # Hyperband budget units: a trial of tuner/epochs e trains
HYPERBAND_FACTOR = 3  # ceil(steps_per_trial * e / 9) steps, so rungs are 1/9, 1/3 and 1
TIED = {
    "num_channels": ("num_channels_enc", "num_channels_dec"),
    "num_cell_per_cond": ("num_cell_per_cond_enc", "num_cell_per_cond_dec"),
}
KINDS = ("choice", "range", "log_range")


class SearchSpaceError(ConfigError):
    """A search-space file that cannot be used (message is one line)."""


class TuningError(keras_tuner.errors.FatalError):
    """A problem that stops the whole search, not just one trial (message is one line)."""


@dataclasses.dataclass(frozen=True)
class Param:
    """One searched name: the config fields it sets and how keras-tuner samples it."""

    name: str
    fields: tuple
    kind: str  # "choice", "range" or "log_range"
    values: tuple = ()  # choice
    low: typing.Any = None  # range, log_range
    high: typing.Any = None
    step: typing.Any = None  # range only

    def declare(self, hp):
        """Register the parameter with ``hp`` and return this trial's value."""
        if self.kind == "choice":
            if len(self.values) == 1:
                return hp.Fixed(self.name, self.values[0])
            if isinstance(self.values[0], bool):  # keras-tuner's Choice turns bools into ints
                return hp.Boolean(self.name, default=self.values[0])
            return hp.Choice(self.name, list(self.values))
        sampling = "log" if self.kind == "log_range" else "linear"
        make = hp.Int if isinstance(self.low, int) else hp.Float
        return make(self.name, self.low, self.high, step=self.step, sampling=sampling)


def _field_types():
    hints = typing.get_type_hints(NVAEConfig)
    return {f.name: hints[f.name] for f in dataclasses.fields(NVAEConfig)}


def _base_type(hint):
    if typing.get_origin(hint) is typing.Union:  # Optional[X]
        return next(a for a in typing.get_args(hint) if a is not type(None))
    return hint


def parse_search_space(values):
    """Check a search-space mapping and return its ``Param``s (in file order)."""
    types = _field_types()
    if not isinstance(values, dict) or not values:
        raise SearchSpaceError(
            "search space must be a non-empty mapping of config field: "
            "{choice: [...]} | {range: [lo, hi]} | {log_range: [lo, hi]}"
        )
    unknown = [k for k in values if k not in types and k not in TIED]
    if unknown:
        raise SearchSpaceError(
            f"unknown search space key(s) {', '.join(map(str, unknown))}; valid keys are "
            f"{', '.join(list(TIED) + list(types))}"
        )
    params, claimed = [], {}
    for name, spec in values.items():
        fields = TIED.get(name, (name,))
        for field in fields:
            if field in claimed:
                raise SearchSpaceError(
                    f"search space keys {claimed[field]!r} and {name!r} both set {field}"
                )
            claimed[field] = name
        params.append(_parse_param(name, fields, spec, _base_type(types[fields[0]])))
    return tuple(params)


def _parse_param(name, fields, spec, hint):
    def fail(message):
        raise SearchSpaceError(f"search space key {name!r}: {message}")

    if not isinstance(spec, dict) or len(set(spec) & set(KINDS)) != 1:
        fail(
            "expected exactly one of {choice: [...]}, {range: [lo, hi]}, {log_range: [lo, hi]}; "
            f"got {spec!r}"
        )
    kind = next(k for k in KINDS if k in spec)
    extra = set(spec) - {kind} - ({"step"} if kind == "range" else set())
    if extra:
        names = ", ".join(sorted(map(str, extra)))
        fail(f"unexpected entr{'ies' if len(extra) > 1 else 'y'} {names} next to {kind}")
    given = spec[kind]

    def coerce(value):
        try:
            return _coerce(fields[0], value, hint)
        except ConfigError as e:
            fail(str(e))

    if kind == "choice":
        if not isinstance(given, list) or not given:
            fail(f"choice must be a non-empty list, got {given!r}")
        choices = tuple(coerce(v) for v in given)
        if len(set(choices)) != len(choices):
            fail(f"choice lists a value twice: {given!r}")
        return Param(name, fields, kind, values=choices)

    if hint not in (int, float):
        fail(f"{kind} needs a numeric field; {fields[0]} is {hint.__name__} (use choice)")
    if not isinstance(given, list) or len(given) != 2:
        fail(f"{kind} must be [low, high], got {given!r}")
    low, high = coerce(given[0]), coerce(given[1])
    if not (math.isfinite(low) and math.isfinite(high) and low < high):
        fail(f"{kind} needs finite low < high, got [{low}, {high}]")
    if kind == "log_range" and low <= 0:
        fail(f"log_range needs low > 0, got {low}")
    step = None
    if "step" in spec:
        step = coerce(spec["step"])
        if not step > 0:
            fail(f"step must be > 0, got {step}")
    return Param(name, fields, kind, low=low, high=high, step=step)


def load_search_space(path):
    """Read and check a search-space YAML file; returns ``(params, raw mapping)``."""
    values = read_yaml(path, "search space file", SearchSpaceError)
    return parse_search_space(values), values


class NVAEHyperModel(keras_tuner.HyperModel):
    """The search space over a base config.

    ``build(hp)`` returns the trial's ``NVAEConfig``; ``fit`` trains it with ``train_fn`` (the
    signature of ``nvae_tf.training.loop.train``, which must raise ``FailedTrialError`` when training
    diverges) and returns the held-out negative ELBO in bits/dim under ``OBJECTIVE``.
    """

    def __init__(self, base_config, params, train_fn):
        super().__init__(name="nvae")
        self.base_config = base_config
        self.params = tuple(params)
        self.train_fn = train_fn

    def declare_hyperparameters(self, hp):
        for param in self.params:
            param.declare(hp)

    def build(self, hp):
        changes = {}
        for param in self.params:
            changes.update(dict.fromkeys(param.fields, param.declare(hp)))
        try:
            return self.base_config.replace(**changes)
        except ConfigError as e:
            raise keras_tuner.errors.FailedTrialError(f"invalid config: {e}") from None

    def fit(self, hp, config, run_dir, steps, resume=False):
        """Train ``config`` in ``run_dir`` until global step ``steps``; returns the metrics."""
        failed = keras_tuner.errors.FailedTrialError
        try:
            result = self.train_fn(config, run_dir, steps=steps, resume=resume)
        except DataError as e:  # the same for every trial: stop the search
            raise TuningError(str(e)) from None
        except ConfigError as e:  # e.g. a sampled batch larger than the data
            raise failed(f"invalid config: {e}") from None
        except tf.errors.ResourceExhaustedError as e:
            raise failed(f"out of memory: {e.message.splitlines()[0]}") from None
        bpd = float(result[OBJECTIVE])
        if not math.isfinite(bpd):
            raise failed(f"diverged: the held-out negative ELBO is {bpd} bits/dim")
        # Under float32/bfloat16 a skipped step means a non-finite loss or gradients; under
        # mixed_float16, dynamic loss scaling also skips overflowing steps on healthy runs.
        if result["skipped_steps"] and config.precision != "mixed_float16":
            raise failed(
                f"diverged: {result['skipped_steps']} of {result['step']} steps had a "
                "non-finite loss or gradients (skipped)"
            )
        return {OBJECTIVE: bpd, "test_nelbo": float(result["test_nelbo"])}


def trial_steps(values, steps_per_trial):
    """Training steps of a trial with hyperparameter ``values`` (Hyperband: its rung's share)."""
    if "tuner/epochs" in values:
        return math.ceil(steps_per_trial * values["tuner/epochs"] / HYPERBAND_MAX_EPOCHS)
    return steps_per_trial


class NVAETuner(keras_tuner.Tuner):
    """Runs each trial as an ``nvae-train`` run in ``DIR/trials/<trial_id>``, one at a time.

    An interrupted trial (keras-tuner re-runs it when the search is resumed) continues from its
    last checkpoint. A Hyperband trial promoted from a parent continues the parent's run: the
    parent's run directory is copied and resumed to the longer step budget, which reproduces an
    uninterrupted run of that length (the schedules span the config's epochs, not the trial).
    """

    def __init__(self, oracle, hypermodel, directory, steps_per_trial):
        self.steps_per_trial = int(steps_per_trial)
        super().__init__(
            oracle, hypermodel, directory=directory, project_name=PROJECT, overwrite=False
        )

    def _populate_initial_space(self):
        # keras-tuner also builds the default point here to find conditional parameters. The
        # space has none, and that point may be an invalid config (a failed trial, not an
        # error), so only declare it.
        hp = self.oracle.get_space()
        self.hypermodel.declare_hyperparameters(hp)
        self.oracle.update_space(hp)

    def run_dir(self, trial_id):
        return os.path.join(self.directory, TRIALS_DIR, str(trial_id))

    def run_trial(self, trial, *args, **kwargs):
        keras.backend.clear_session()  # frees the previous trial's model (runs gc.collect)
        hp = trial.hyperparameters
        config = self.hypermodel.build(hp)
        run_dir = self.run_dir(trial.trial_id)
        resume = os.path.isfile(config_path(run_dir))
        parent = hp.values.get("tuner/trial_id")
        if parent is not None and not resume and os.path.isfile(config_path(self.run_dir(parent))):
            tmp = f"{run_dir}.copying"
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(self.run_dir(parent), tmp)
            os.replace(tmp, run_dir)
            resume = True
        steps = trial_steps(hp.values, self.steps_per_trial)
        return self.hypermodel.fit(hp, config, run_dir, steps, resume=resume)

    def on_trial_end(self, trial):
        super().on_trial_end(trial)  # records and saves the trial
        if trial.status == "FAILED":
            print(f"Failed (trial_id {trial.trial_id}): {failure_reason(trial.message)}")
        self.write_results()
        # keras-tuner's own limit raises inside Oracle.end_trial before the trial is saved, so
        # the limit is checked here, once the state is on disk.
        streak = 0
        for trial_id in self.oracle.end_order:
            failed = self.oracle.trials[trial_id].status == "FAILED"
            streak = streak + 1 if failed else 0
        if streak >= MAX_CONSECUTIVE_FAILURES:
            raise TuningError(
                f"search stopped: the last {streak} trials failed (last: "
                f"{failure_reason(trial.message)})"
            )

    def write_results(self):
        """Write ``trials.csv`` (all trials, best first) and, once a trial completed, the best
        trial's full config as ``best_config.yaml``; returns the table's rows."""
        rows = trial_table(self)
        write_atomically(os.path.join(self.directory, TRIALS_CSV), lambda f: _write_csv(rows, f))
        best = best_config(self)
        if best is not None:
            best.to_yaml(os.path.join(self.directory, BEST_CONFIG))
        return rows


def make_tuner(kind, hypermodel, directory, *, max_trials, steps_per_trial, seed):
    """An ``NVAETuner`` with the ``kind`` oracle, resuming the search saved in ``directory``."""
    common = dict(
        objective=keras_tuner.Objective(OBJECTIVE, direction="min"),
        seed=seed,
        max_consecutive_failed_trials=None,
    )  # checked in NVAETuner.on_trial_end
    if kind == "random":
        oracle = keras_tuner.oracles.RandomSearchOracle(max_trials=max_trials, **common)
    elif kind == "bayesian":
        try:
            oracle = keras_tuner.oracles.BayesianOptimizationOracle(max_trials=max_trials, **common)
        except ImportError:
            raise TuningError(
                "--tuner bayesian needs scipy and scikit-learn: pip install scipy scikit-learn"
            ) from None
    elif kind == "hyperband":
        oracle = keras_tuner.oracles.HyperbandOracle(
            max_epochs=HYPERBAND_MAX_EPOCHS,
            factor=HYPERBAND_FACTOR,
            hyperband_iterations=None,
            **common,
        )  # as many brackets as max_trials allows
        oracle.max_trials = max_trials  # HyperbandOracle has no argument for it
    else:
        raise TuningError(f"tuner must be one of {', '.join(TUNERS)}; got {kind!r}")
    return NVAETuner(oracle, hypermodel, directory, steps_per_trial)


def failure_reason(message):
    """The one-line reason from the traceback keras-tuner stores for a failed trial."""
    lines = [line.strip() for line in (message or "").splitlines() if line.strip()]
    if not lines:
        return ""
    kind, sep, text = lines[-1].partition(": ")
    kind = kind.rsplit(".", 1)[-1]
    if not sep:
        return kind
    return text if kind == "FailedTrialError" else f"{kind}: {text}"


def trial_table(tuner):
    """One dict per trial, best first: id, status, objective, steps, parameters, reason."""
    rows = []
    for trial in tuner.oracle.trials.values():
        values = trial.hyperparameters.values
        done = trial.status == "COMPLETED"
        row = {
            "trial_id": trial.trial_id,
            "status": trial.status,
            OBJECTIVE: float(trial.score) if done else None,
            "steps": trial_steps(values, tuner.steps_per_trial),
        }
        row.update({p.name: values.get(p.name) for p in tuner.hypermodel.params})
        row["reason"] = failure_reason(trial.message) if trial.status == "FAILED" else ""
        rows.append(row)
    rows.sort(key=lambda r: (r[OBJECTIVE] is None, r[OBJECTIVE] or 0.0, r["trial_id"]))
    return rows


def best_config(tuner):
    """The config of the best completed trial, or ``None`` when no trial completed."""
    best = tuner.oracle.get_best_trials(1)
    if not best or best[0].status != "COMPLETED":
        return None
    return tuner.hypermodel.build(best[0].hyperparameters)


def _write_csv(rows, f):
    if not rows:
        return
    writer = csv.DictWriter(f, list(rows[0]))
    writer.writeheader()
    writer.writerows(
        {k: "" if v is None else repr(v) if isinstance(v, float) else v for k, v in row.items()}
        for row in rows
    )
