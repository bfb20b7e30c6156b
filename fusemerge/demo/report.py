"""The demos' results: one table, the comparisons the method predicts, and a PNG of the same numbers.

The fusion demo: bits per byte (of the assistant text's UTF-8) is the unit because the models have
different tokenizers: per-token numbers of a Qwen3-, a GPT-2- and a Mistral-tokenized model are not
comparable, per-byte ones are. The implicit demo: held-out accuracy, the share of problems a model's
greedy answer gets right (`math_answer`), which needs no common unit at all.

Both print their table with `format_table`, state each claim with `verdict_line` (`<claim>: yes (...)`
or `<claim>: NO (...)`; the exit status rule of `fusemerge demo` reads the same verdicts) and draw their
PNG with `save_bars`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from fusemerge.checkpoint.layout import publish, tmp_sibling
from fusemerge.demo.arithmetic import DOMAINS as ARITHMETIC_DOMAINS
from fusemerge.demo.corpus import DOMAINS
from fusemerge.demo.results import PAPER_SUFFIX, PIVOT_LABEL, SFT_LABEL, preference_label

if TYPE_CHECKING:
    from fusemerge.demo.results import DemoResult, ImplicitResult

BASELINE = "pivot + CLM only (baseline)"
COLUMNS = (*DOMAINS, "average")


def format_table(
    title: str,
    rows: dict[str, dict[str, float]],
    columns: Sequence[str],
    *,
    cell: Callable[[float], str] = lambda v: f"{v:.4f}",
) -> str:
    """A fixed-width table under its title: one row per model (in order), one column per key of `columns`."""
    width = max(len(label) for label in rows)
    col = max(8, *(len(c) for c in columns))
    lines = [
        title,
        f"{'model':<{width}}  " + "  ".join(f"{c:>{col}}" for c in columns),
        "-" * (width + 2 + (col + 2) * len(columns)),
    ]
    for label, row in rows.items():
        lines.append(f"{label:<{width}}  " + "  ".join(f"{cell(row[c]):>{col}}" for c in columns))
    return "\n".join(lines)


def verdict_line(claim: str, held: bool, detail: str) -> str:
    """One claim as the demos print it: `<claim>: yes (<numbers>)` or `<claim>: NO (<numbers>)`."""
    return f"{claim}: {'yes' if held else 'NO'} ({detail})"


def results_table(result: DemoResult) -> str:
    """A fixed-width table: one row per model, one column per domain and the average (lower is better)."""
    return format_table("held-out bits per byte (lower is better)", result.bits_per_byte, COLUMNS)


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
            verdict_line(claim, held[claim], f"{fused:.4f} vs {base:.4f} bits/byte, {_percent(fused, base)}")
        )
        paper = bpb.get(f"fused with {domain} specialist{PAPER_SUFFIX}")
        if paper is not None:  # not a claim: the row the recommended setting is measured against
            lines.append(
                f"  at the paper's setting: {paper[domain]:.4f} vs {base:.4f} bits/byte, "
                f"{_percent(paper[domain], base)}"
            )
    varm, linear = bpb["VaRM merge"]["average"], bpb["linear merge"]["average"]
    claim = "VaRM merge no worse than linear on average"
    tie = abs(varm - linear) < VARM_TIE * linear
    lines.append(
        verdict_line(
            claim,
            held[claim],
            f"{varm:.5f} vs {linear:.5f}, {_percent(varm, linear, 3)}"
            + ("; a tie: within 0.01%" if tie else ""),
        )
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
    return save_bars(
        result.bits_per_byte,
        COLUMNS,
        path,
        column_labels=[c if c == "average" else f"{c} (held-out)" for c in COLUMNS],
        ylabel="bits per byte (lower is better)",
        title="fusemerge demo: FuseChat on small models trained on the spot",
    )


# -- the implicit-fusion demo (fusemerge.demo.implicit) -------------------------------------------------------
IMPLICIT_COLUMNS = (*ARITHMETIC_DOMAINS, "average")


def implicit_table(result: ImplicitResult) -> str:
    """Held-out accuracy in percent: one row per model, one column per operation and their mean."""
    return format_table(
        "held-out accuracy, % of problems answered right (higher is better)",
        result.accuracy,
        IMPLICIT_COLUMNS,
        cell=lambda v: f"{100 * v:.1f}",
    )


def implicit_claims(result: ImplicitResult, losses: Sequence[str]) -> dict[str, bool]:
    """Whether each SFT + preference target beats the pivot and the SFT-only target on average held-out
    accuracy (strictly), by the claim's wording, in print order."""
    acc = result.accuracy
    held: dict[str, bool] = {}
    for loss in losses:
        label = preference_label(loss)
        for other, name in ((PIVOT_LABEL, "the pivot"), (SFT_LABEL, "SFT alone")):
            held[f"{label} beats {name}"] = acc[label]["average"] > acc[other]["average"]
    return held


