"""nvae_tf.graph_cache: optimized graphs cached on disk under a fingerprint of the traced graph."""

import logging
import os
import subprocess
import sys
import textwrap

import pytest
import tensorflow as tf
from support import scaler_module

from nvae_tf import graph_cache, graph_optimization


def concrete(fn, *specs):
    return tf.function(fn).get_concrete_function(*specs)


VECTOR = tf.TensorSpec([2], tf.float32)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    root = tmp_path / "graphs"
    monkeypatch.setenv(graph_cache.ENV_VAR, str(root))
    monkeypatch.delenv(graph_cache.TF_ENV_VAR, raising=False)
    return root


def entries(root):
    return sorted(p for p in root.iterdir() if not p.name.startswith("."))


@pytest.mark.parametrize("setting", ["off", "0", "", "False"])
def test_the_cache_can_be_turned_off(monkeypatch, setting):
    monkeypatch.setenv(graph_cache.ENV_VAR, setting)
    assert graph_cache.cache_dir() is None
    with graph_cache.instantiating(concrete(lambda x: 2.0 * x, VECTOR)):
        assert graph_cache.TF_ENV_VAR not in os.environ


def test_the_default_cache_is_under_the_user_cache_folder(monkeypatch, tmp_path):
    monkeypatch.delenv(graph_cache.ENV_VAR, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert graph_cache.cache_dir() == os.path.join(str(tmp_path), "nvae_tf", "graphs")
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert graph_cache.cache_dir().endswith(os.path.join(".cache", "nvae_tf", "graphs"))


def test_fingerprints_tell_graphs_and_options_apart(monkeypatch):
    def double(x):
        return 2.0 * x

    first = concrete(double, VECTOR)
    key = graph_cache.fingerprint(first)
    assert graph_cache.fingerprint(first) == key  # the same graph, the same key
    assert graph_cache.fingerprint(concrete(lambda x: 3.0 * x, VECTOR)) != key
    assert graph_cache.fingerprint(concrete(double, tf.TensorSpec([3]))) != key
    lean = graph_optimization.rewriter_config(tf.compat.v1.ConfigProto()).SerializeToString()
    assert graph_cache.fingerprint(first, lean) != key
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "1")  # logging does not change a graph
    assert graph_cache.fingerprint(first) == key
    monkeypatch.setenv("TF_ENABLE_ONEDNN_OPTS", "0")  # other TensorFlow settings may
    assert graph_cache.fingerprint(first) != key


def test_a_graph_tensorflow_writes_is_stored_and_handed_back_next_time(cache, monkeypatch):
    """TensorFlow's writing and reading are imitated: during the call the private folder is
    in ``TF_GRAPH_CACHING``; what was written for this function becomes the entry, and the
    next call of the same graph finds it there (and nothing else)."""
    monkeypatch.setenv(graph_cache.TF_ENV_VAR, "before")
    function = concrete(lambda x: 2.0 * x, VECTOR)
    plain = function.name.decode().rsplit("_", 1)[0]
    with graph_cache.instantiating(function):
        work = os.environ[graph_cache.TF_ENV_VAR]
        assert os.listdir(work) == []
        with open(os.path.join(work, f"_-1_{plain}_7"), "wb") as f:
            f.write(b"optimized graph")
        with open(os.path.join(work, "_-1___inference_another_3"), "wb") as f:
            f.write(b"someone else's")
    assert os.environ[graph_cache.TF_ENV_VAR] == "before" and not os.path.exists(work)
    (entry,) = entries(cache)
    assert entry.name == graph_cache.fingerprint(function)
    assert [p.name for p in entry.iterdir()] == [f"_-1_{plain}_7"]
    with graph_cache.instantiating(function):
        work = os.environ[graph_cache.TF_ENV_VAR]
        (name,) = os.listdir(work)
        with open(os.path.join(work, name), "rb") as f:
            assert f.read() == b"optimized graph"
    assert not os.path.exists(work) and entries(cache) == [entry]


def test_a_call_that_tensorflow_does_not_cache_leaves_no_entry(cache):
    with graph_cache.instantiating(concrete(lambda x: 2.0 * x, VECTOR)):
        pass
    assert entries(cache) == [] and os.listdir(cache) == []


def test_an_unusable_cache_folder_is_one_warning_and_the_call_runs(tmp_path, monkeypatch, caplog):
    blocker = tmp_path / "a file"
    blocker.write_text("")
    monkeypatch.setenv(graph_cache.ENV_VAR, str(blocker / "graphs"))
    ran = []
    function = concrete(lambda x: 2.0 * x, VECTOR)
    with (
        caplog.at_level(logging.WARNING, logger=graph_cache.__name__),
        graph_cache.instantiating(function),
    ):
        ran.append(graph_cache.TF_ENV_VAR in os.environ)
    assert ran == [False]
    (message,) = [r.getMessage() for r in caplog.records]
    assert "graph cache" in message and "not used" in message


