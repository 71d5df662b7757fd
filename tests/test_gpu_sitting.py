"""The GPU sitting's harness (benchmarks/gpu_sitting.py) with fake children: timed sections
take turns, failures and time-outs are recorded with their log, results are written as jobs
finish. No GPU and no model: the children are small Python scripts under the protocol."""

import fcntl
import itertools
import json
import os
import sys
import textwrap

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
BENCH = os.path.join(os.path.dirname(HERE), "benchmarks")
sys.path.insert(0, BENCH)

import bench_protocol  # noqa: E402
import gpu_sitting  # noqa: E402

# A child under the protocol whose operations sleep and log when each timed call ran.
FAKE_CHILD = textwrap.dedent(
    """
    import sys, time
    sys.path.insert(0, {bench!r})
    import bench_protocol as protocol
    mode, log, lives = sys.argv[1], sys.argv[2], sys.argv[3]
    with open(lives, "a") as f:
        f.write(f"{{sys.argv[4]}} begin {{time.time()}}\\n")
    if mode == "fail":
        sys.exit("ValueError: the bad input")
    if mode == "hang":
        time.sleep(120)
    calls = []

    def op(*_):
        start = time.time()
        time.sleep(0.15)
        calls.append((start, time.time()))

    args = protocol.argparse.Namespace(warmup=0, steps=3, sample_batch=2, sample_temperature=1.0,
                                       sample_calls=2, only=["train", "sample"])
    ops = protocol.Operations(op, op, op, lambda: 7, peak_device_mb=lambda: 42.0)
    protocol.measure(ops, protocol.ChildFigures(batch=2, batch_sum=0.0, versions={{}}), args)
    with open(log, "a") as f:
        # The first step and the first sampling call run outside the device's turns.
        for start, end in calls[1:4] + calls[5:]:
            f.write(f"{{start}} {{end}}\\n")
    with open(lives, "a") as f:
        f.write(f"{{sys.argv[4]}} end {{time.time()}}\\n")
    """
)


@pytest.fixture
def fake_sitting(tmp_path, monkeypatch):
    """gpu_sitting.main over fake jobs whose name is the child's mode."""
    script = tmp_path / "child.py"
    script.write_text(FAKE_CHILD.format(bench=BENCH))
    log = tmp_path / "calls.log"
    official = tmp_path / "official"
    official.mkdir()
    (official / "model.py").write_text("")
    (official / "official_bench.py").write_text("")

    lives = tmp_path / "lives.log"

    def run(modes, budget=120, timeout_s=60, waves=None):
        waves = waves or [1] * len(modes)
        jobs = tuple(
            gpu_sitting.Job(m, "nvae-tf", "x", 2, (), (), timeout_s, wave)
            for m, wave in zip(modes, waves)
        )
        monkeypatch.setattr(gpu_sitting, "JOBS", jobs)
        monkeypatch.setattr(
            gpu_sitting,
            "command_for",
            lambda job, args: [
                *(sys.executable, str(script), job.name.split()[0], str(log), str(lives)),
                job.name.replace(" ", "-"),
            ],
        )
        argv = ["--official", str(official), "--harness", str(official), "--out"]
        code = gpu_sitting.main([*argv, str(tmp_path / "out"), "--budget", str(budget)])
        (results,) = (tmp_path / "out").glob("gpu-sitting-*.json")
        run.lives = {}
        for line in lives.read_text().splitlines() if lives.exists() else []:
            name, event, at = line.split()
            run.lives.setdefault(name, {})[event] = float(at)
        return code, json.loads(results.read_text()), log

    return run


def test_timed_sections_of_parallel_children_take_turns(fake_sitting):
    code, results, log = fake_sitting(["ok a", "ok b", "ok c"])
    assert code == 0
    assert [o["status"] for o in results["outcomes"]] == ["ok"] * 3
    figures = results["outcomes"][0]["figures"]
    assert figures["params"] == 7 and figures["peak_device_mb"] == 42.0
    assert figures["first_step_s"] > 0.1 and len(figures["train_step_s"]) == 3
    spans = sorted(tuple(map(float, line.split())) for line in log.read_text().splitlines())
    assert len(spans) == 3 * 5  # each child's 3 timed steps and 2 timed sampling calls
    for (_, end), (start, _) in itertools.pairwise(spans):
        assert start >= end - 1e-3  # no two timed calls at once


def test_a_failure_and_a_time_out_are_recorded_with_their_log(fake_sitting):
    code, results, _ = fake_sitting(["fail", "hang", "ok"], timeout_s=10)
    failed, hung, ok = results["outcomes"]
    assert code == 0 and ok["status"] == "ok"
    assert failed["status"] == "failed" and "ValueError: the bad input" in failed["error"]
    assert failed["log_tail"][-1] == "ValueError: the bad input"
    assert hung["status"] == "timed out" and 10 <= hung["wall_s"] < 30


def test_a_wave_starts_when_the_one_before_is_done(fake_sitting):
    code, results, _ = fake_sitting(["ok a", "ok b", "ok c"], waves=[2, 1, 1])
    assert code == 0 and [o["status"] for o in results["outcomes"]] == ["ok"] * 3
    lives = fake_sitting.lives
    first_wave_done = max(lives["ok-b"]["end"], lives["ok-c"]["end"])
    assert lives["ok-a"]["begin"] >= first_wave_done  # listed first, but of the later wave
    assert lives["ok-c"]["begin"] < lives["ok-b"]["end"]  # one wave's jobs run together


def test_jobs_left_when_the_budget_runs_out_are_not_started(fake_sitting):
    _, results, _ = fake_sitting(["ok"], budget=30)
    assert results["outcomes"][0]["status"] == "not started"


def test_a_missing_original_is_one_line_and_exit_2(tmp_path, capsys):
    argv = ["--official", str(tmp_path), "--harness", str(tmp_path), "--out", str(tmp_path)]
    assert gpu_sitting.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("gpu_sitting: no ") and "model.py" in err and "\n" not in err
    assert not list(tmp_path.glob("gpu-sitting-*.json"))


def test_the_device_turn_is_exclusive(tmp_path, monkeypatch):
    lock = tmp_path / "device.lock"
    monkeypatch.setenv("BENCH_DEVICE_LOCK", str(lock))
    with bench_protocol.device_turn(), open(lock) as other, pytest.raises(BlockingIOError):
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
    with open(lock) as other:  # released on leaving
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)


def test_every_named_job_has_a_config_and_both_sides_where_they_compare():
    for job in (*gpu_sitting.JOBS, *gpu_sitting.XLA_JOBS):
        assert os.path.isfile(os.path.join(gpu_sitting.ROOT, "configs", f"{job.config}.yaml"))
    names = {(j.name, j.side) for j in gpu_sitting.JOBS}
    for compared in ("cifar10 b32", "celebahq256 b4", "celebahq256 b8"):
        assert {(compared, "nvae-tf"), (compared, "original")} <= names


def test_xla_jobs_split_the_compile_over_the_cores_and_keep_the_users_flags(tmp_path):
    job = gpu_sitting.XLA_JOBS[0]
    assert "--xla_gpu_force_compilation_parallelism=" in job.xla_flags
    show = [sys.executable, "-c", "import os; print(os.environ['XLA_FLAGS'])"]
    outcome = gpu_sitting.Outcome({}, show)
    child = gpu_sitting.Running(job, outcome, {"XLA_FLAGS": "--mine", "PATH": ""}, str(tmp_path))
    child.proc.wait()
    printed = os.read(child.proc.stdout.fileno(), 1 << 16).decode().strip()
    child.finish()
    assert printed == f"--mine {job.xla_flags}"
