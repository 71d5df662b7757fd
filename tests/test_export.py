"""nvae-export: the SavedModel loads without nvae_tf, serves all five signatures with the
library's numbers and refuses bad inputs with clear messages."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from support import binary_images, tiny_config
from tiny_runs import Run

from nvae_tf.inference.serving import SERVING_SEED, SIGNATURES
from nvae_tf.run_dir import restore_model
from trainers import export as export_cli

pytestmark = pytest.mark.slow  # one export (tracing five graphs) and two fresh processes

# Runs in a fresh interpreter: TensorFlow only, no nvae_tf.
SERVE = textwrap.dedent("""
    import json, sys
    import numpy as np
    import tensorflow as tf

    export_dir, work = sys.argv[1], sys.argv[2]
    loaded = tf.saved_model.load(export_dir)
    x = tf.constant(np.load(work + "/x.npy"))
    sig = loaded.signatures
    out = {
        "sample": sig["sample"](num_samples=tf.constant(4), temperature=tf.constant(0.7),
                                seed=tf.constant(3, tf.int64))["images"],
        "sample_attr": loaded.sample(4, 0.7, 3)["images"],
        "reconstruct": sig["reconstruct"](images=x)["images"],
    }
    ll = sig["log_likelihood"](images=x, num_samples=tf.constant(5))
    out.update(log_likelihood=ll["log_likelihood"], bits_per_dim=ll["bits_per_dim"])
    encoded = sig["encode"](images=x)
    out.update({"encode_" + k: v for k, v in encoded.items()})
    # Latent arithmetic without nvae_tf: the top group of image 0 with the rest of image 1.
    num_groups = sum(k.startswith("z_") for k in encoded)
    mixed = {f"z_{l}": encoded[f"z_{l}"][0 if l == 0 else 1][None] for l in range(num_groups)}
    decode = sig["decode"]
    out["decode_mixed"] = decode(**mixed, num_kept_groups=tf.constant(num_groups),
                                 temperature=tf.constant(1.0), seed=tf.constant(0, tf.int64))["images"]
    latents = {f"z_{l}": encoded[f"z_{l}"] for l in range(num_groups)}
    out["decode_attr"] = loaded.decode(*latents.values(), num_groups, 1.0, 0)["images"]
    out["decode_kept1"] = decode(**latents, num_kept_groups=tf.constant(1),
                                 temperature=tf.constant(0.5), seed=tf.constant(4, tf.int64))["images"]
    np.savez(work + "/out.npz", **{k: v.numpy() for k, v in out.items()})

    gray = tf.fill([2, 32, 32, 1], 0.5)
    bad = {
        "wrong_size": lambda: sig["reconstruct"](images=tf.zeros([2, 28, 28, 1])),
        "wrong_rank": lambda: loaded.encode(tf.zeros([32, 32, 1])),
        "empty_batch": lambda: sig["log_likelihood"](
            images=tf.zeros([0, 32, 32, 1]), num_samples=tf.constant(2)
        ),
        "empty_reconstruct": lambda: loaded.reconstruct(tf.zeros([0, 32, 32, 1])),
        "wrong_channels": lambda: loaded.reconstruct(tf.zeros([1, 32, 32, 3])),
        "wrong_dtype": lambda: sig["reconstruct"](images=tf.zeros([2, 32, 32, 1], tf.float64)),
        "above_one": lambda: loaded.reconstruct(tf.fill([2, 32, 32, 1], 2.0)),
        "negative": lambda: sig["reconstruct"](images=-x),
        "nan": lambda: loaded.encode(tf.fill([1, 32, 32, 1], float("nan"))),
        "not_binary": lambda: loaded.log_likelihood(gray, 2),
        "zero_samples": lambda: loaded.log_likelihood(x, 0),
        "zero_temperature": lambda: loaded.sample(2, 0.0, 1),
        "zero_count": lambda: loaded.sample(0, 1.0, 1),
        "too_many_kept": lambda: decode(**latents, num_kept_groups=tf.constant(num_groups + 1),
                                        temperature=tf.constant(1.0), seed=tf.constant(0, tf.int64)),
        "wrong_latent_shape": lambda: decode(**{**latents, "z_0": tf.zeros([3, 2, 2, 20])},
                                             num_kept_groups=tf.constant(1),
                                             temperature=tf.constant(1.0),
                                             seed=tf.constant(0, tf.int64)),
    }
    errors = {}
    for name, call in bad.items():
        try:
            call()
            errors[name] = None
        except Exception as e:  # noqa: BLE001 - the message is what is checked
            errors[name] = type(e).__name__ + ": " + str(e)
    json.dump({"errors": errors, "nvae_tf_imported": "nvae_tf" in sys.modules},
              open(work + "/errors.json", "w"))
