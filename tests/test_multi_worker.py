"""MultiWorkerMirroredStrategy: two worker processes on 127.0.0.1 end with the same weights.

Worker 0 (the chief) runs the ``nvae-train`` command line with ``--workers``/``--task-index``
and alone writes the run directory; worker 1 runs ``train()`` with ``TF_CONFIG`` and a callback
that saves its final weights. Those must equal the weights ``restore_model`` reads back from
the chief's checkpoint.
"""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
from support import ROOT, SMALL_SHRUNK
from support import SMALL_CONFIG as SMALL

TINY = SMALL_SHRUNK + ["batch_size=8", "epochs=2"]
STEPS = 4

WORKER = (
    """
import json, sys
import keras, numpy as np
from nvae_tf.config import NVAEConfig
from nvae_tf.training.distribute import make_strategy
from nvae_tf.training.loop import train

strategy = make_strategy("multi_worker")  # from TF_CONFIG, before any other TF work
out, weights_file, result_file, steps = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
overrides = sys.argv[5:]

class SaveWeights(keras.callbacks.Callback):
    def on_train_begin(self, logs=None):
        self.initial = [np.array(v.numpy()) for v in self.model.weights]

    def on_train_end(self, logs=None):
        final = [np.array(v.numpy()) for v in self.model.weights]
        np.savez(weights_file, *final)
        changed = any(not np.array_equal(a, b) for a, b in zip(self.initial, final))
        self.changed = changed

saver = SaveWeights()
config = NVAEConfig.from_yaml(SMALL_CONFIG).with_overrides(overrides)
result = train(config, out, steps=steps, strategy=strategy, verbose=0, callbacks=[saver],
               log_every=2, checkpoint_every=2)
result["weights_changed"] = saver.changed
with open(result_file, "w") as f:
    json.dump(result, f)
"""
).replace("SMALL_CONFIG", repr(SMALL))


def free_ports(n):
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


@pytest.mark.slow
def test_two_workers_train_to_identical_weights_and_only_the_chief_writes(tmp_path):
    from nvae_tf.run_dir import latest_checkpoint, restore_model

    workers = [f"127.0.0.1:{port}" for port in free_ports(2)]
    out, scratch = tmp_path / "run", tmp_path / "worker_tmp"
    scratch.mkdir()
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {**os.environ, "PYTHONPATH": ROOT, "TF_CPP_MIN_LOG_LEVEL": "3"}
    env.pop("TF_CONFIG", None)

    chief_args = [
        sys.executable,
        "-m",
        "trainers.train",
        "--config",
        SMALL,
        "--out",
        str(out),
        "--workers",
        ",".join(workers),
        "--task-index",
        "0",
        "--steps",
        str(STEPS),
        "--log-every",
        "2",
        "--checkpoint-every",
        "2",
        "--progress",
        "2",
    ]
    for item in TINY:
        chief_args += ["--set", item]
    worker_env = {
        **env,
        "TMPDIR": str(scratch),
        "TF_CONFIG": json.dumps(
            {"cluster": {"worker": workers}, "task": {"type": "worker", "index": 1}}
        ),
    }
    worker_args = [
        sys.executable,
        str(script),
        str(out),
        str(tmp_path / "weights.npz"),
        str(tmp_path / "result.json"),
        str(STEPS),
        *TINY,
    ]

    procs = [
        subprocess.Popen(
            chief_args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        ),
        subprocess.Popen(
            worker_args,
            cwd=ROOT,
            env=worker_env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        ),
    ]
    try:
        outputs = [p.communicate(timeout=420) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, (_, stderr) in zip(procs, outputs):
        assert p.returncode == 0, stderr[-3000:]

    # The chief wrote the run directory; the other worker left nothing behind.
    assert sorted(os.listdir(out)) == ["checkpoints", "config.yaml", "metrics.csv", "tensorboard"]
    assert latest_checkpoint(str(out)).endswith(f"ckpt-{STEPS}")
    assert os.listdir(scratch) == []

    result = json.loads((tmp_path / "result.json").read_text())
    assert result["step"] == STEPS and result["weights_changed"]
    assert result["test_images"] == 500  # each worker scored its half; the sums were added
    assert f"{result['test_bpd']:.4f} bits/dim" in outputs[0][0]  # the chief printed the same

    model = restore_model(str(out))
    with np.load(tmp_path / "weights.npz") as saved:
        worker_weights = [saved[f"arr_{i}"] for i in range(len(saved.files))]
    assert len(worker_weights) == len(model.weights)
    for variable, value in zip(model.weights, worker_weights):
        np.testing.assert_array_equal(variable.numpy(), value, err_msg=variable.path)
