"""The README's performance table, generated from side-by-side results files (one per sitting).

The table lives between ``BEGIN`` and ``END`` in README.md; ``update_readme`` replaces what is
between them and nothing else.
"""

import json
import os

from bench_results import FIGURES, ORIGINAL, OURS

BEGIN, END = "<!-- perf-table:begin -->", "<!-- perf-table:end -->"
LABELS = {f.key: f.label for f in FIGURES}
PRECISION_TEXT = {
    "float32": "float32",
    "bfloat16": "bfloat16 on both sides (nvae-tf `mixed_bfloat16`, the original under PyTorch's "
    "CPU bfloat16 autocast)",
}


class TableError(Exception):
    """A results file or README that cannot make a table (one line)."""


def format_value(key: str, value: float | None) -> str:
    if value is None:
        return ""
    if key == "peak_rss_mb":
        return f"{value / 1024:.1f} GB"
    if key in ("startup_s", "startup_warm_s"):
        return f"{value:.0f}" if value >= 10 else f"{value:.1f}"
    return f"{value:.3g}" if value < 100 else f"{value:.0f}"


def _cell(key: str, values: list) -> str:
    return ", ".join(format_value(key, v) for v in values)


def _target(entry: dict) -> str:
    if not entry.get("target"):
        return ""
    mark = {True: " ✓", False: " ✗"}.get(entry.get("met"), "")
    return entry["target"] + mark


def render(results: dict) -> str:
    """Markdown: one line saying where and how it was measured, then the table."""
    try:
        summary = results["summary"]
        versions = results.get("versions", {})
        tf_version = versions.get(OURS, {}).get("tensorflow", "?")
        torch_version = versions.get(ORIGINAL, {}).get("torch")
        commit = (results.get("commit") or "unknown")[:10]
        precision = results.get("precision", "float32")  # files before 2026-12-01: float32
        precision = PRECISION_TEXT.get(precision, precision)
        lines = [
            f"Measured {results['date']} on {results['host']} ({results['cpus']} CPUs), "
            f"{precision}, nvae-tf {commit} (TensorFlow {tf_version})"
            + (f" against the original (PyTorch {torch_version})" if torch_version else "")
            + f", {results['repeats']} alternating run(s) per side: values per run, ratios of "
            "medians (above 1: nvae-tf faster; for memory, below 1: nvae-tf smaller).",
            "",
            f"| config | batch | figure | {ORIGINAL} | {OURS} | ratio | target |",
            "|---|---|---|---|---|---|---|",
        ]
        for config, entry in summary.items():
            first = True
            for key, figure in entry["figures"].items():
                label = LABELS.get(key, key)
                if key == "iw_images_per_s" and entry.get("iw_samples"):
                    label += f" (K={entry['iw_samples']}, {entry.get('iw_batch')} images)"
                ratio = figure.get("ratio")
                lines.append(
                    f"| {config if first else ''} | {entry['batch'] if first else ''} | {label} "
                    f"| {_cell(key, figure[ORIGINAL])} | {_cell(key, figure[OURS])} "
                    f"| {f'{ratio:.2f}×' if ratio else ''} | {_target(figure)} |"
                )
                first = False
    except (KeyError, TypeError, AttributeError) as e:
        raise TableError(f"not a side-by-side results file (missing or malformed {e})") from None
    lines += ["", f"Command: `{results.get('command', '?')}`"]
    return "\n".join(lines)


def replace_block(text: str, block: str) -> str:
    """``text`` with what lies between the markers replaced by ``block``."""
    if text.count(BEGIN) != 1 or text.count(END) != 1 or text.index(BEGIN) > text.index(END):
        raise TableError(f"README needs exactly one {BEGIN} followed by one {END}")
    head, rest = text.split(BEGIN)
    _, tail = rest.split(END)
    return f"{head}{BEGIN}\n{block}\n{END}{tail}"


def load_results(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            results = json.load(f)
    except OSError as e:
        raise TableError(f"cannot read {path}: {e.strerror}") from None
    except ValueError:
        raise TableError(f"{path} is not JSON") from None
    if not isinstance(results, dict):
        raise TableError(f"{path} is not a side-by-side results file")
    return results


def update_readme(results_paths: list[str], readme_path: str) -> str:
    """Regenerate the table in ``readme_path`` from sittings' results; returns the new block."""
    block = "\n\n".join(render(load_results(path)) for path in results_paths)
    try:
        with open(readme_path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise TableError(f"cannot read {readme_path}: {e.strerror}") from None
    updated = replace_block(text, block)
    tmp = readme_path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(updated)
    os.replace(tmp, readme_path)
    return block
