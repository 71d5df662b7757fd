"""NVAEConfig: paper configs, derived layouts (docs/design.md#layout-rules), YAML, validation."""

import dataclasses
import pathlib

import pytest
import yaml
from support import tiny_config

from nvae_tf.config import ConfigError, NVAEConfig

CONFIGS = pathlib.Path(__file__).resolve().parent.parent / "configs"

# Worked out by hand from docs/design.md#layout-rules, top (lowest-resolution) scale first:
# (groups per scale, total groups, latent sizes, decoder channels per scale, h shape (H, W, C)).
SPEC_LAYOUTS = {
    "mnist": ([5, 10], 15, [4, 8], [256, 128], (4, 4, 256)),
    "cifar10": ([30], 30, [16], [256], (16, 16, 256)),
    "celeba64": ([5, 10, 20], 35, [8, 16, 32], [512, 256, 128], (8, 8, 512)),
    "imagenet32": ([28], 28, [16], [384], (16, 16, 384)),
    "celebahq256": (
        [4, 4, 4, 8, 16],
        36,
        [8, 16, 32, 64, 128],
        [960, 480, 240, 120, 60],
        (8, 8, 960),
    ),
    "ffhq256": ([4, 4, 4, 8, 16], 36, [8, 16, 32, 64, 128], [960, 480, 240, 120, 60], (8, 8, 960)),
}

# The original's published commands with its defaults filled in (docs/design.md#paper-configs).
_FLAG_NAMES = (
    "epochs",
    "batch_size",
    "num_channels_enc",
    "num_nf",
    "num_x_bits",
    "weight_decay_norm",
    "weight_decay_norm_anneal",
    "weight_decay_norm_init",
    "learning_rate",
    "warmup_epochs",
    "num_preprocess_blocks",
    "num_preprocess_cells",
)
SPEC_FLAGS = {
    name: dict(zip(_FLAG_NAMES, values))
    for name, values in {
        "mnist": (400, 200, 32, 0, 1, 1e-2, False, 10.0, 1e-2, 5, 2, 3),
        "cifar10": (400, 32, 128, 1, 8, 1e-2, False, 10.0, 1e-2, 5, 1, 2),
        "celeba64": (90, 16, 64, 1, 8, 1e-1, False, 10.0, 1e-2, 5, 1, 2),
        "imagenet32": (45, 24, 192, 1, 8, 1e-2, True, 1.0, 1e-2, 1, 1, 2),
        "celebahq256": (300, 4, 30, 2, 5, 1e-2, True, 1.0, 1e-2, 5, 1, 2),
        "ffhq256": (200, 4, 30, 2, 5, 1e-1, True, 1.0, 8e-3, 5, 1, 2),
    }.items()
}


def load(name):
    return NVAEConfig.from_yaml(CONFIGS / f"{name}.yaml")


