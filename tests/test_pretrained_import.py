"""Importing the original's checkpoints: config from args, tensor mapping, zero-noise checks,
and the nvae-import command (nothing written unless everything succeeds)."""

import collections
import os

import numpy as np
import pytest
from pretrained_files import (
    args_only_payload,
    fixture_paths,
    malicious_payload,
    write_zip_checkpoint,
)

from nvae_tf.pretrained import (
    MappingError,
    TorchCheckpoint,
    UnsupportedCheckpoint,
    config_from_args,
    load_state_dict,
)
from nvae_tf.pretrained.verification import (
    ABS_TOLERANCE,
    COMPARED_KEYS,
    compare,
    load_reference,
    verify,
)
from trainers import import_checkpoint

MNIST, MNIST_REFERENCE = fixture_paths("mnist_zip")


def _mnist_args():
    with TorchCheckpoint(MNIST) as checkpoint:
        return checkpoint.content["args"].to_dict()


# --- config from args ----------------------------------------------------------------------
def test_config_follows_the_checkpoint_args_and_dataset():
    conversion = config_from_args(_mnist_args())
    c = conversion.config
    assert conversion.filled_in == () and conversion.note() is None
    assert (c.dataset, c.image_size, c.image_channels, c.decoder) == ("mnist", 32, 1, "bernoulli")
    assert c.num_x_bits == 1  # binarized digits whatever num_x_bits the run was given
    assert c.groups_per_scale == [1, 3]  # ada_groups halves the top scale's 3 groups
    assert (c.num_channels_enc, c.num_latent_per_group, c.num_cell_per_cond_dec) == (4, 5, 2)
    assert (c.batch_size, c.epochs, c.weight_decay_norm) == (4, 10, 1e-2)

    colour = config_from_args({**_mnist_args(), "dataset": "celeba_256", "num_x_bits": 5})
    assert colour.config.dataset == "celebahq256" and colour.config.image_size == 256
    assert colour.config.decoder == "logistic_mixture" and colour.config.num_x_bits == 5
    assert colour.config.original_dml_edge  # the original's numbers (docs/pretrained.md)


def test_old_checkpoints_get_the_original_evaluate_defaults():
    args = _mnist_args()
    for key in ("ada_groups", "min_groups_per_scale", "num_mixture_dec"):
        del args[key]
    conversion = config_from_args(args)
    assert conversion.filled_in == ("ada_groups", "min_groups_per_scale", "num_mixture_dec")
    assert not conversion.config.ada_groups and conversion.config.groups_per_scale == [3, 3]
    assert conversion.config.num_mixture_dec == 10
    assert "ada_groups=False, min_groups_per_scale=1, num_mixture_dec=10" in conversion.note()


@pytest.mark.parametrize(
    "change, field, value",
    [
        ({"arch_instance": "res_elu"}, "arch_instance", "'res_elu'"),
        ({"dataset": "cifar10", "num_mixture_dec": 1}, "num_mixture_dec", "1"),
        ({"dataset": "lsun_church_64"}, "dataset", "'lsun_church_64'"),
        ({"num_latent_scales": 1, "num_groups_per_scale": 1}, "num_groups_per_scale", "1"),
    ],
)
def test_unsupported_args_are_refused_naming_field_and_value(change, field, value):
    with pytest.raises(UnsupportedCheckpoint) as info:
        config_from_args({**_mnist_args(), **change})
    assert f"unsupported {field}: {value}" in str(info.value)
    assert "\n" not in str(info.value)


# --- mapping and verification (one model for the module) -----------------------------------
@pytest.fixture(scope="module")
def mnist_import():
    from nvae_tf import NVAE

    checkpoint = TorchCheckpoint(MNIST)
    model = NVAE(config_from_args(checkpoint.content["args"].to_dict()).config)
    report = load_state_dict(model, checkpoint.content["state_dict"], checkpoint.array)
    yield model, checkpoint, report
    checkpoint.close()


def test_every_tensor_lands_and_the_outputs_match_the_original(mnist_import):
    model, checkpoint, report = mnist_import
    state = checkpoint.content["state_dict"]
    assert report.assigned + sum(len(v) for v in report.ignored.values()) == len(state)
    assert set(report.ignored) == {"num_batches_tracked", "weight_normalized"}
    np.testing.assert_array_equal(
        model.h.numpy(), checkpoint.array(state["prior_ftr0"]).transpose(1, 2, 0)
    )
    result = verify(model, MNIST_REFERENCE)
    assert result.ok, [d.line() for d in result.differences]
    assert [d.key for d in result.differences] == list(COMPARED_KEYS)
    assert all(d.max_abs < ABS_TOLERANCE for d in result.differences)


