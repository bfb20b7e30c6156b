"""Model cards (README.md with Hub front matter) for merged, fused and fine-tuned models (see ARCHITECTURE.md,
"Data flows").

A merge names all its inputs in `base_model` with `base_model_relation: merge`; a fused target is a
fine-tune of its pivot (`base_model: pivot`), and its sources, which are teachers and not weights it
contains, are named in the text. An evaluation table sits between markers so that `fusemerge eval
--save-to` and `fusemerge push` can refresh it without touching the rest of a card.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

import yaml

if TYPE_CHECKING:
    from fusemerge.evaluate import EvalReport

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
EVAL_BEGIN = "<!-- fusemerge-eval -->"
EVAL_END = "<!-- /fusemerge-eval -->"


def hub_ids(refs: list[str]) -> list[str]:
    """Only Hub ids belong in `base_model` metadata; local paths are named in the text instead."""
    return [r for r in refs if _HUB_ID.match(r)]


def merge_card(
    *,
    method_name: str,
    method_pretty: str,
    method_url: str,
    base_model: str | None,
    models: list[str],
    recipe_text: str,
    extra_tags: list[str] | None = None,
    evaluation: EvalReport | None = None,
) -> str:
    refs = ([base_model] if base_model else []) + [m for m in models if m != base_model]
    front: dict[str, object] = {}
    ids = hub_ids(refs)
    if ids:
        front["base_model"] = ids
        front["base_model_relation"] = "merge"
    front["library_name"] = "transformers"
    front["tags"] = ["merge", "fusemerge", method_name, *(extra_tags or [])]
    lines = [
        "---",
        yaml.safe_dump(front, sort_keys=False).rstrip(),
        "---",
        "",
        "# Merged model",
        "",
        f"This model was merged with [fusemerge](https://github.com/fusemerge/fusemerge) using the "
        f"[{method_pretty}]({method_url}) method.",
        "",
        "## Models",
        "",
    ]
    if base_model:
        lines.append(f"- base: `{base_model}`")
    lines += [f"- `{m}`" for m in models if m != base_model]
    lines += ["", *_eval_lines(evaluation), "## Recipe", "", "```yaml", recipe_text.rstrip(), "```", ""]
    return "\n".join(lines)


def _target_card(
    *,
    pivot: str,
    tags: list[str],
    title: str,
    text: str,
    models: list[str],
    sections: list[str],
    recipe_text: str,
    evaluation: EvalReport | None,
) -> str:
    """What every trained target's card shares: a fine-tune of the pivot (front matter, models, recipe)."""
    front: dict[str, object] = {}
    if hub_ids([pivot]):
        front["base_model"] = pivot
        front["base_model_relation"] = "finetune"
    front["library_name"] = "transformers"
    front["tags"] = tags
    lines = [
        "---",
        yaml.safe_dump(front, sort_keys=False).rstrip(),
        "---",
        "",
        f"# {title}",
        "",
        text,
        "",
        "## Models",
        "",
        *models,
        "",
        *sections,
        *_eval_lines(evaluation),
        "## Recipe",
        "",
        "```yaml",
        recipe_text.rstrip(),
        "```",
        "",
    ]
    return "\n".join(lines)


def fused_card(
    *,
    pivot: str,
    sources: list[str],
    recipe_text: str,
    extra_tags: list[str] | None = None,
    evaluation: EvalReport | None = None,
    selection: list[str] | None = None,
) -> str:
    """The card of one fused target: a fine-tune of the pivot, distilled from the sources' distributions.

    `selection`: one line per domain saying which teacher MinCE picked for how many sequences
    (`fusemerge.fuse.report.selection_lines`), so a reader sees which teacher each domain learnt from."""
    return _target_card(
        pivot=pivot,
        tags=["fusechat", "knowledge-fusion", "fusemerge", *(extra_tags or [])],
        title="Fused model",
        text=f"This model is `{pivot}` fine-tuned with [fusemerge](https://github.com/fusemerge/fusemerge) by "
        "knowledge fusion ([FuseChat](https://arxiv.org/abs/2408.07990)): it was trained on chat data "
        "towards the token distributions of the source models below, aligned to its own tokenizer.",
        models=[f"- pivot (base): `{pivot}`", *(f"- source: `{s}`" for s in sources)],
        sections=(
            [
                "## Teacher per sequence",
                "",
                "The teacher with the lowest cross-entropy on each training sequence (the one MinCE trains on; "
                "avgce gives it the largest weight), per domain:",
                "",
                *(f"- {line}" for line in selection),
                "",
            ]
            if selection
            else []
        ),
        recipe_text=recipe_text,
        evaluation=evaluation,
    )


