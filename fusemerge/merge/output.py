"""The merge output folder, shared by both engines: claim it, record the run, mark it complete.

The folder is only ever in one of three states: being written (a lock is held and the state manifest
says "running"), complete (the manifest says "complete" and the weights' index is there), or interrupted
(rerun the same command). A folder holding anything else (another recipe's merge, unrelated files) is
refused unless `overwrite`. The names and the lock are the output-folder protocol of
`fusemerge.checkpoint.layout` (see ARCHITECTURE.md, "Contracts"); this module adds what a merge writes
besides its weights: the recipe, verbatim, and a model card.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from fusemerge import __version__
from fusemerge.checkpoint.layout import (
    DONE_SUFFIX,
    INDEX_NAME,
    PARTIAL_SUFFIX,
    RECIPE_NAME,
    SINGLE_NAME,
    STATE_DIR,
    TOKENIZER_FILES,
    atomic_write_text,
    exclusive_lock,
    read_state,
    write_state,
)
from fusemerge.errors import FusemergeError

CARD_NAME = "README.md"
# Everything a merge writes into its output folder (cleared before a merge of another recipe).
OUTPUT_PATTERNS = (
    "*.safetensors",
    INDEX_NAME,
    f".*{PARTIAL_SUFFIX}",
    f".*{DONE_SUFFIX}",
    "config.json",
    "generation_config.json",
    RECIPE_NAME,
    CARD_NAME,
    *TOKENIZER_FILES,
)


@contextmanager
def claimed_output(out: Path, fingerprint: str, *, overwrite: bool, resumable: bool) -> Iterator[bool]:
    """Hold the folder's lock for one merge; yields False when this merge is already complete there.

    Refuses a foreign folder first (unless `overwrite`). Outputs of another recipe, or of an interrupted
    run that cannot resume (`resumable=False`: the mergekit engine), are cleared; the manifest then says
    "running" until `mark_complete`.
    """
    refuse_foreign_folder(out, fingerprint, overwrite)
    out.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(out, what="merge"):
        state = read_state(out)
        complete = state.get("fingerprint") == fingerprint and state.get("status") == "complete"
        if complete and not overwrite and _has_weights(out):
            yield False
            return
        if state.get("fingerprint") != fingerprint or overwrite or not resumable:
            clear_outputs(out)
        write_manifest(out, fingerprint, "running")
        yield True


def write_record(out: Path, recipe_text: str, card: str) -> None:
    """The recipe, verbatim, and the model card: written before the folder is marked complete."""
    atomic_write_text(out / RECIPE_NAME, recipe_text)
    atomic_write_text(out / CARD_NAME, card)


def mark_complete(out: Path, fingerprint: str) -> None:
    write_manifest(out, fingerprint, "complete")


def write_manifest(out: Path, fingerprint: str, status: str) -> None:
    write_state(out, {"fingerprint": fingerprint, "status": status, "fusemerge_version": __version__})


def refuse_foreign_folder(out: Path, fingerprint: str, overwrite: bool) -> None:
    if overwrite or not out.exists():
        return
    if not out.is_dir():
        raise FusemergeError("the output path exists and is not a folder", file=out)
    entries = [p for p in out.iterdir() if p.name != STATE_DIR]
    state = read_state(out)
    if state.get("fingerprint") == fingerprint:
        return
    if state:
        raise FusemergeError(
            "the output folder holds a merge of a different recipe, inputs or --out-shard-size; pass --overwrite to replace it",
            file=out,
        )
    if entries:
        raise FusemergeError(
            "the output folder exists and is not empty; pass --overwrite to replace it", file=out
        )


def clear_outputs(out: Path) -> None:
    for pattern in OUTPUT_PATTERNS:
        for path in out.glob(pattern):
            if path.is_file():
                path.unlink()


def _has_weights(out: Path) -> bool:
    return (out / INDEX_NAME).is_file() or (out / SINGLE_NAME).is_file()
