"""Whether `tokenizer_source: base | <model>` needs embedding rows moved by token (mergekit's way).

mergekit builds the output vocabulary from the tokenizer source and takes each model's embedding and
`lm_head` row by *token* (a token a model lacks gets the row of its only owner, else the base's, else the
mean of its owners, zero when nobody has it), and cuts or pads the rows to the vocabulary's size. When
every model has exactly the source's vocabulary, token for token, and as many rows, that is the identity
and the streaming engine's merge by index is the same merge. Otherwise it is not, even when the sizes
agree (one fine-tune adds `<|im_start|>` where another adds `<|eot_id|>`): such recipes run through the
mergekit engine (`fusemerge.merge.routing`), and the streaming engine refuses them by name, so different
tokens are never averaged by index.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

from fusemerge.merge.models import resolve_model_path
from fusemerge.merge.recipe import LoadedRecipe

WHAT = (
    "tokenizer_source over models whose vocabularies differ from the source's (mergekit takes each "
    "embedding row by token)"
)


def vocabulary_reason(loaded: LoadedRecipe) -> tuple[str, str] | None:
    """("tokenizer_source", why) when the recipe's rows must be taken by token, else None."""
    recipe = loaded.recipe
    source = recipe.tokenizer_source
    refs = recipe.referenced_models()
    if source is None or source == "union" or not refs or recipe.models is None:
        return None
    source_ref = (recipe.base_model or refs[0]) if source == "base" else source
    if source_ref not in refs:
        return None  # not one of the recipe's models: the side-file check names the problem
    folders = {ref: _folder(ref, loaded.path.parent) for ref in refs}
    if any(folder is None for folder in folders.values()):
        return None  # the planner reports the missing model
    base_vocab = _vocab(str(folders[recipe.base_model or refs[0]]))
    target = _vocab(str(folders[source_ref]))
    if target is None:
        return None
    for folder in folders.values():
        vocab = _vocab(str(folder)) or base_vocab  # mergekit: no tokenizer means the base's
        if vocab != target or _rows(str(folder)) not in (None, len(target)):
            return "tokenizer_source", WHAT
    return None


def _folder(ref: str, recipe_dir: Path) -> Path | None:
    try:
        return resolve_model_path(ref.split("+")[0], recipe_dir=recipe_dir)
    except Exception:  # noqa: BLE001 - reported where the models are opened
        return None


@lru_cache(maxsize=64)
def _vocab(folder: str) -> dict[str, int] | None:
    """The tokenizer's vocabulary (token -> id) as mergekit reads it, or None without a tokenizer."""
    from transformers import AutoTokenizer

    try:
        return dict(AutoTokenizer.from_pretrained(folder).get_vocab())
    except Exception:  # noqa: BLE001 - mergekit too goes on without a model's tokenizer
        return None


@lru_cache(maxsize=64)
def _rows(folder: str) -> int | None:
    """config.json's vocab_size (text_config's for multimodal configs)."""
    try:
        config = json.loads((Path(folder) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    size = config.get("vocab_size") or (config.get("text_config") or {}).get("vocab_size")
    return size if isinstance(size, int) else None