def test_only_the_most_recently_used_entries_are_kept(cache):
    cache.mkdir()
    for i in range(graph_cache.MAX_ENTRIES + 3):
        (cache / f"entry{i:02d}").mkdir()
        os.utime(cache / f"entry{i:02d}", (1000 + i, 1000 + i))
    (cache / ".instantiating-dead").mkdir()
    os.utime(cache / ".instantiating-dead", (1000, 1000))  # left by a process that died
    (cache / ".instantiating-live").mkdir()  # a call in progress
    graph_cache._prune(str(cache))
    kept = [p.name for p in entries(cache)]
    assert kept == [f"entry{i:02d}" for i in range(3, graph_cache.MAX_ENTRIES + 3)]
    assert sorted(os.listdir(cache))[0] == ".instantiating-live"


def test_the_cache_stays_under_its_size_and_keeps_the_newest_entry(cache, monkeypatch):
    monkeypatch.setattr(graph_cache, "MAX_BYTES", 2500)
    cache.mkdir()
    for i, size in enumerate([1000, 1000, 1000, 3000]):  # the last is the newest
        (cache / f"entry{i}").mkdir()
        (cache / f"entry{i}" / "graph").write_bytes(b"x" * size)
        os.utime(cache / f"entry{i}", (1000 + i, 1000 + i))
    graph_cache._prune(str(cache))
    assert [p.name for p in entries(cache)] == ["entry3"]  # over the limit alone, but newest
    (cache / "entry3" / "graph").write_bytes(b"x" * 1000)
    for i in (0, 1, 2):
        (cache / f"entry{i}").mkdir()
        (cache / f"entry{i}" / "graph").write_bytes(b"x" * 1000)
        os.utime(cache / f"entry{i}", (2000 + i, 2000 + i))
    graph_cache._prune(str(cache))
    assert [p.name for p in entries(cache)] == ["entry1", "entry2"]  # 2,000 bytes, newest two


@pytest.fixture
def first_calls(monkeypatch):
    """(function name, config proto) of every call ``instantiating`` gets, which does nothing."""
    seen = []

    def recording(function, config_proto=None):
        seen.append((function.name, config_proto))
        return graph_cache.contextlib.nullcontext()

    monkeypatch.setattr(graph_cache, "instantiating", recording)
    return seen


def test_a_cache_graph_function_fingerprints_its_first_call_only(first_calls):
    seen = first_calls

    @graph_optimization.function(cache_graph=True)
    def add_one(x):
        return x + 1.0

    assert float(tf.function(add_one)(tf.constant(0.0))) == 1.0  # traced into another graph
    assert seen == []
    assert float(add_one(tf.constant(1.0))) == 2.0
    assert float(add_one(tf.constant(2.0))) == 3.0
    ((name, config_proto),) = seen
    assert name == add_one.get_concrete_function(tf.constant(1.0)).name
    options = tf.compat.v1.ConfigProto.FromString(config_proto).graph_options.rewrite_options
    assert options.memory_optimization == options.NO_MEM_OPT  # the call's lean options


def test_each_model_gets_its_own_first_call_of_a_cache_graph_method(first_calls):
    Scaler = scaler_module(cache_graph=True)
    two, three = Scaler(2.0), Scaler(3.0)
    assert [float(m(tf.constant(1.0))) for m in (two, two, three, three)] == [2, 2, 3, 3]
    names = [name for name, _ in first_calls]
    assert len(names) == 2 and names[0] != names[1]


CHILD = textwrap.dedent(
    """
    import numpy as np, tensorflow as tf
    from nvae_tf import graph_optimization

    @graph_optimization.function(cache_graph=True)
    def folded(x):
        # Grappler's constant folding multiplies these out while optimizing: an optimization
        # long enough for TensorFlow to cache it (over 3 s; ~10 s here), a short trace.
        c = tf.constant(np.eye(1000, dtype=np.float32) * 0.999)
        y = c
        for _ in range(900):
            y = tf.matmul(y, c)
        return tf.reduce_sum(y) * x

    print("RESULT", repr(float(folded(tf.constant(1.5)))))
    """
)


@pytest.mark.slow
def test_a_second_process_runs_the_cached_graph_with_the_same_result(tmp_path):
    """End to end with TensorFlow's own writing and reading of the optimized graph."""
    env = {
        **os.environ,
        graph_cache.ENV_VAR: str(tmp_path / "graphs"),
        "PYTHONPATH": os.pathsep.join(sys.path),
        "TF_CPP_MIN_LOG_LEVEL": "0",
        "TF_CPP_VMODULE": "optimize_function_graph_utils=3",
    }
    runs = [
        subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, env=env)
        for _ in range(2)
    ]
    for run in runs:
        assert run.returncode == 0, run.stderr[-2000:]
    results = [line for run in runs for line in run.stdout.splitlines() if "RESULT" in line]
    assert len(results) == 2 and results[0] == results[1]
    (entry,) = entries(tmp_path / "graphs")
    assert len(list(entry.iterdir())) == 1
    # TensorFlow's own log lines (its verbose logging of optimize_function_graph_utils).
    assert "No cache existed" in runs[0].stderr and "reading from cache" not in runs[0].stderr
    assert "reading from cache" in runs[1].stderr and "No cache existed" not in runs[1].stderr