def test_mapping_errors_name_the_tensors(mnist_import):
    model, checkpoint, _ = mnist_import
    state = checkpoint.content["state_dict"]
    read = checkpoint.array

    extra = collections.OrderedDict(state, **{"enc_tower.99.conv.weight": state["stem.weight"]})
    with pytest.raises(MappingError, match=r"no place in the model: enc_tower\.99\.conv\.weight"):
        load_state_dict(model, extra, read)
    missing = collections.OrderedDict((k, v) for k, v in state.items() if k != "enc0.1.bias")
    with pytest.raises(MappingError, match=r"lacks tensors the model needs: enc0\.1\.bias"):
        load_state_dict(model, missing, read)
    # The same values everywhere except one swapped tensor: the model keeps its weights.
    swapped = collections.OrderedDict(state, **{"stem.bias": state["enc0.1.bias"]})
    with pytest.raises(MappingError, match=r"shape mismatch .*stem\.bias \(32,\) vs .*\(4,\)"):
        load_state_dict(model, swapped, read)


def test_compare_flags_differences_beyond_the_tolerance():
    reference = load_reference(MNIST_REFERENCE)
    ours = {k: reference[k].copy() for k in COMPARED_KEYS}
    assert compare(ours, reference).ok
    ours["recon_nats"][1] += 0.5  # > max(1e-4 |ref|, 0.01) for MNIST's ~500 nats
    report = compare(ours, reference)
    assert not report.ok
    bad = {d.key for d in report.differences if not d.ok}
    assert bad == {"recon_nats"}


# --- the command line -----------------------------------------------------------------------
def _run_cli(argv, capsys):
    code = import_checkpoint.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_imports_and_verifies(tmp_path, capsys):
    run = tmp_path / "run"
    code, out, err = _run_cli([MNIST, "--out", str(run), "--verify", MNIST_REFERENCE], capsys)
    assert code == 0, err
    assert sorted(os.listdir(run)) == ["checkpoints", "config.yaml"]
    assert os.listdir(tmp_path) == ["run"]  # no staging directory left
    assert all(f"{key:<12} max abs" in out for key in COMPARED_KEYS) and "FAIL" not in out
    assert "ignored, no meaning here: 70 num_batches_tracked" in err


def test_cli_refuses_a_malicious_file_in_one_line(tmp_path, capsys):
    marker = tmp_path / "pwned"
    path = write_zip_checkpoint(str(tmp_path / "evil.pt"), malicious_payload(marker))
    code, _, err = _run_cli([path, "--out", str(tmp_path / "run")], capsys)
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: refused")
    assert not marker.exists() and not (tmp_path / "run").exists()


def test_cli_refuses_unsupported_args_in_one_line(tmp_path, capsys):
    payload = args_only_payload(**{**_mnist_args(), "arch_instance": "res_bnelu"})
    path = write_zip_checkpoint(str(tmp_path / "other.pt"), payload)
    code, _, err = _run_cli([path, "--out", str(tmp_path / "run")], capsys)
    assert code == 2 and err == "error: unsupported arch_instance: 'res_bnelu' " + (
        "(nvae-tf builds 'res_mbconv')\n"
    )
    assert os.listdir(tmp_path) == ["other.pt"]


def test_cli_refuses_an_existing_run_directory(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text("{}")
    code, _, err = _run_cli([MNIST, "--out", str(tmp_path / "run")], capsys)
    assert code == 2 and "already exists" in err


@pytest.mark.slow
def test_cli_writes_nothing_when_verification_fails(tmp_path, capsys):
    reference = load_reference(MNIST_REFERENCE)
    reference["kl"] = reference["kl"] + 1.0
    bad = tmp_path / "bad.npz"
    np.savez(bad, **reference)
    code, out, err = _run_cli([MNIST, "--out", str(tmp_path / "run"), "--verify", str(bad)], capsys)
    assert code == 1 and "kl " in out and "FAIL" in out and "nothing written" in err
    assert sorted(os.listdir(tmp_path)) == ["bad.npz"]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["mnist_legacy", "cifar10_flow", "celeba64_5bit_two_flows"])
def test_fixture_imports_and_verifies(name, tmp_path, capsys):
    checkpoint, reference = fixture_paths(name)
    code, out, err = _run_cli(
        [checkpoint, "--out", str(tmp_path / "run"), "--verify", reference], capsys
    )
    assert code == 0, out + err
    assert "FAIL" not in out and out.count(" ok\n") == len(COMPARED_KEYS)


def test_init_from_refuses_another_architecture(tmp_path):
    from nvae_tf.config import ConfigError
    from nvae_tf.training.loop import train

    source = tmp_path / "source"
    source.mkdir()
    config = config_from_args(_mnist_args()).config.replace(dataset="bundled_mnist")
    config.to_yaml(str(source / "config.yaml"))
    with pytest.raises(ConfigError) as info:
        train(config.replace(num_channels_enc=8), str(tmp_path / "new"), init_from=str(source))
    assert "another architecture: num_channels_enc (4 there, 8 here)" in str(info.value)
    assert "\n" not in str(info.value) and not (tmp_path / "new").exists()
    with pytest.raises(ConfigError, match="cannot be combined with --resume"):
        train(config, str(tmp_path / "new"), init_from=str(source), resume=True)