def finetune_card(
    *,
    pivot: str,
    recipe_text: str,
    extra_tags: list[str] | None = None,
    evaluation: EvalReport | None = None,
) -> str:
    """The card of a plain fine-tune (`fusion.function: none` or `lambda: 1`): the fusion's baseline."""
    return _target_card(
        pivot=pivot,
        tags=["fine-tune", "fusemerge", *(extra_tags or [])],
        title="Fine-tuned model",
        text=f"This model is `{pivot}` fine-tuned with [fusemerge](https://github.com/fusemerge/fusemerge) on "
        "chat data with the causal language-modelling loss alone: a plain fine-tune, no knowledge fusion "
        "and no teacher models. It is the baseline of a fusion on the same data "
        "([FuseChat](https://arxiv.org/abs/2408.07990)'s CLM-only run).",
        models=[f"- base: `{pivot}`"],
        sections=[],
        recipe_text=recipe_text,
        evaluation=evaluation,
    )


def implicit_card(
    *,
    pivot: str,
    sources: list[str],
    stages: list[str],
    data: list[str],
    recipe_text: str,
    tags: list[str],
) -> str:
    """The card of an implicit-fusion target: a fine-tune of the pivot on the sources' best answers.

    Args:
        pivot: the model the target was trained from (its `base_model`).
        sources: the models whose responses it learned from (teachers, not weights it contains).
        stages: the training stages it went through, in order ("SFT", "preference (wrpo)").
        data: the training data files, named in the text.
        recipe_text: the recipe YAML, copied verbatim.
        tags: extra Hub tags (loss, training mode).
    """
    return _target_card(
        pivot=pivot,
        tags=["fusechat", "implicit-fusion", "fusemerge", *tags],
        title="Fused model",
        text=f"This model is `{pivot}` fine-tuned with [fusemerge](https://github.com/fusemerge/fusemerge) by "
        "implicit model fusion ([FuseChat-3.0](https://arxiv.org/abs/2503.04222), "
        "[WRPO](https://arxiv.org/abs/2412.03187)): the source models below answered the prompts, the answers "
        f"were scored, and the pivot learned from the best of them by {' then '.join(stages)}.",
        models=[f"- pivot (base): `{pivot}`", *(f"- source: `{s}`" for s in sources)],
        sections=["## Data", "", *(f"- `{d}`" for d in data), ""],
        recipe_text=recipe_text,
        evaluation=None,
    )


def eval_section(report: EvalReport) -> str:
    """The evaluation table in Markdown, between markers: bits per byte and nats per token per domain."""
    models = report.models
    rows = [*report.domains, "all"] if len(report.domains) > 1 else list(report.domains)
    head = "| domain | " + " | ".join(f"`{report.name(m)}`" for m in models) + " |"
    lines = [
        EVAL_BEGIN,
        "## Evaluation",
        "",
        "Held-out loss on the assistant turns of chat data (`fusemerge eval`): bits per byte (lower is "
        "better; comparable across tokenizers), with nats per token in parentheses.",
        "",
        head,
        "|---|" + "---|" * len(models),
    ]
    for d in rows:
        cells = []
        for m in models:
            s = report.score(m, d)
            cells.append(f"{s.bits_per_byte:.4f} ({s.nats_per_token:.3f})")
        lines.append(f"| {d} | " + " | ".join(cells) + " |")
    lines += ["", EVAL_END, ""]
    return "\n".join(lines)


def with_eval_section(card: str, report: EvalReport) -> str:
    """`card` with its evaluation section replaced, or inserted before the recipe (or at the end)."""
    section = eval_section(report)
    if EVAL_BEGIN in card and EVAL_END in card:
        head, rest = card.split(EVAL_BEGIN, 1)
        tail = rest.split(EVAL_END, 1)[1].lstrip("\n")
        return head + section + tail
    if "\n## Recipe\n" in card:
        head, tail = card.split("\n## Recipe\n", 1)
        return head.rstrip("\n") + "\n\n" + section + "## Recipe\n" + tail
    return card.rstrip("\n") + "\n\n" + section


def _eval_lines(report: EvalReport | None) -> list[str]:
    return eval_section(report).split("\n") if report is not None else []
