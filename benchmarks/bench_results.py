"""A sitting's raw runs, their medians and ratios, and issue 13's targets.

Ratios are oriented so that above 1 means nvae-tf is faster: original / ours for times, ours /
original for rates. For memory it is ours / original (below 1: nvae-tf uses less).
"""

import statistics
from dataclasses import dataclass, field

ORIGINAL, OURS = "original", "nvae-tf"  # the two sides, as the results and the table name them


@dataclass(frozen=True)
class Figure:
    key: str  # in a run's record
    label: str  # in the table
    kind: str  # "time" | "rate" | "memory": how the ratio is taken


FIGURES = (
    Figure("startup_s", "start-up s (process start → first step done)", "time"),
    Figure("startup_warm_s", "start-up s, graph cache warm (nvae-tf's later runs)", "time"),
    Figure("train_s_per_step", "train s/step", "time"),
    Figure("train_images_per_s", "train images/s", "rate"),
    Figure("sample_ms_per_img", "sampling ms/img", "time"),
    Figure("iw_images_per_s", "IW evaluation images/s", "rate"),
    Figure("peak_rss_mb", "peak RSS", "memory"),
)
# Issue 13's targets on ratios (key: (comparison, bound)); start-up's is in seconds per config.
RATIO_TARGETS = {
    "train_s_per_step": (">=", 2.0),
    "sample_ms_per_img": (">=", 2.0),
    "peak_rss_mb": ("<=", 1.0),
}


@dataclass
class RunRecord:
    """One child process: which side, configuration and repeat, and what it measured."""

    config: str
    side: str
    repeat: int
    command: list[str]
    startup_s: float  # the parent's launch of the child -> the child's first step done
    wall_s: float  # the whole child process
    figures: dict = field(default_factory=dict)  # bench_protocol.ChildFigures as a dict

    def value(self, key: str) -> float | None:
        return self.startup_s if key == "startup_s" else self.figures.get(key)


def ratio(kind: str, original: float | None, ours: float | None) -> float | None:
    """The oriented ratio of two medians (see the module docstring); None if one is missing."""
    if not original or not ours:
        return None
    return original / ours if kind == "time" else ours / original


def meets(comparison: str, bound: float, value: float | None) -> bool | None:
    if value is None:
        return None
    return value >= bound if comparison == ">=" else value <= bound


def summarize_figure(
    figure: Figure, runs: list[RunRecord], startup_target_s: float | None, ratio_targets=True
):
    """Per-side values, medians, the ratio and the target (text and whether it is met)."""
    values = {
        side: [r.value(figure.key) for r in runs if r.side == side and r.value(figure.key)]
        for side in (ORIGINAL, OURS)
    }
    medians = {side: statistics.median(v) if v else None for side, v in values.items()}
    oriented = ratio(figure.kind, medians[ORIGINAL], medians[OURS])
    target, met = None, None
    if ratio_targets and figure.key in RATIO_TARGETS:
        comparison, bound = RATIO_TARGETS[figure.key]
        target = f"{'≥' if comparison == '>=' else '≤'} {bound:.1f}×"
        met = meets(comparison, bound, oriented)
    elif figure.key in ("startup_s", "startup_warm_s") and startup_target_s is not None:
        target, met = f"≤ {startup_target_s:.0f} s", meets("<=", startup_target_s, medians[OURS])
    return {
        ORIGINAL: values[ORIGINAL],
        OURS: values[OURS],
        f"{ORIGINAL}_median": medians[ORIGINAL],
        f"{OURS}_median": medians[OURS],
        "ratio": oriented,
        "target": target,
        "met": met,
    }


def summarize(
    runs: list[RunRecord], batches: dict, startup_targets: dict, ratio_targets=True
) -> dict:
    """Per configuration (in order of first appearance): batch, IW K and each figure's summary;
    ``ratio_targets=False`` leaves issue 13's ratio targets out (they are float32 ones)."""
    summary = {}
    for config in dict.fromkeys(r.config for r in runs):
        mine = [r for r in runs if r.config == config]
        figures = {
            f.key: summarize_figure(f, mine, startup_targets.get(config), ratio_targets)
            for f in FIGURES
            if any(r.value(f.key) for r in mine)
        }
        iw = next((r.figures for r in mine if r.figures.get("iw_samples")), {})
        sums = [r.figures.get("batch_sum") for r in mine]
        summary[config] = {
            "batch": batches[config],
            "same_batch": same_sums(sums),  # every run trained on the same synthetic pixels
            "iw_samples": iw.get("iw_samples"),
            "iw_batch": iw.get("iw_batch"),
            "figures": figures,
        }
    return summary


def same_sums(sums, rtol=1e-5):
    """Whether the batch sums agree: float32 sums of the same pixels differ in the last digits
    between numpy and PyTorch (summation order), so to ``rtol``, not exactly."""
    if any(v is None for v in sums):
        return len(set(sums)) == 1
    return max(sums) - min(sums) <= rtol * max(abs(v) for v in sums)