def implicit_check_lines(result: ImplicitResult, losses: Sequence[str]) -> list[str]:
    """What implicit fusion predicts, each claim stated with its numbers and whether it held in this run."""
    acc = result.accuracy
    held = implicit_claims(result, losses)
    lines = []
    for loss in losses:
        label = preference_label(loss)
        for other, name in ((PIVOT_LABEL, "the pivot"), (SFT_LABEL, "SFT alone")):
            new, old = acc[label]["average"], acc[other]["average"]
            claim = f"{label} beats {name}"
            detail = (
                f"{100 * new:.1f}% vs {100 * old:.1f}% held-out accuracy, {100 * (new - old):+.1f} points"
            )
            lines.append(verdict_line(claim, held[claim], detail))
    return lines


def save_implicit_plot(result: ImplicitResult, path: str | Path) -> Path:
    """Grouped bars of held-out accuracy: one group per operation and the average, one bar per model."""
    return save_bars(
        {label: {c: 100 * v for c, v in row.items()} for label, row in result.accuracy.items()},
        IMPLICIT_COLUMNS,
        path,
        column_labels=[c if c == "average" else f"{c} (held-out)" for c in IMPLICIT_COLUMNS],
        ylabel="% of problems answered right (higher is better)",
        title="fusemerge demo --implicit: FuseChat-3.0 on small models trained on the spot",
        fmt="%.1f",
        from_zero=True,
    )


def save_bars(
    rows: dict[str, dict[str, float]],
    columns: Sequence[str],
    path: str | Path,
    *,
    column_labels: Sequence[str],
    ylabel: str,
    title: str,
    fmt: str = "%.3f",
    from_zero: bool = False,
) -> Path:
    """Grouped bars: one group per column, one bar per row (model), written to `path` by rename.

    Args:
        rows: label -> column -> value, in legend order.
        columns: the columns to draw, in order.
        path: the PNG.
        column_labels: the x tick of each column.
        ylabel: the y axis's label.
        title: the figure's title.
        fmt: each bar's label.
        from_zero: the y axis starts at 0 (shares); else it is zoomed onto the values (small differences).
    """
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    path = Path(path)
    fig, ax = plt.subplots(figsize=(11, 5.5), dpi=110)
    labels = list(rows)
    n = len(labels)
    width = 0.8 / n
    for i, label in enumerate(labels):
        values = [rows[label][c] for c in columns]
        xs = [c + (i - (n - 1) / 2) * width for c in range(len(columns))]
        bars = ax.bar(xs, values, width, label=label)
        ax.bar_label(bars, fmt=fmt, fontsize=6, rotation=90, padding=2)
    every = [rows[label][c] for label in labels for c in columns]
    low, high = min(every), max(every)
    bottom = 0.0 if from_zero else max(0.0, low - 0.25 * (high - low) - 0.05)
    ax.set_ylim(bottom, high + 0.2 * (high - low) + 0.05)
    ax.set_xticks(range(len(columns)), list(column_labels))
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_sibling(path)
    fig.savefig(tmp, format=path.suffix.lstrip(".") or "png")
    plt.close(fig)
    publish(tmp, path)
    return path
