"""Where each tensor of an original NVAE state dict goes in our model, and loading it there.

The original names its modules by position (``enc_tower.7``, ``dec_sampler.3.1``, ...); this
module walks our model in the original's construction order and pairs every state-dict key
with one of our variables and a layout change:

- convs: PyTorch's (out, in, kh, kw) kernel -> our (kh, kw, in, out); depthwise
  (C, 1, kh, kw) -> (kh, kw, C, 1); the weight-norm ``log_weight_norm`` (out, 1, 1, 1) is our
  ``log_g`` (out,) (both parametrise the gain as exp(.)); bias as is.
- batch norm: weight, bias, running_mean, running_var -> gamma, beta, moving mean/variance.
- squeeze-excitation linears: (out, in) -> our dense (in, out).
- the learned top input ``prior_ftr0`` (C, H, W) -> our ``h`` (H, W, C).

Facts of the original's layout used here: encoder combiners are built bottom-up and used
top-down (bottom-up combiner k serves group G-1-k); ``dec_sampler`` has no entry for the top
group; ``nf_cells`` holds ``num_nf`` pairs per group, top group first; an up-sampling
inverted residual has an extra (parameter-free) nearest up-sampling module first.
"""

import dataclasses
from collections.abc import Callable, Mapping

import numpy as np

# Layouts: how a PyTorch tensor becomes ours.
_LAYOUTS = {
    "same": lambda a: a,
    "conv": lambda a: a.transpose(2, 3, 1, 0),
    "depthwise": lambda a: a.transpose(2, 3, 0, 1),
    "gain": lambda a: a.reshape(-1),
    "dense": lambda a: a.T,
    "chw": lambda a: a.transpose(1, 2, 0),
}
# State-dict entries with no meaning in our model, by their last name component.
MEANINGLESS = {
    "num_batches_tracked": "batch-norm update counts (our momentum is fixed)",
    "weight_normalized": "copies of the weights of convs without weight norm",
}


class MappingError(ValueError):
    """The state dict does not fit the model built from its args (one-line message)."""


@dataclasses.dataclass(frozen=True)
class Slot:
    """One state-dict key, the variable it fills and the layout change on the way."""

    key: str
    variable: object
    layout: str


@dataclasses.dataclass(frozen=True)
class LoadReport:
    """What ``load_state_dict`` did: variables set, and the ignored keys by reason."""

    assigned: int
    ignored: dict

    def ignored_line(self) -> str:
        parts = [f"{len(keys)} {name} ({MEANINGLESS[name]})" for name, keys in self.ignored.items()]
        return "ignored, no meaning here: " + ("; ".join(parts) if parts else "nothing")


class _SlotCollector:
    """Collects the slots of our model, in the original's construction order."""

    def __init__(self, keys):
        self.keys = set(keys)
        self.slots = []

    def add(self, key, variable, layout="same"):
        self.slots.append(Slot(key, variable, layout))

    def conv(self, prefix, conv):
        self.add(f"{prefix}.weight", conv.kernel, "depthwise" if conv.depthwise else "conv")
        if conv.weight_norm:
            self.add(f"{prefix}.log_weight_norm", conv.log_g, "gain")
        if conv.use_bias:
            self.add(f"{prefix}.bias", conv.bias)

    def batchnorm(self, prefix, bn):
        # The original's get_batchnorm wraps nn.SyncBatchNorm in a module (".bn.") when its
        # SYNC_BN switch is on, and returns a plain BatchNorm2d when off.
        if f"{prefix}.bn.weight" in self.keys:
            prefix = f"{prefix}.bn"
        for name, variable in (
            ("weight", bn.gamma),
            ("bias", bn.beta),
            ("running_mean", bn.moving_mean),
            ("running_var", bn.moving_variance),
        ):
            self.add(f"{prefix}.{name}", variable)

    def squeeze_excitation(self, prefix, se):
        for index, dense in ((0, se.squeeze), (2, se.excite)):
            self.add(f"{prefix}.se.{index}.weight", dense.kernel, "dense")
            self.add(f"{prefix}.se.{index}.bias", dense.bias)

    def encoder_cell(self, prefix, cell):
        """``Cell`` of two BN-Swish-conv ops (res_bnswish), factorized-reduce skip if down."""
        if cell.downsample:
            for i, conv in enumerate(cell.reduce.convs):
                self.conv(f"{prefix}.skip.conv_{i + 1}", conv)
        for i, (bn_swish, conv) in enumerate(
            ((cell.bn_swish_1, cell.conv_1), (cell.bn_swish_2, cell.conv_2))
        ):
            self.batchnorm(f"{prefix}._ops.{i}.bn_act", bn_swish.bn)
            self.conv(f"{prefix}._ops.{i}.conv_0", conv)
        if cell.se is not None:
            self.squeeze_excitation(f"{prefix}.se", cell.se)

    def decoder_cell(self, prefix, cell):
        """``Cell`` of one inverted residual (mconv_e6k5g0 / mconv_e3k5g0), up-skip if up."""
        if cell.upsample:
            self.conv(f"{prefix}.skip.1", cell.up_skip.conv)
        ops = f"{prefix}._ops.0.conv"
        first = 1 if cell.upsample else 0  # nn.UpsamplingNearest2d comes first
        self.batchnorm(f"{ops}.{first}", cell.bn_in)
        self.conv(f"{ops}.{first + 1}.conv.0", cell.expand)
        self.batchnorm(f"{ops}.{first + 1}.conv.1", cell.bn_swish_1.bn)
        self.conv(f"{ops}.{first + 2}.conv.0", cell.depthwise)
        self.batchnorm(f"{ops}.{first + 2}.conv.1", cell.bn_swish_2.bn)
        self.conv(f"{ops}.{first + 3}", cell.project)
        self.batchnorm(f"{ops}.{first + 4}", cell.bn_out)
        if cell.se is not None:
            self.squeeze_excitation(f"{prefix}.se", cell.se)

    def flow_cell(self, prefix, cell):
        """``CellAR``: masked 3x3 and depthwise 5x5 (``conv.convz``), then the mu head."""
        self.conv(f"{prefix}.conv.convz.0", cell.conv_in)
        self.conv(f"{prefix}.conv.convz.2", cell.conv_dw)
        self.conv(f"{prefix}.mu.conv_0", cell.conv_mu)


