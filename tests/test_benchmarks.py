"""The side-by-side benchmark harness (benchmarks/side_by_side.py): its arithmetic, the README
table, the child protocol and its errors. No timing target is asserted here."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
BENCH = os.path.join(os.path.dirname(HERE), "benchmarks")
sys.path.insert(0, BENCH)

import bench_protocol  # noqa: E402
import perf_table  # noqa: E402
import side_by_side  # noqa: E402
from bench_results import ORIGINAL, OURS, RunRecord, ratio, summarize  # noqa: E402
from bench_setups import SETUPS, synthetic_images  # noqa: E402

SMALL = os.path.join(os.path.dirname(HERE), "configs", "small.yaml")


def record(side, repeat, startup, step, sample_ms, rss, config="mnist"):
    figures = {"train_s_per_step": step, "sample_ms_per_img": sample_ms, "peak_rss_mb": rss}
    figures["batch_sum"] = 2012.0
    return RunRecord(config, side, repeat, ["cmd"], startup, startup + 10, figures)


def two_sided_runs():
    return [
        record(ORIGINAL, 1, 5.0, 2.4, 12.0, 2400.0),
        record(OURS, 1, 40.0, 1.0, 7.0, 2000.0),
        record(ORIGINAL, 2, 6.0, 2.2, 12.4, 2500.0),
        record(OURS, 2, 20.0, 1.2, 5.0, 2600.0),
    ]


def test_ratios_are_oriented_so_above_one_means_ours_is_faster():
    assert ratio("time", 3.0, 1.5) == 2.0  # original / ours
    assert ratio("rate", 4.0, 6.0) == 1.5  # ours / original
    assert ratio("memory", 1000.0, 2000.0) == 2.0  # ours / original: ours takes 2× more
    assert ratio("time", None, 1.0) is None
    assert ratio("memory", 1000.0, None) is None


def test_summary_takes_medians_ratios_and_targets():
    summary = summarize(two_sided_runs(), {"mnist": 16}, {"mnist": 30.0})["mnist"]
    assert summary["batch"] == 16
    step = summary["figures"]["train_s_per_step"]
    assert step[ORIGINAL] == [2.4, 2.2] and step[OURS] == [1.0, 1.2]
    assert step[f"{ORIGINAL}_median"] == pytest.approx(2.3)
    assert step[f"{OURS}_median"] == pytest.approx(1.1)
    assert step["ratio"] == pytest.approx(2.3 / 1.1)
    assert step["target"] == "≥ 2.0×" and step["met"] is True
    sample = summary["figures"]["sample_ms_per_img"]
    assert sample["ratio"] == pytest.approx(12.2 / 6.0) and sample["met"] is True
    rss = summary["figures"]["peak_rss_mb"]
    assert rss["ratio"] == pytest.approx(2300.0 / 2450.0) and rss["met"] is True
    startup = summary["figures"]["startup_s"]
    assert startup[f"{OURS}_median"] == 30.0 and startup["target"] == "≤ 30 s"
    assert startup["met"] is True  # the median, 30 s, is within ≤ 30 s
    assert "iw_images_per_s" not in summary["figures"]  # not measured: no row
    assert summary["same_batch"] is True


def test_summary_flags_runs_that_trained_on_different_batches():
    runs = two_sided_runs()
    runs[1].figures["batch_sum"] = 2012.0 * (1 + 1e-7)  # float32 summation order: the same
    assert summarize(runs, {"mnist": 16}, {"mnist": 30.0})["mnist"]["same_batch"] is True
    runs[1].figures["batch_sum"] = 2011.0
    assert summarize(runs, {"mnist": 16}, {"mnist": 30.0})["mnist"]["same_batch"] is False


def test_summary_without_the_original_has_no_ratio():
    runs = [r for r in two_sided_runs() if r.side == OURS]
    figure = summarize(runs, {"mnist": 16}, {"mnist": 30.0})["mnist"]["figures"]["train_s_per_step"]
    assert figure[ORIGINAL] == [] and figure["ratio"] is None and figure["met"] is None


def results_document():
    return {
        "date": "2026-11-29T23:00:00",
        "host": "vm",
        "cpus": 2,
        "commit": "0123456789abcdef",
        "versions": {OURS: {"tensorflow": "2.21.0"}, ORIGINAL: {"torch": "2.13.0"}},
        "command": "python benchmarks/side_by_side.py --configs mnist",
        "repeats": 2,
        "summary": summarize(two_sided_runs(), {"mnist": 16}, {"mnist": 30.0}),
    }


def test_table_rows_show_every_run_the_ratio_and_whether_the_target_is_met():
    table = perf_table.render(results_document())
    rows = {
        line.split("|")[3].strip(): line for line in table.splitlines() if line.startswith("| ")
    }
    assert "| mnist | 16 | start-up" in rows["start-up s (process start → first step done)"]
    assert "| 2.4, 2.2 | 1, 1.2 | 2.09× | ≥ 2.0× ✓ |" in rows["train s/step"]
    assert "| 2.3 GB, 2.4 GB | 2.0 GB, 2.5 GB | 0.94× | ≤ 1.0× ✓ |" in rows["peak RSS"]
    assert "PyTorch 2.13.0" in table and "0123456789" in table
    assert table.rstrip().endswith("`python benchmarks/side_by_side.py --configs mnist`")


def test_table_marks_a_missed_target():
    doc = results_document()
    doc["summary"]["mnist"]["figures"]["train_s_per_step"]["met"] = False
    assert "≥ 2.0× ✗" in perf_table.render(doc)


def test_table_refuses_a_file_that_is_not_a_sitting(tmp_path):
    path = tmp_path / "other.json"
    path.write_text(json.dumps({"date": "x"}))
    with pytest.raises(perf_table.TableError, match="not a side-by-side results file"):
        perf_table.render(perf_table.load_results(str(path)))


def test_readme_block_between_the_markers_is_replaced_and_nothing_else():
    text = f"intro\n{perf_table.BEGIN}\nold table\n{perf_table.END}\noutro\n"
    new = perf_table.replace_block(text, "new table")
    assert new == f"intro\n{perf_table.BEGIN}\nnew table\n{perf_table.END}\noutro\n"
    assert perf_table.replace_block(new, "new table") == new  # idempotent


@pytest.mark.parametrize(
    "text",
    [
        "no markers",
        f"{perf_table.END}\n{perf_table.BEGIN}\n",
        f"{perf_table.BEGIN}\n{perf_table.END}\n{perf_table.BEGIN}\n",
    ],
)
def test_readme_without_one_ordered_pair_of_markers_is_refused(text):
    with pytest.raises(perf_table.TableError, match="exactly one"):
        perf_table.replace_block(text, "table")


def test_table_command_updates_the_readme_and_leaves_it_alone_on_error(tmp_path, capsys):
    results = tmp_path / "sitting.json"
    results.write_text(json.dumps(results_document()))
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n{perf_table.BEGIN}\nold\n{perf_table.END}\n")
    assert side_by_side.main(["--table", str(results), "--readme", str(readme)]) == 0
    assert "| mnist | 16 |" in readme.read_text() and "old" not in readme.read_text()
    readme.write_text("# no markers\n")
    assert side_by_side.main(["--table", str(results), "--readme", str(readme)]) == 2
    assert readme.read_text() == "# no markers\n"
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("side_by_side: README needs exactly one")


def test_the_real_readme_has_the_markers():
    with open(os.path.join(os.path.dirname(HERE), "README.md"), encoding="utf-8") as f:
        perf_table.replace_block(f.read(), "table")


def fake_reference(tmp_path):
    official = tmp_path / "reference" / "nvae-official"
    official.mkdir(parents=True)
    (official / "model.py").write_text("")
    (tmp_path / "bench").mkdir()
    (tmp_path / "bench" / "official_bench.py").write_text("")
    return official


def one_line_error(capsys, argv):
    code = side_by_side.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return code, err[0]


def test_a_python_without_torch_is_one_line_and_exit_2(tmp_path, capsys):
    no_torch = tmp_path / "python"
    no_torch.write_text("#!/bin/sh\necho 'ModuleNotFoundError: torch' >&2\nexit 1\n")
    no_torch.chmod(0o755)
    official = fake_reference(tmp_path)
    for python in (str(no_torch), str(tmp_path / "missing-python")):
        argv = ["--official", str(official), "--torch-python", python, "--out", str(tmp_path)]
        code, line = one_line_error(capsys, argv)
        assert code == 2 and "cannot import torch" in line and "--torch-python" in line
    assert [p.name for p in tmp_path.glob("*.json")] == []


def test_a_missing_reference_or_harness_is_one_line_and_exit_2(tmp_path, capsys):
    code, line = one_line_error(capsys, ["--official", str(tmp_path / "nowhere")])
    assert code == 2 and "no original NVAE code" in line
    official = fake_reference(tmp_path)
    argv = ["--official", str(official), "--harness", str(tmp_path)]
    code, line = one_line_error(capsys, argv)
    assert code == 2 and "no official_bench.py" in line


def test_a_bfloat16_sitting_runs_both_sides_in_bfloat16_and_claims_no_target():
    args = side_by_side.parse_args(["--precision", "bfloat16", "--official", "nvae"])
    args.harness = "bench"
    ours = side_by_side.ours_command(SETUPS["cifar10-cpu"], 16, args)
    assert ours[ours.index("precision=mixed_bfloat16") - 1] == "--set"
    assert "num_groups_per_scale=10" in ours  # the setup's own overrides stay
    assert "--bf16" in side_by_side.official_command(SETUPS["mnist"], 16, args)
    float32 = side_by_side.parse_args(["--official", "nvae"])
    float32.harness = "bench"
    assert "--bf16" not in side_by_side.official_command(SETUPS["mnist"], 16, float32)
    assert "precision=mixed_bfloat16" not in side_by_side.ours_command(SETUPS["mnist"], 16, float32)
    summary = summarize(two_sided_runs(), {"mnist": 16}, {}, ratio_targets=False)["mnist"]
    for figure in summary["figures"].values():
        assert figure["target"] is None and figure["met"] is None
    assert summary["figures"]["train_s_per_step"]["ratio"] == pytest.approx(2.3 / 1.1)
    doc = {**results_document(), "precision": "bfloat16", "summary": {"mnist": summary}}
    table = perf_table.render(doc)
    assert "bfloat16 on both sides" in table and "✓" not in table and "✗" not in table
    assert ", float32, " in perf_table.render(results_document())  # older files: float32


def test_child_options_reach_the_child_unchanged():
    parent = side_by_side.parse_args(["--steps", "5", "--iw-samples", "7", "--only", "startup"])
    child = bench_protocol.argparse.ArgumentParser()
    bench_protocol.add_child_args(child)
    passed = child.parse_args(bench_protocol.child_args(parent))
    for name in vars(passed):
        assert getattr(passed, name) == getattr(parent, name), name


class FakeModel:
    def __init__(self):
        self.calls = []

    def operations(self):
        return bench_protocol.Operations(
            train_step=lambda: self.calls.append("step"),
            sample=lambda n, t: self.calls.append(("sample", n, t)),
            iw_evaluate=lambda n, k: self.calls.append(("iw", n, k)),
            count_params=lambda: 123,
        )


def child_options(*argv):
    p = bench_protocol.argparse.ArgumentParser()
    bench_protocol.add_child_args(p)
    return p.parse_args(list(argv))


def test_measure_runs_the_protocol_in_order_and_emits_two_events(capsys):
    model = FakeModel()
    args = child_options(
        "--steps", "3", "--warmup", "2", "--sample-calls", "2", "--iw-samples", "5"
    )
    figures = bench_protocol.ChildFigures(batch=8, batch_sum=1.0, versions={})
    bench_protocol.measure(model.operations(), figures, args)
    assert model.calls == ["step"] * 6 + [("sample", 16, 0.7)] * 3 + [("iw", 4, 5)] * 2
    events = [bench_protocol.parse_event(line) for line in capsys.readouterr().out.splitlines()]
    assert [e["event"] for e in events] == ["first_step", "result"]
    result = events[1]["figures"]
    assert result["params"] == 123 and len(result["train_step_s"]) == 3
    assert result["train_images_per_s"] == pytest.approx(8 / result["train_s_per_step"])
    assert result["iw_samples"] == 5 and result["iw_batch"] == 4
    assert result["peak_rss_mb"] > 0


def test_measure_only_startup_stops_after_the_first_step(capsys):
    model = FakeModel()
    figures = bench_protocol.ChildFigures(batch=8, batch_sum=1.0, versions={})
    bench_protocol.measure(model.operations(), figures, child_options("--only", "startup"))
    assert model.calls == ["step"]
    assert figures.train_s_per_step is None and figures.sample_ms_per_img is None


def python_child(code):
    return [sys.executable, "-c", f"import sys; sys.path.insert(0, {BENCH!r}); {code}"]


def test_run_child_times_start_up_to_the_first_step_event():
    code = (
        "import time, bench_protocol as b; time.sleep(0.3); b.emit('first_step'); "
        "time.sleep(0.3); b.emit('result', figures={'peak_rss_mb': 1.0})"
    )
    startup, wall, figures = side_by_side.run_child(python_child(code), 60, "fake")
    assert 0.3 <= startup < wall and wall >= 0.6
    assert figures == {"peak_rss_mb": 1.0}


def test_a_failing_child_is_one_line_with_its_last_error():
    code = "import sys; print('trace', file=sys.stderr); sys.exit('out of memory')"
    with pytest.raises(side_by_side.ChildFailed, match=r"fake failed \(exit status 1\): out of"):
        side_by_side.run_child(python_child(code), 60, "fake")


def test_ours_start_cold_and_a_second_start_up_finds_the_graph_cache_filled(monkeypatch):
    """Each of our full runs starts with an empty graph cache; the start-up-only run after it
    sees what the full run stored there, and its start-up becomes ``startup_warm_s``."""
    code = (
        "import os, sys, bench_protocol as b; d = os.environ['NVAE_TF_GRAPH_CACHE']; "
        "n = len(os.listdir(d)); os.makedirs(os.path.join(d, 'entry'), exist_ok=True); "
        "b.emit('first_step'); b.emit('result', figures={'peak_rss_mb': 1.0, 'entries': n, "
        "'only': sys.argv[sys.argv.index('--only') + 1:] if '--only' in sys.argv else []})"
    )
    monkeypatch.setattr(side_by_side, "ours_command", lambda *_: python_child(code))
    args = side_by_side.parse_args(["--configs", "mnist", "--repeats", "2"])
    runs = side_by_side.sitting(args, side_by_side.plan(args))
    assert [r.side for r in runs] == [OURS, OURS]
    for run in runs:
        assert run.figures["entries"] == 0  # cold: emptied before the full run
        assert run.figures["startup_warm_s"] > 0
    summary = summarize(runs, {"mnist": 16}, {"mnist": 30.0})["mnist"]["figures"]
    assert summary["startup_warm_s"]["target"] == "≤ 30 s"


def test_synthetic_batches_are_binary_or_8_bit_and_repeatable():
    binary = synthetic_images(4, 32, 1, binary=True)
    assert binary.dtype == np.float32 and set(np.unique(binary)) == {0.0, 1.0}
    colour = synthetic_images(4, 32, 3, binary=False)
    levels = colour * 255
    assert np.allclose(levels, np.round(levels), atol=1e-4) and len(np.unique(colour)) > 200
    assert np.array_equal(colour, synthetic_images(4, 32, 3, binary=False))
    assert not np.array_equal(colour, synthetic_images(4, 32, 3, binary=False, seed=1))


def test_named_setups_match_issue_13():
    assert {name: s.batch for name, s in SETUPS.items()} == {
        "mnist": 16,
        "cifar10-cpu": 16,
        "cifar10": 4,
    }
    narrowed = dict(SETUPS["cifar10-cpu"].overrides)
    assert narrowed == {"num_channels_enc": 32, "num_channels_dec": 32, "num_groups_per_scale": 10}
    for setup in SETUPS.values():
        assert os.path.isfile(os.path.join(os.path.dirname(HERE), setup.config_file))


@pytest.mark.slow
def test_a_sitting_of_ours_on_the_small_config_writes_every_figure(tmp_path):
    """End to end: one child of ours, one step of each kind, a complete results file."""
    argv = ["--config-file", SMALL, "--batch", "4", "--repeats", "1", "--steps", "1"]
    argv += ["--warmup", "0", "--sample-calls", "1", "--sample-batch", "2", "--iw-samples", "2"]
    argv += ["--iw-batch", "2", "--out", str(tmp_path)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    script = os.path.join(BENCH, "side_by_side.py")
    proc = subprocess.run([sys.executable, script, *argv], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (path,) = tmp_path.glob("side-by-side-*.json")
    doc = json.loads(path.read_text())
    for key in ("date", "host", "cpus", "commit", "versions", "command", "runs", "summary"):
        assert doc[key] is not None, key
    (run,) = doc["runs"]
    assert run["side"] == OURS and run["startup_s"] > 0 and run["wall_s"] > run["startup_s"]
    figures = run["figures"]
    for key in ("train_s_per_step", "train_images_per_s", "sample_ms_per_img", "iw_images_per_s"):
        assert figures[key] > 0, key
    assert figures["peak_rss_mb"] > 100 and figures["params"] > 0
    assert doc["versions"][OURS]["tensorflow"]
    assert figures["startup_warm_s"] > 0
    assert set(doc["summary"]["small"]["figures"]) == {
        "startup_s",
        "startup_warm_s",
        "train_s_per_step",
        "train_images_per_s",
        "sample_ms_per_img",
        "iw_images_per_s",
        "peak_rss_mb",
    }


def test_pointwise_conv_benchmark_times_both_forms(capsys):
    """``benchmarks/pointwise_conv.py`` (the figure behind ``pointwise_conv2d``) runs and
    reports both timings and their ratio for every shape."""
    import pointwise_conv

    pointwise_conv.main(["--batch", "1", "--calls", "1"])
    rows = capsys.readouterr().out.strip().splitlines()[1:]
    assert len(rows) == len(pointwise_conv.SHAPES)
    for row in rows:
        conv_ms, matmul_ms, speedup = row.split()[-3:]
        assert float(conv_ms) > 0 and float(matmul_ms) > 0 and speedup.endswith("x")


def test_factorized_reduce_benchmark_times_both_paths(capsys):
    """``benchmarks/factorized_reduce.py`` (the figure behind FactorizedReduce's phases) runs
    and reports both timings for every shape."""
    import factorized_reduce

    factorized_reduce.main(["--calls", "1"])
    rows = capsys.readouterr().out.strip().splitlines()[1:]
    assert len(rows) == len(factorized_reduce.SHAPES)
    for row in rows:
        slices_ms, phases_ms = row.split()[-2:]
        assert float(slices_ms) > 0 and float(phases_ms) > 0
