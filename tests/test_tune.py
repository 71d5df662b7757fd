"""nvae-tune: search-space parsing, the tuner's bookkeeping (with a stand-in for training), and
a real tiny search on the bundled digits that trains, fails a diverging trial and resumes."""

import csv
import glob
import math
import os
import pathlib
import subprocess
import sys

import keras_tuner
import pytest
import yaml

from nvae_tf.config import NVAEConfig
from nvae_tf.run_dir import config_path
from nvae_tf.training.tuning import (
    BEST_CONFIG,
    HYPERBAND_MAX_EPOCHS,
    MAX_CONSECUTIVE_FAILURES,
    OBJECTIVE,
    TRIALS_CSV,
    NVAEHyperModel,
    SearchSpaceError,
    TuningError,
    load_search_space,
    make_tuner,
    parse_search_space,
)
from trainers import tune as tune_cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(
    dataset="bundled_mnist",
    epochs=2,
    batch_size=8,
    warmup_epochs=0,
    num_channels_enc=4,
    num_channels_dec=4,
    num_latent_scales=1,
    num_groups_per_scale=1,
    num_preprocess_blocks=1,
    num_preprocess_cells=1,
    num_postprocess_blocks=1,
    num_postprocess_cells=1,
    num_latent_per_group=4,
    use_se=False,
    max_skipped_steps=2,
)


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# --- search-space parsing -------------------------------------------------------------------
def test_space_declares_keras_tuner_parameters():
    space = yaml.safe_load("""
        learning_rate: {log_range: [1e-3, 1.0e-2]}   # "1e-3" is a string to PyYAML
        kl_anneal_portion: {range: [0.1, 0.5], step: 0.1}
        num_groups_per_scale: {range: [2, 8], step: 2}
        num_latent_per_group: {log_range: [4, 32]}
        num_nf: {choice: [0, 1, 2]}
        weight_decay_norm_anneal: {choice: [false, true]}
        use_se: {choice: [false]}
        num_channels: {choice: [8, 16]}
    """)
    params = {p.name: p for p in parse_search_space(space)}
    assert list(params) == list(space)
    hp = keras_tuner.HyperParameters()
    for p in params.values():
        p.declare(hp)
    kinds = {h.name: type(h).__name__ for h in hp.space}
    assert kinds == {
        "learning_rate": "Float",
        "kl_anneal_portion": "Float",
        "num_groups_per_scale": "Int",
        "num_latent_per_group": "Int",
        "num_nf": "Choice",
        "weight_decay_norm_anneal": "Boolean",
        "use_se": "Fixed",
        "num_channels": "Choice",
    }
    by_name = {h.name: h for h in hp.space}
    assert by_name["learning_rate"].sampling == "log"
    assert by_name["learning_rate"].min_value == pytest.approx(1e-3)
    assert by_name["num_groups_per_scale"].step == 2
    assert by_name["num_latent_per_group"].sampling == "log"
    assert params["num_channels"].fields == ("num_channels_enc", "num_channels_dec")

    # Sampled values become a config; the tied key sets both widths.
    hypermodel = NVAEHyperModel(NVAEConfig(**TINY), params.values(), train_fn=None)
    hp.values.update(num_channels=16, num_nf=2, learning_rate=3e-3)
    config = hypermodel.build(hp)
    assert (config.num_channels_enc, config.num_channels_dec) == (16, 16)
    assert config.num_nf == 2 and config.learning_rate == 3e-3
    assert config.use_se is False and config.weight_decay_norm_anneal is False