def spec_groups_per_scale(num_scales, n, ada, minimum):
    """The original's rule (docs/design.md#layout-rules): highest resolution first."""
    groups = []
    for _ in range(num_scales):
        groups.append(n)
        if ada:
            n = max(minimum, n // 2)
    return groups


def assert_one_line_error(excinfo, *words):
    message = str(excinfo.value)
    assert "\n" not in message, message
    for word in words:
        assert word in message, message


# ----------------------------------------------------------------------------- paper configs


@pytest.mark.parametrize("name", sorted(SPEC_LAYOUTS))
def test_paper_layouts_match_spec_table(name):
    config = load(name)
    groups, total, sizes, channels, h_shape = SPEC_LAYOUTS[name]
    assert config.groups_per_scale == groups
    assert config.num_groups == total
    assert config.latent_sizes == sizes
    assert config.channels_per_scale == channels
    assert tuple(config.h_shape) == h_shape
    # Encoder and decoder widths are equal in every paper config (docs/design.md#paper-configs).
    assert config.num_channels_enc == config.num_channels_dec
    # The config property is the original's rule reversed (docs/design.md#layout-rules).
    assert (
        config.groups_per_scale
        == spec_groups_per_scale(
            config.num_latent_scales,
            config.num_groups_per_scale,
            config.ada_groups,
            config.min_groups_per_scale,
        )[::-1]
    )


@pytest.mark.parametrize("name", sorted(SPEC_FLAGS))
def test_paper_configs_carry_readme_flags(name):
    config = load(name)
    for key, value in SPEC_FLAGS[name].items():
        assert getattr(config, key) == pytest.approx(value), key
    assert config.num_channels_dec == config.num_channels_enc
    assert config.num_postprocess_blocks == config.num_preprocess_blocks
    assert config.num_postprocess_cells == config.num_preprocess_cells
    assert config.num_cell_per_cond_enc == config.num_cell_per_cond_dec == 2
    assert config.num_latent_per_group == 20
    assert config.use_se and config.res_dist
    assert config.weight_decay == pytest.approx(3e-4)
    assert config.adamax_epsilon == pytest.approx(1e-3)
    assert config.kl_anneal_portion == pytest.approx(0.3)
    assert config.learning_rate_min == pytest.approx(1e-4)
    expected_decoder = "bernoulli" if name == "mnist" else "logistic_mixture"
    assert config.decoder == expected_decoder
    if expected_decoder == "logistic_mixture":
        assert config.num_mixture_dec == 10 and config.decoder_channels == 100
    else:
        assert config.decoder_channels == 1 and config.num_output_dims == 28 * 28


@pytest.mark.slow
def test_mnist_paper_model_builds_with_spec_layout():
    """Build the real MNIST paper model once: h and group list (docs/design.md#paper-configs)."""
    from nvae_tf.model import NVAE

    model = NVAE(load("mnist"))
    assert tuple(model.h.shape) == (4, 4, 256)
    assert len(model.groups) == 15
    top_first = [g.decoder_channels for g in model.groups]
    assert top_first == [256] * 5 + [128] * 10
    assert [g.upsample for g in model.groups].count(True) == 1 and model.groups[5].upsample


# ----------------------------------------------------------------------------- YAML


def test_yaml_round_trip(tmp_path):
    config = tiny_config(
        num_nf=2, learning_rate=3e-3, data_dir=str(tmp_path), precision="mixed_bfloat16"
    )
    path = tmp_path / "c.yaml"
    config.to_yaml(path)
    again = NVAEConfig.from_yaml(path)
    assert again == config
    assert dataclasses.asdict(again) == dataclasses.asdict(config)


@pytest.mark.parametrize("name", sorted(SPEC_LAYOUTS) + ["small"])
def test_every_bundled_config_round_trips(name, tmp_path):
    config = load(name)
    config.to_yaml(tmp_path / "c.yaml")
    assert NVAEConfig.from_yaml(tmp_path / "c.yaml") == config


def test_yaml_scientific_notation_without_dot_is_a_float(tmp_path):
    # PyYAML (YAML 1.1) reads "1e-2" as a string; the config must still take it.
    path = tmp_path / "c.yaml"
    values = {**tiny_config().to_dict(), "learning_rate": "1e-2"}
    path.write_text(yaml.safe_dump(values).replace("'1e-2'", "1e-2"))
    assert NVAEConfig.from_yaml(path).learning_rate == pytest.approx(1e-2)


def test_missing_or_invalid_yaml_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError) as e:
        NVAEConfig.from_yaml(tmp_path / "nope.yaml")
    assert_one_line_error(e, "not found")
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1, 2\nb: c: d\n")
    with pytest.raises(ConfigError) as e:
        NVAEConfig.from_yaml(bad)
    assert_one_line_error(e, "YAML")
    listing = tmp_path / "list.yaml"
    listing.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError) as e:
        NVAEConfig.from_yaml(listing)
    assert_one_line_error(e, "mapping")


# ----------------------------------------------------------------------------- validation


def test_unknown_key_is_named():
    with pytest.raises(ConfigError) as e:
        NVAEConfig.from_dict({**tiny_config().to_dict(), "num_chanels_enc": 8})
    assert_one_line_error(e, "unknown", "num_chanels_enc")


@pytest.mark.parametrize(
    "key, value",
    [
        ("num_channels_enc", "eight"),
        ("num_channels_enc", 4.5),
        ("use_se", "yes"),
        ("learning_rate", "fast"),
        ("ada_groups", 1),
        ("num_nf", True),
        ("dataset", 3),
    ],
)
def test_wrong_type_is_named(key, value):
    with pytest.raises(ConfigError) as e:
        tiny_config(**{key: value})
    assert_one_line_error(e, key)


def test_int_for_float_and_integral_float_for_int_are_accepted():
    config = tiny_config(learning_rate=1, num_channels_enc=8.0)
    assert isinstance(config.learning_rate, float) and config.learning_rate == 1.0
    assert isinstance(config.num_channels_enc, int) and config.num_channels_enc == 8


