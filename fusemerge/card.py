"""Model cards (README.md with Hub front matter) for merged and fused models."""

from __future__ import annotations

import re

import yaml

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


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
    lines += ["", "## Recipe", "", "```yaml", recipe_text.rstrip(), "```", ""]
    return "\n".join(lines)


def fused_card(
    *,
    pivot: str,
    sources: list[str],
    function_pretty: str,
    function_url: str,
    training_mode: str,
    recipe_text: str,
) -> str:
    """The card of a fused target: `base_model` is the pivot (the model that was trained); the sources,
    whose knowledge was distilled into it, are named in the text (DESIGN.md 5)."""
    front: dict[str, object] = {}
    ids = hub_ids([pivot])
    if ids:
        front["base_model"] = ids[0]
        front["base_model_relation"] = "finetune"
    front["library_name"] = "transformers"
    front["tags"] = ["fusemerge", "fusechat", "knowledge-fusion"]
    lines = [
        "---",
        yaml.safe_dump(front, sort_keys=False).rstrip(),
        "---",
        "",
        "# Fused chat model",
        "",
        f"A target model of [FuseChat](https://arxiv.org/abs/2402.16107) knowledge fusion, made with "
        f"[fusemerge](https://github.com/fusemerge/fusemerge): the pivot `{pivot}` trained "
        f"({training_mode}) on the fused top-K distributions of its teachers, chosen per "
        f"[{function_pretty}]({function_url}).",
        "",
        "## Models",
        "",
        f"- pivot (base): `{pivot}`",
        *[f"- source: `{s}`" for s in sources],
        "",
        "## Recipe",
        "",
        "```yaml",
        recipe_text.rstrip(),
        "```",
        "",
    ]
    return "\n".join(lines)
