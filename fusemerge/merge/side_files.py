"""What the streaming engine writes beside the merged weights: config, generation config, tokenizer,
chat template, and the model card.

The tokenizer's source and the chat template are resolved once, before any work (`resolve_side_files`),
so a bad `tokenizer_source` or `chat_template` fails in a second, and the files written at the end come
from that same resolution.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from fusemerge.card import merge_card
from fusemerge.checkpoint.dtypes import name_for_code
from fusemerge.checkpoint.layout import TOKENIZER_FILES, atomic_write_text
from fusemerge.checkpoint.reader import ModelFolder
from fusemerge.errors import FusemergeError
from fusemerge.lm.templates import resolve_output_template
from fusemerge.merge.plan import MergePlan


@dataclass(frozen=True)
class SideFiles:
    tokenizer_from: ModelFolder
    chat_template: str | None  # the template text, when the recipe sets one


def resolve_side_files(plan: MergePlan) -> SideFiles:
    """Validate `tokenizer_source` and `chat_template` and resolve them, before any tensor is read."""
    recipe = plan.loaded.recipe
    folder = _tokenizer_folder(plan)
    template = None
    if recipe.chat_template:
        template = resolve_output_template(recipe.chat_template, [f.path for f in plan.folders.values()])
    return SideFiles(folder, template)


def write_side_files(plan: MergePlan, side: SideFiles, out: Path) -> None:
    reference = plan.folders[plan.base_ref] if plan.base_ref else plan.folders[plan.input_refs[0]]
    if reference.config is not None:
        config = dict(reference.config)
        out_dtypes = {t.out_dtype for t in plan.tasks if t.copy_from is None}
        if len(out_dtypes) == 1:
            key = "torch_dtype" if "torch_dtype" in config and "dtype" not in config else "dtype"
            config[key] = name_for_code(out_dtypes.pop())
        atomic_write_text(out / "config.json", json.dumps(config, indent=2) + "\n")
    generation = reference.path / "generation_config.json"
    if generation.is_file():
        shutil.copy(generation, out / "generation_config.json")

    for name in TOKENIZER_FILES:
        src = side.tokenizer_from.path / name
        if src.is_file():
            shutil.copy(src, out / name)
    if side.chat_template is not None:
        (out / "chat_template.jinja").write_text(side.chat_template, encoding="utf-8")
        config_path = out / "tokenizer_config.json"
        if config_path.is_file():
            tok_config = json.loads(config_path.read_text())
            tok_config.pop("chat_template", None)
            atomic_write_text(config_path, json.dumps(tok_config, indent=2, ensure_ascii=False) + "\n")


def plan_card(plan: MergePlan) -> str:
    """The model card of a streaming merge."""
    return merge_card(
        method_name=plan.method.name,
        method_pretty=plan.method.pretty_name,
        method_url=plan.method.reference_url,
        base_model=plan.base_ref,
        models=plan.input_refs,
        recipe_text=plan.loaded.text,
    )


def _tokenizer_folder(plan: MergePlan) -> ModelFolder:
    source = plan.loaded.recipe.tokenizer_source
    if source in (None, "base"):
        return plan.folders[plan.base_ref] if plan.base_ref else plan.folders[plan.input_refs[0]]
    if source in plan.folders:
        return plan.folders[source]
    raise FusemergeError(
        f"tokenizer_source '{source}' is not one of the recipe's models (or 'base')", key="tokenizer_source"
    )