""")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    run = Run(root / "run", tiny_config())
    out = str(root / "saved_model")
    assert export_cli.main(["--checkpoint", run.dir, "--out", out]) == 0
    return run, out


def test_fresh_process_serves_all_signatures_with_library_numbers(exported, tmp_path):
    run, export_dir = exported
    x = binary_images(3).numpy()
    np.save(tmp_path / "x.npy", x)
    (tmp_path / "serve.py").write_text(SERVE)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # nvae_tf not importable
    proc = subprocess.run(
        [sys.executable, str(tmp_path / "serve.py"), export_dir, str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        cwd=str(tmp_path),
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = dict(np.load(tmp_path / "out.npz"))
    report = json.loads((tmp_path / "errors.json").read_text())
    assert not report["nvae_tf_imported"]

    model = restore_model(run.dir)
    np.testing.assert_allclose(out["sample"], model.sample(4, 0.7, seed=3), atol=1e-5)
    np.testing.assert_array_equal(out["sample"], out["sample_attr"])
    np.testing.assert_allclose(
        out["reconstruct"], model.reconstruct(x, seed=SERVING_SEED), atol=1e-5
    )
    ll = model.log_likelihood(x, 5, 256, seed=SERVING_SEED).numpy()
    np.testing.assert_allclose(out["log_likelihood"], ll, rtol=1e-5)
    np.testing.assert_allclose(out["bits_per_dim"], -ll / (np.log(2) * 784), rtol=1e-5)
    latents = model.encode(x)
    assert len(latents) == run.config.num_groups
    for index, group in enumerate(latents):
        np.testing.assert_allclose(out[f"encode_mean_{index}"], group.mean, atol=1e-5)
        np.testing.assert_allclose(out[f"encode_scale_{index}"], group.stddev, atol=1e-5)
        np.testing.assert_allclose(out[f"encode_z_{index}"], group.z, atol=1e-5)
    mixed = [latents[0].z[:1]] + [group.z[1:2] for group in latents[1:]]
    np.testing.assert_allclose(out["decode_mixed"], model.decode(mixed), atol=1e-5)
    np.testing.assert_allclose(out["decode_attr"], model.decode(latents), atol=1e-5)
    kept = model.decode(latents[:1], temperature=0.5, seed=4)
    np.testing.assert_allclose(out["decode_kept1"], kept, atol=1e-5)

    errors = report["errors"]
    expected = {
        "wrong_size": "images must have shape (batch, 32, 32, 1)",
        "wrong_rank": "images must have shape (batch, 32, 32, 1)",
        "empty_batch": "images is an empty batch: send at least one image",
        "empty_reconstruct": "images is an empty batch: send at least one image",
        "wrong_channels": "images must have shape (batch, 32, 32, 1)",
        "wrong_dtype": "expected to be a float tensor but is a double tensor",
        "above_one": "images must be in [0, 1]",
        "negative": "images must be in [0, 1]",
        "nan": "images contain NaN or Inf",
        "not_binary": "pixels must be 0 or 1",
        "zero_samples": "num_samples must be >= 1",
        "zero_temperature": "temperature must be > 0",
        "zero_count": "num_samples must be >= 1",
        "too_many_kept": "num_kept_groups must be <= 3",
        "wrong_latent_shape": "z_0 must have shape (batch, 8, 8, 20)",
    }
    for name, message in expected.items():
        assert errors[name] is not None and message in errors[name], (name, errors[name])


def test_saved_model_cli_lists_the_signatures(exported):
    _, export_dir = exported
    cli = os.path.join(os.path.dirname(sys.executable), "saved_model_cli")
    proc = subprocess.run(
        [cli, "show", "--dir", export_dir, "--all"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    for name in SIGNATURES:
        assert f"signature_def['{name}']" in proc.stdout
    assert "inputs['num_samples']" in proc.stdout and "inputs['images']" in proc.stdout
    # The latent layout: one input per group, top first, (batch, h, w, C_z).
    decode = proc.stdout.split("signature_def['decode']")[1].split("signature_def[")[0]
    for name, shape in (
        ("z_0", "(-1, 8, 8, 20)"),
        ("z_1", "(-1, 16, 16, 20)"),
        ("z_2", "(-1, 16, 16, 20)"),
    ):
        assert f"inputs['{name}']" in decode and shape in decode


def test_export_cli_refuses_a_non_empty_folder(exported, capsys):
    run, export_dir = exported
    assert export_cli.main(["--checkpoint", run.dir, "--out", export_dir]) == 2
    err = capsys.readouterr().err.strip()
    assert "not empty" in err and len(err.splitlines()) == 1
    assert export_cli.main(["--checkpoint", "/nonexistent", "--out", export_dir + "_x"]) == 2