@pytest.mark.parametrize(
    "space, message",
    [
        ({}, "non-empty mapping"),
        ([1, 2], "non-empty mapping"),
        (
            {"learning_rat": {"choice": [1.0]}},
            "unknown search space key(s) learning_rat; valid keys "
            "are num_channels, num_cell_per_cond, dataset",
        ),
        ({"learning_rate": [1e-3, 1e-2]}, "'learning_rate': expected exactly one of"),
        ({"learning_rate": {"choice": [1e-3], "range": [1e-3, 1e-2]}}, "expected exactly one of"),
        (
            {"learning_rate": {"range": [1e-2, 1e-3]}},
            "'learning_rate': range needs finite low < high",
        ),
        ({"learning_rate": {"range": [1e-3]}}, "range must be [low, high]"),
        ({"learning_rate": {"log_range": [0.0, 1e-2]}}, "log_range needs low > 0"),
        ({"learning_rate": {"log_range": [1e-3, 1e-2], "step": 2}}, "unexpected entry step"),
        ({"num_nf": {"range": [0, 2], "sampling": "log"}}, "unexpected entry sampling"),
        ({"num_nf": {"range": [0, 4], "step": 0}}, "step must be > 0"),
        ({"num_nf": {"range": [0, 2.5]}}, "'num_nf': config key 'num_nf' must be int"),
        ({"num_nf": {"choice": []}}, "choice must be a non-empty list"),
        ({"num_nf": {"choice": [1, "two"]}}, "must be int, got str 'two'"),
        ({"num_nf": {"choice": [1, 1]}}, "lists a value twice"),
        ({"use_se": {"range": [0, 1]}}, "range needs a numeric field; use_se is bool (use choice)"),
        (
            {"num_channels": {"choice": [8]}, "num_channels_dec": {"choice": [8]}},
            "keys 'num_channels' and 'num_channels_dec' both set num_channels_dec",
        ),
    ],
)
def test_space_errors_are_one_line_and_name_the_key(space, message):
    with pytest.raises(SearchSpaceError) as info:
        parse_search_space(space)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_space_file_errors(tmp_path):
    with pytest.raises(SearchSpaceError, match="not found"):
        load_search_space(str(tmp_path / "missing.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("learning_rate: {choice: [1\n")
    with pytest.raises(SearchSpaceError, match="not valid YAML"):
        load_search_space(str(bad))


def test_cli_reports_a_bad_space_in_one_line(tmp_path, capsys):
    base, space = tmp_path / "base.yaml", tmp_path / "space.yaml"
    base.write_text(yaml.safe_dump(TINY))
    space.write_text("num_chanels: {choice: [4, 8]}\n")
    code = tune_cli.main(
        ["--config", str(base), "--space", str(space), "--out", str(tmp_path / "out")]
    )
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: unknown search space key(s) num_chanels") and err.count("\n") == 1
    assert not os.path.exists(tmp_path / "out")


SHIPPED_CONFIGS = sorted(
    set(glob.glob(os.path.join(REPO, "configs", "*.yaml")))
    - {os.path.join(REPO, "configs", "search_space.yaml")}
)


@pytest.mark.parametrize("config", SHIPPED_CONFIGS, ids=os.path.basename)
def test_default_space_gives_valid_configs(config):
    """Every point the shipped space can produce is a valid config for every shipped config."""
    params, _ = load_search_space(os.path.join(REPO, "configs", "search_space.yaml"))
    hypermodel = NVAEHyperModel(NVAEConfig.from_yaml(config), params, train_fn=None)
    hp = keras_tuner.HyperParameters()
    hypermodel.declare_hyperparameters(hp)
    for seed in range(20):
        for h in hp.space:
            hp.values[h.name] = h.random_sample(seed)
        hypermodel.build(hp)  # raises FailedTrialError on an invalid config
    for bound in ("min_value", "max_value"):
        for h in hp.space:
            if hasattr(h, bound):
                hp.values[h.name] = getattr(h, bound)
        hypermodel.build(hp)


# --- tuner bookkeeping, with a stand-in for training ---------------------------------------
class FakeTraining:
    """Records each call and writes a minimal run directory; the objective is |log10(lr) + 2.5|,
    so 10^-2.5 is best. A run resumed from a copied directory continues from its saved step."""

    def __init__(self, objective=None):
        self.calls = []
        self.objective = objective or (lambda c: abs(math.log10(c.learning_rate) + 2.5))

    def __call__(self, config, run_dir, *, steps, resume):
        step_file = os.path.join(run_dir, "step")
        start = int(pathlib.Path(step_file).read_text()) if resume else 0
        self.calls.append(
            {
                "run_dir": run_dir,
                "steps": steps,
                "resume": resume,
                "start": start,
                "lr": config.learning_rate,
            }
        )
        os.makedirs(run_dir, exist_ok=True)
        config.to_yaml(config_path(run_dir))
        with open(step_file, "w") as f:
            f.write(str(steps))
        return {
            "step": steps,
            "skipped_steps": 0,
            "test_nelbo": 1.0,
            OBJECTIVE: self.objective(config),
        }


def fake_tuner(out, space, training, kind="random", max_trials=4, steps=10, **base):
    params = parse_search_space(space)
    hypermodel = NVAEHyperModel(NVAEConfig(**{**TINY, **base}), params, training)
    return make_tuner(
        kind, hypermodel, str(out), max_trials=max_trials, steps_per_trial=steps, seed=1
    )


LR_SPACE = {"learning_rate": {"log_range": [1e-4, 1e-1]}}


def test_failed_trials_are_recorded_and_the_search_goes_on(tmp_path):
    def objective(config):
        if config.learning_rate > 1e-2:
            return float("nan")  # a run whose held-out ELBO is not finite
        return abs(math.log10(config.learning_rate) + 2.5)

    training = FakeTraining(objective)
    # lr_min 1.0 > lr is invalid; it comes first, so the space's default point is invalid too.
    space = {**LR_SPACE, "learning_rate_min": {"choice": [1.0, 1e-4]}}
    tuner = fake_tuner(tmp_path, space, training, max_trials=8)
    tuner.search()
    rows = read_csv(tmp_path / TRIALS_CSV)
    assert len(rows) == 8
    statuses = {}
    for row in rows:
        lr, lr_min = float(row["learning_rate"]), float(row["learning_rate_min"])
        if lr_min > lr:
            assert row["status"] == "FAILED" and row["reason"].startswith(
                "invalid config: learning_rate_min (1.0) must not exceed learning_rate"
            )
        elif lr > 1e-2:
            assert row["status"] == "FAILED"
            assert row["reason"] == "diverged: the held-out negative ELBO is nan bits/dim"
        else:
            assert row["status"] == "COMPLETED" and row["reason"] == ""
            assert float(row[OBJECTIVE]) == pytest.approx(abs(math.log10(lr) + 2.5))
        statuses[row["status"]] = statuses.get(row["status"], 0) + 1
    assert statuses["FAILED"] >= 1 and statuses["COMPLETED"] >= 1
    # Invalid configs never reach training.
    assert len(training.calls) == sum(
        float(r["learning_rate_min"]) <= float(r["learning_rate"]) for r in rows
    )
    # Best first: completed rows sorted by objective, then the failed ones.
    done = [float(r[OBJECTIVE]) for r in rows if r["status"] == "COMPLETED"]
    assert done == sorted(done) and rows[0]["status"] == "COMPLETED"
    best = NVAEConfig.from_yaml(tmp_path / BEST_CONFIG)
    assert best.learning_rate == pytest.approx(float(rows[0]["learning_rate"]))
    assert best.replace(
        learning_rate=TINY.get("learning_rate", 1e-2), learning_rate_min=1e-4
    ) == NVAEConfig(**TINY)


def test_skipped_steps_fail_a_trial(tmp_path):
    class Skipping(FakeTraining):
        def __call__(self, *args, **kwargs):
            return {**super().__call__(*args, **kwargs), "skipped_steps": 3}

    tuner = fake_tuner(tmp_path, LR_SPACE, Skipping(), max_trials=1)
    tuner.search()
    (row,) = read_csv(tmp_path / TRIALS_CSV)
    assert row["status"] == "FAILED"
    assert row["reason"] == "diverged: 3 of 10 steps had a non-finite loss or gradients (skipped)"
    assert not os.path.exists(tmp_path / BEST_CONFIG)


def test_resume_runs_only_the_missing_trials(tmp_path):
    training = FakeTraining()
    fake_tuner(tmp_path, LR_SPACE, training, max_trials=3).search()
    assert len(training.calls) == 3
    fake_tuner(tmp_path, LR_SPACE, training, max_trials=3).search()
    assert len(training.calls) == 3  # nothing new
    fake_tuner(tmp_path, LR_SPACE, training, max_trials=5).search()
    assert len(training.calls) == 5
    assert len(read_csv(tmp_path / TRIALS_CSV)) == 5


def test_an_interrupted_trial_continues_from_its_run_directory(tmp_path):
    class Interrupted(FakeTraining):
        def __call__(self, config, run_dir, **kwargs):
            super().__call__(config, run_dir, **kwargs)
            raise KeyboardInterrupt  # as nvae-train's TrainingInterrupted after a checkpoint

    with pytest.raises(KeyboardInterrupt):
        fake_tuner(tmp_path, LR_SPACE, Interrupted(), max_trials=2).search()
    training = FakeTraining()
    fake_tuner(tmp_path, LR_SPACE, training, max_trials=2).search()
    assert [c["resume"] for c in training.calls] == [True, False]
    assert training.calls[0]["run_dir"].endswith(os.path.join("trials", "0"))
    assert [r["status"] for r in read_csv(tmp_path / TRIALS_CSV)] == ["COMPLETED"] * 2


def test_consecutive_failures_stop_the_search_with_its_state_saved(tmp_path):
    training = FakeTraining(lambda c: float("inf"))
    with pytest.raises(TuningError, match=f"the last {MAX_CONSECUTIVE_FAILURES} trials failed"):
        fake_tuner(tmp_path, LR_SPACE, training, max_trials=20).search()
    rows = read_csv(tmp_path / TRIALS_CSV)
    assert [r["status"] for r in rows] == ["FAILED"] * MAX_CONSECUTIVE_FAILURES
    # The saved state is consistent: resuming does not re-run the failed trials.
    with pytest.raises(TuningError):
        fake_tuner(tmp_path, LR_SPACE, training, max_trials=20).search()
    assert len(training.calls) == MAX_CONSECUTIVE_FAILURES + 1


def test_hyperband_budgets_and_promotions_continue_the_parent_run(tmp_path):
    training = FakeTraining()
    steps = 90
    tuner = fake_tuner(tmp_path, LR_SPACE, training, kind="hyperband", max_trials=13, steps=steps)
    tuner.search()
    assert len(training.calls) == 13  # --max-trials caps Hyperband too
    budgets = {steps // 9, steps // 3, steps}
    assert {c["steps"] for c in training.calls} <= budgets
    trials = tuner.oracle.trials
    promoted = [t for t in trials.values() if "tuner/trial_id" in t.hyperparameters.values]
    assert promoted, "13 trials fill the first bracket (9 + 3 + 1)"
    for trial in promoted:
        values = trial.hyperparameters.values
        call = next(c for c in training.calls if os.path.basename(c["run_dir"]) == trial.trial_id)
        parent = trials[values["tuner/trial_id"]]
        assert call["resume"] is True
        assert call["start"] == math.ceil(
            steps * parent.hyperparameters.values["tuner/epochs"] / HYPERBAND_MAX_EPOCHS
        )
        assert call["steps"] > call["start"]
        assert call["lr"] == parent.hyperparameters.values["learning_rate"]


def test_bayesian_search_or_a_clear_missing_dependency_error(tmp_path):
    try:
        import scipy.optimize  # noqa: F401
        import sklearn.gaussian_process  # noqa: F401
    except ImportError:
        with pytest.raises(TuningError, match="needs scipy and scikit-learn"):
            fake_tuner(tmp_path, LR_SPACE, FakeTraining(), kind="bayesian")
        return
    training = FakeTraining()
    fake_tuner(tmp_path, LR_SPACE, training, kind="bayesian", max_trials=5).search()
    rows = read_csv(tmp_path / TRIALS_CSV)
    assert [r["status"] for r in rows] == ["COMPLETED"] * 5 and len(training.calls) == 5


def test_failure_reason_is_the_last_line_of_the_traceback():
    from nvae_tf.training.tuning import failure_reason

    trace = (
        'Traceback (most recent call last):\n  File "x.py", line 1\n'
        "keras_tuner.src.errors.FailedTrialError: diverged: loss is nan\n"
    )
    assert failure_reason(trace) == "diverged: loss is nan"
    assert (
        failure_reason("Traceback...\n    ValueError: in user code:\n\n    ValueError: bad shape\n")
        == "ValueError: bad shape"
    )
    assert failure_reason(None) == ""


# --- a real search on the bundled digits ---------------------------------------------------
@pytest.fixture(scope="module")
def real_search(tmp_path_factory):
    """3 trials x 3 steps of a tiny model: one trains, one diverges (lr 1e6), one is invalid
    (lr below learning_rate_min)."""
    root = tmp_path_factory.mktemp("tune")
    base, space = root / "base.yaml", root / "space.yaml"
    base.write_text(yaml.safe_dump(TINY))
    space.write_text("learning_rate: {choice: [1.0e-3, 1.0e+6, 1.0e-5]}\n")
    args = [
        "--config",
        str(base),
        "--space",
        str(space),
        "--out",
        str(root / "out"),
        "--max-trials",
        "3",
        "--steps-per-trial",
        "3",
        "--progress",
        "0",
    ]
    code = tune_cli.main(args)
    return root, args, code


def test_real_search_records_trained_diverged_and_invalid_trials(real_search):
    root, _, code = real_search
    out = root / "out"
    assert code == 0
    rows = {float(r["learning_rate"]): r for r in read_csv(out / TRIALS_CSV)}
    assert sorted(rows) == [1e-5, 1e-3, 1e6]
    good, diverged, invalid = rows[1e-3], rows[1e6], rows[1e-5]
    assert good["status"] == "COMPLETED" and good["steps"] == "3"
    assert 0 < float(good[OBJECTIVE]) < 2
    assert diverged["status"] == "FAILED" and diverged["reason"].startswith("diverged:")
    assert "non-finite" in diverged["reason"]
    assert invalid["status"] == "FAILED"
    assert invalid["reason"].startswith("invalid config: learning_rate_min")
    run = out / "trials" / good["trial_id"]  # a normal nvae-train run directory
    assert NVAEConfig.from_yaml(config_path(str(run))).learning_rate == 1e-3
    assert glob.glob(str(run / "checkpoints" / "ckpt-3*"))
    assert not (out / "trials" / invalid["trial_id"]).exists()


def test_best_config_trains_with_nvae_train(real_search):
    from trainers import train as train_cli

    root, _, _ = real_search
    best = NVAEConfig.from_yaml(root / "out" / BEST_CONFIG)
    assert best == NVAEConfig(**{**TINY, "learning_rate": 1e-3})
    code = train_cli.main(
        [
            "--config",
            str(root / "out" / BEST_CONFIG),
            "--out",
            str(root / "best_run"),
            "--steps",
            "1",
            "--progress",
            "0",
        ]
    )
    assert code == 0


def test_real_search_resumes_without_new_trials(real_search, capsys):
    root, args, _ = real_search
    out = root / "out"
    before = sorted(os.listdir(out / "trials"))
    csv_before = (out / TRIALS_CSV).read_text()
    assert tune_cli.main(args) == 0
    assert "Reloading Tuner" in capsys.readouterr().out
    assert sorted(os.listdir(out / "trials")) == before
    assert (out / TRIALS_CSV).read_text() == csv_before
    # A different search in the same directory is refused.
    changed = [a if a != "3" else "4" for a in args]  # other --max-trials/--steps-per-trial
    assert tune_cli.main(changed) == 2
    assert "holds a different search (steps_per_trial changed)" in capsys.readouterr().err


@pytest.mark.slow
def test_search_under_mirrored_strategy_and_mixed_precision(tmp_path):
    """Trials one after another on 2 replicas (2 logical CPUs, set before TF starts, hence the
    subprocess) with bfloat16 compute: the strategy and the precision reach every trial."""
    base, space = tmp_path / "base.yaml", tmp_path / "space.yaml"
    base.write_text(yaml.safe_dump(TINY))
    space.write_text("learning_rate: {choice: [1.0e-3, 2.0e-3]}\n")
    script = (
        "import sys, tensorflow as tf\n"
        "cpu = tf.config.list_physical_devices('CPU')[0]\n"
        "two = [tf.config.LogicalDeviceConfiguration()] * 2\n"
        "tf.config.set_logical_device_configuration(cpu, two)\n"
        "from trainers.tune import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    env = {
        **os.environ,
        "PYTHONPATH": REPO,
        "TF_CPP_MIN_LOG_LEVEL": "3",
        "CUDA_VISIBLE_DEVICES": "",
    }
    out = tmp_path / "out"
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            script,
            "--config",
            str(base),
            "--space",
            str(space),
            "--out",
            str(out),
            "--max-trials",
            "2",
            "--steps-per-trial",
            "2",
            "--strategy",
            "mirrored",
            "--precision",
            "mixed_bfloat16",
            "--progress",
            "2",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = read_csv(out / TRIALS_CSV)
    assert [r["status"] for r in rows] == ["COMPLETED"] * 2, [r["reason"] for r in rows]
    assert NVAEConfig.from_yaml(out / BEST_CONFIG).precision == "mixed_bfloat16"
    assert "global batch 16 (2 replica(s))" in proc.stdout
