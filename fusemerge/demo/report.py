"""The fusion demo's results: one table, the comparisons the method predicts, and a PNG of the same numbers.

Bits per byte (of the assistant text's UTF-8) is the unit because the models have different tokenizers:
per-token numbers of a Qwen3-, a GPT-2- and a Mistral-tokenized model are not comparable, per-byte ones are.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from fusemerge.checkpoint.layout import publish, tmp_sibling
from fusemerge.demo.corpus import DOMAINS

if TYPE_CHECKING:
    from fusemerge.demo.results import DemoResult

BASELINE = "pivot + CLM only (baseline)"
COLUMNS = (*DOMAINS, "average")


def results_table(result: DemoResult) -> str:
    """A fixed-width table: one row per model, one column per domain and the average (lower is better)."""
    width = max(len(label) for label in result.labels)
    lines = [
        "held-out bits per byte (lower is better)",
        f"{'model':<{width}}  " + "  ".join(f"{c:>8}" for c in COLUMNS),
        "-" * (width + 2 + 10 * len(COLUMNS)),
    ]
    for label in result.labels:
        row = result.bits_per_byte[label]
        lines.append(f"{label:<{width}}  " + "  ".join(f"{row[c]:>8.4f}" for c in COLUMNS))
    return "\n".join(lines)


# VaRM "no worse than linear" holds within this fraction of linear's average: the two merges of targets
# fine-tuned from one pivot on one data set tie to the fifth decimal, and the sign of that difference is
# float rounding (VaRM was 0.00002 bits/byte behind on an H200 and ahead on CPUs).
VARM_TIE = 1e-4


def claims(result: DemoResult, specialist_domains: list[str]) -> dict[str, bool]:
    """Whether each of FuseChat's predictions held in this run, by the claim's wording (in print order).

    Each fused target beats the CLM-only baseline on its specialist's domain (strictly); the VaRM merge's
    average is no worse than the linear merge's, within `VARM_TIE` of it.
    """
    bpb = result.bits_per_byte
    held = {
        f"fused with the {domain} specialist beats CLM-only on {domain}": (
            bpb[f"fused with {domain} specialist"][domain] < bpb[BASELINE][domain]
        )
        for domain in specialist_domains
    }
    varm, linear = bpb["VaRM merge"]["average"], bpb["linear merge"]["average"]
    held["VaRM merge no worse than linear on average"] = varm <= linear * (1 + VARM_TIE)
    return held


def check_lines(result: DemoResult, specialist_domains: list[str]) -> list[str]:
    """What FuseChat predicts, each stated with its numbers and whether it held in this run."""
    bpb = result.bits_per_byte
    held = claims(result, specialist_domains)
    lines = []
    for domain in specialist_domains:
        fused, base = bpb[f"fused with {domain} specialist"][domain], bpb[BASELINE][domain]
        claim = f"fused with the {domain} specialist beats CLM-only on {domain}"
        lines.append(
            f"{claim}: {'yes' if held[claim] else 'NO'} "
            f"({fused:.4f} vs {base:.4f} bits/byte, {_percent(fused, base)})"
        )
    varm, linear = bpb["VaRM merge"]["average"], bpb["linear merge"]["average"]
    claim = "VaRM merge no worse than linear on average"
    tie = abs(varm - linear) < VARM_TIE * linear
    lines.append(
        f"{claim}: {'yes' if held[claim] else 'NO'} "
        f"({varm:.5f} vs {linear:.5f}, {_percent(varm, linear, 3)}"
        + ("; a tie: within 0.01%)" if tie else ")")
    )
    if result.varm_weights:
        w = sorted(result.varm_weights)
        lines.append(
            f"VaRM's weight of the first target per matrix: min {w[0]:.3f}, median {w[len(w) // 2]:.3f}, "
            f"max {w[-1]:.3f} (linear: 0.500 everywhere)"
        )
    return lines


def _percent(new: float, old: float, digits: int = 2) -> str:
    return f"{100 * (new - old) / old:+.{digits}f}%"


def save_plot(result: DemoResult, path: str | Path) -> Path:
    """Grouped bars: one group per column of the table, one bar per model."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    path = Path(path)
    fig, ax = plt.subplots(figsize=(11, 5.5), dpi=110)
    n = len(result.labels)
    width = 0.8 / n
    for i, label in enumerate(result.labels):
        values = [result.bits_per_byte[label][c] for c in COLUMNS]
        xs = [c + (i - (n - 1) / 2) * width for c in range(len(COLUMNS))]
        bars = ax.bar(xs, values, width, label=label)
        ax.bar_label(bars, fmt="%.3f", fontsize=6, rotation=90, padding=2)
    every = [result.bits_per_byte[label][c] for label in result.labels for c in COLUMNS]
    low, high = min(every), max(every)
    ax.set_ylim(max(0.0, low - 0.25 * (high - low) - 0.05), high + 0.2 * (high - low) + 0.05)
    ax.set_xticks(range(len(COLUMNS)), [c if c == "average" else f"{c} (held-out)" for c in COLUMNS])
    ax.set_ylabel("bits per byte (lower is better)")
    ax.set_title("fusemerge demo: FuseChat on small models trained on the spot")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_sibling(path)
    fig.savefig(tmp, format=path.suffix.lstrip(".") or "png")
    plt.close(fig)
    publish(tmp, path)
    return path