def model_slots(model, keys) -> list:
    """Every slot of ``model`` (an ``NVAE``) for a state dict with these ``keys``."""
    c, out = model.config, _SlotCollector(keys)
    out.add("prior_ftr0", model.h, "chw")
    out.conv("stem", model.stem)
    for i, cell in enumerate(model.preprocess):
        out.encoder_cell(f"pre_process.{i}", cell)

    # Encoder tower, bottom-up: per group its cells then a combiner (not after the last
    # group), and a down cell between scales.
    groups, cells = model.groups, iter(model.encoder_cells)
    index, combiners = 0, 0
    for scale, count in enumerate(reversed(c.groups_per_scale)):
        if scale > 0:
            out.encoder_cell(f"enc_tower.{index}", next(cells))
            index += 1
        for _ in range(count):
            for _ in range(c.num_cell_per_cond_enc):
                out.encoder_cell(f"enc_tower.{index}", next(cells))
                index += 1
            if combiners < len(groups) - 1:
                combiner = groups[len(groups) - 1 - combiners].encoder_combiner
                out.conv(f"enc_tower.{index}.conv", combiner.conv)
                index, combiners = index + 1, combiners + 1

    out.conv("enc0.1", groups[0].enc0)
    for g, group in enumerate(groups):
        out.conv(f"enc_sampler.{g}", group.posterior_head)
        if g > 0:
            out.conv(f"dec_sampler.{g - 1}.1", group.prior_head)
        if group.flow is not None:
            flow_cells = group.flow.cells
            for n in range(group.num_flows):
                pair = f"nf_cells.{g * group.num_flows + n}"
                out.flow_cell(f"{pair}.cell1", flow_cells[2 * n])
                out.flow_cell(f"{pair}.cell2", flow_cells[2 * n + 1])

    # Decoder tower, top-down: (an up cell,) the group's cells, then its combiner.
    index = 0
    for group in groups:
        for cell in group.cells:
            out.decoder_cell(f"dec_tower.{index}", cell)
            index += 1
        out.conv(f"dec_tower.{index}.conv", group.decoder_combiner.conv)
        index += 1
    for i, cell in enumerate(model.postprocess):
        out.decoder_cell(f"post_process.{i}", cell)
    out.conv("image_conditional.1", model.output_conv)
    return out.slots


def load_state_dict(model, state: Mapping, read: Callable[[object], np.ndarray]) -> LoadReport:
    """Set every weight of ``model`` from the original's ``state`` dict.

    ``state`` maps keys to tensor records and ``read`` turns one into a numpy array (tensors
    are read one at a time). Raises ``MappingError`` naming the tensors when a key has no
    place here, one of our weights gets no value, or shapes disagree. The spectral
    regularizer's power-iteration vectors are not in the original's state dict (it never
    saved them) and start fresh, with the longer first power iteration, as in the original.
    """
    slots = model_slots(model, state.keys())
    wanted = {slot.key for slot in slots}
    ignored = {name: [] for name in MEANINGLESS}
    unmapped = []
    for key in state:
        name = key.rsplit(".", 1)[-1]
        if key in wanted:
            continue
        if name in ignored:
            ignored[name].append(key)
        else:
            unmapped.append(key)
    if unmapped:
        raise MappingError(f"state-dict tensors with no place in the model: {_names(unmapped)}")
    missing = [slot.key for slot in slots if slot.key not in state]
    if missing:
        raise MappingError(f"the state dict lacks tensors the model needs: {_names(missing)}")
    fresh = {id(v) for v in model.spectral_regularizer.weights}
    covered = {id(slot.variable) for slot in slots}
    unset = [v.path for v in model.weights if id(v) not in covered | fresh]
    if unset:
        raise MappingError(f"model weights no state-dict tensor sets: {_names(unset)}")
    for key in ignored["weight_normalized"]:
        _check_copy(state, read, key)

    mismatched = []
    for slot in slots:
        array = _LAYOUTS[slot.layout](read(state[slot.key]))
        if tuple(array.shape) != tuple(slot.variable.shape):
            mismatched.append(
                f"{slot.key} {tuple(array.shape)} vs {slot.variable.path} {tuple(slot.variable.shape)}"
            )
            continue
        slot.variable.assign(array.astype(slot.variable.dtype))
    if mismatched:
        raise MappingError(f"shape mismatch (checkpoint vs model): {_names(mismatched)}")
    return LoadReport(len(slots), {k: v for k, v in ignored.items() if v})


def _check_copy(state, read, key):
    """``weight_normalized`` of a conv without weight norm must be its ``weight``."""
    weight_key = key[: -len("weight_normalized")] + "weight"
    if weight_key not in state:
        raise MappingError(f"state-dict tensors with no place in the model: {key}")
    if state[key] != state[weight_key] and not np.array_equal(
        read(state[key]), read(state[weight_key])
    ):
        raise MappingError(f"{key} differs from {weight_key}: an unknown conv variant")


def _names(items, limit=6):
    """A short, one-line list of names."""
    items = list(items)
    more = f" (and {len(items) - limit} more)" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more