def test_image_size_not_divisible_by_the_layout():
    # 2^(1 + 3 - 1) = 8 does not divide 20.
    with pytest.raises(ConfigError) as e:
        tiny_config(dataset="folder", image_size=20, num_latent_scales=3)
    assert_one_line_error(e, "image_size 20", "not divisible")
    # A paper dataset with the wrong size is refused as such.
    with pytest.raises(ConfigError) as e:
        tiny_config(image_size=64)
    assert_one_line_error(e, "image_size")


def test_postprocess_blocks_must_equal_preprocess_blocks():
    with pytest.raises(ConfigError) as e:
        tiny_config(num_postprocess_blocks=2)
    assert_one_line_error(e, "num_postprocess_blocks", "num_preprocess_blocks")


@pytest.mark.parametrize(
    "field, value, words",
    [
        ("precision", "float16", ["precision", "float16"]),
        ("recompute", "everything", ["recompute"]),
        ("decoder", "gaussian", ["decoder"]),
        ("dataset", "svhn", ["dataset", "svhn"]),
        ("num_x_bits", 8, ["bernoulli", "num_x_bits"]),
        ("num_channels_enc", 0, ["num_channels_enc"]),
        ("num_groups_per_scale", 0, ["num_groups_per_scale"]),
        ("num_nf", -1, ["num_nf"]),
        ("kl_anneal_portion", 0.0, ["kl_anneal_portion"]),
        ("learning_rate_min", 0.5, ["learning_rate_min"]),
        ("warmup_epochs", 2, ["warmup_epochs"]),
        ("ema_decay", 1.0, ["ema_decay"]),
    ],
)
def test_bad_values_are_one_line_errors(field, value, words):
    with pytest.raises(ConfigError) as e:
        tiny_config(**{field: value})
    assert_one_line_error(e, *words)


def test_colour_decoder_constraints():
    with pytest.raises(ConfigError) as e:
        tiny_config(dataset="folder", decoder="logistic_mixture", num_x_bits=8)
    assert_one_line_error(e, "image_channels")
    with pytest.raises(ConfigError) as e:
        tiny_config(dataset="folder", decoder="logistic_mixture", image_channels=3, num_x_bits=1)
    assert_one_line_error(e, "num_x_bits")


def test_config_error_is_a_value_error():
    assert issubclass(ConfigError, ValueError)


def test_config_is_frozen_and_replace_validates():
    config = tiny_config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.num_nf = 3
    assert config.replace(num_nf=3).num_nf == 3
    with pytest.raises(ConfigError):
        config.replace(precision="double")


# ----------------------------------------------------------------------------- overrides


def test_with_overrides_parses_yaml_scalars():
    config = tiny_config().with_overrides(
        [
            "num_nf=2",
            "learning_rate=3e-3",
            "use_se=false",
            "data_dir=/tmp/x y",
            "precision=mixed_bfloat16",
            " epochs = 7",
            "weight_decay_norm=0",
        ]
    )
    assert config.num_nf == 2
    assert config.learning_rate == pytest.approx(3e-3)
    assert config.use_se is False
    assert config.data_dir == "/tmp/x y"
    assert config.precision == "mixed_bfloat16"
    assert config.epochs == 7
    assert config.weight_decay_norm == 0.0 and isinstance(config.weight_decay_norm, float)


def test_with_overrides_empty_value_is_none():
    config = tiny_config(data_dir="/data").with_overrides(["data_dir="])
    assert config.data_dir is None


def test_with_overrides_later_assignment_wins_and_keeps_the_rest():
    base = tiny_config()
    config = base.with_overrides(["num_nf=1", "num_nf=3"])
    assert config.num_nf == 3
    assert dataclasses.replace(config, num_nf=0) == base


@pytest.mark.parametrize(
    "item, words",
    [
        ("num_nf", ["key=value"]),
        ("=3", ["key=value"]),
        ("nonsense=1", ["unknown", "nonsense"]),
        ("num_nf=two", ["num_nf"]),
        ("precision=half", ["precision"]),
    ],
)
def test_with_overrides_errors(item, words):
    with pytest.raises(ConfigError) as e:
        tiny_config().with_overrides([item])
    assert_one_line_error(e, *words)


def test_overrides_can_make_an_impossible_layout_and_are_refused():
    with pytest.raises(ConfigError) as e:
        load("cifar10").with_overrides(["num_latent_scales=7"])
    assert_one_line_error(e, "not divisible")
