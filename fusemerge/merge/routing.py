"""Which engine runs a recipe: the streaming engine, or mergekit as the fallback for what only it does.

Decided once per run from the parsed recipe (`fusemerge.merge.recipe.read_recipe`); the streaming planner
refuses the same features by name (`fusemerge.merge.plan.check_streaming_features`) when asked to run
them anyway, so nothing in a recipe is ever silently ignored.
"""

from __future__ import annotations

from fusemerge.errors import FusemergeError
from fusemerge.merge.recipe import MergeRecipe, RecipeFile
from fusemerge.merge.vocabulary import vocabulary_reason

ENGINES = ("auto", "streaming", "mergekit")


def mergekit_reason(recipe: MergeRecipe) -> tuple[str, str] | None:
    """(recipe key, what) for the first feature only mergekit does, or None if streaming can run it."""
    if recipe.slices is not None:
        return "slices", "slices (a frankenmerge)"
    if recipe.modules is not None:
        return "modules", "modules"
    if recipe.tokenizer is not None:
        return "tokenizer", "the 'tokenizer' section (vocabulary union/permutation)"
    if recipe.tokenizer_source == "union":
        return "tokenizer_source", "tokenizer_source: union"
    return None


def choose_engine(engine: str, source: RecipeFile) -> tuple[str, str]:
    """(engine that runs, why), for the CLI to say."""
    if engine not in ENGINES:
        raise FusemergeError(f"unknown engine '{engine}' (choose from {', '.join(ENGINES)})", key="--engine")
    if engine == "mergekit":
        return "mergekit", "asked for with --engine mergekit"
    reason = (
        ("experts", "mergekit-moe's experts format")
        if source.loaded is None
        else mergekit_reason(source.loaded.recipe) or vocabulary_reason(source.loaded)
    )
    if reason is None:
        return "streaming", "the recipe uses only what the streaming engine does"
    if engine == "streaming":
        return "streaming", ""  # build_plan refuses the feature by name
    return "mergekit", f"the recipe uses {reason[1]}"
