"""What the training stage reads: the pivot's own top-K store and every source's aligned store, checked.

    from fusemerge.fuse.inputs import open_fusion_inputs
    pivot, sources = open_fusion_inputs("recipe.yml")     # or a FuseRecipe, or the work_dir folder
    own = pivot.sequence(i)                               # TopKSequence(ids, logprobs, metric_ce)
    aligned = {name: store.sequence(i) for name, store in sources.items()}

The contract (stable: the training loop is written against it). For every sequence i of the dataset, in
the order of `build_chat_data`, the pivot store and each aligned store return a `TopKSequence` with
    ids        int32 [T, K]  pivot vocabulary ids, best first; -1 marks an empty slot (aligned stores only)
    logprobs   float16 [T, K] log-probabilities (memory-mapped); -inf in empty slots; not renormalised
    metric_ce  float          mean cross-entropy over assistant tokens, of the model that made the store
                              (an aligned store keeps its source's own); NaN when there is none
    ce_per_byte float         the same summed NLL over the assistant text's UTF-8 bytes (fusion.metric)
where T is the number of pivot tokens of sequence i (the same T in every store) and row t is the
distribution over the token that follows pivot token t. Pivot rows always hold K ids. An aligned row
holds the source's distribution where the alignment gave one, else the one-hot (log-prob 0) of the next
gold pivot token; the last row of a sequence can be all empty. MinCE picks per sequence the store with
the lowest `fusion.metric` (ce_per_byte by default; metric_ce is ce_per_token; ties to the pivot). Token ids and the assistant mask of sequence i come from
`ChatTokenizer(pivot_tokenizer)(data.sequences[i])`, exactly as the teacher pass made them.

Source names are the folder names under `<work_dir>/aligned/`, in recipe order when a recipe is given
(`fusemerge.fuse.workdir.FuseWorkDir` names them). Whether each store is there is the work-dir's check;
whether the aligned stores fit the pivot store is this module's, made once when they are opened.

The run's other inputs are checked here too, before the first forward pass (`run_fuse` calls
`check_fuse_inputs` first, then `FuseInputChecks.check_data` once the chat data is rendered), so that a
wrong path or a useless teacher costs seconds instead of a teacher pass: every model folder exists (or
is a Hub id) and has safetensors weights and a tokenizer that loads and encodes text, no model is
another one under a second path (`pivot/`, `./pivot`, `../models/pivot`), every vocabulary has at least
`teacher.top_k` ids, the output and work folders can be written, and no model's tokenizer maps more
than `UNKNOWN_SHARE_LIMIT` of the data's assistant bytes to its unknown token (`fusemerge.lm.unknown`;
a teacher that does wins MinCE for the wrong reason). Errors name the recipe key at fault.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, NamedTuple

from fusemerge.errors import FusemergeError
from fusemerge.fuse.recipe import FuseRecipe, ModelSpec, load_fuse_recipe
from fusemerge.fuse.store import MANIFEST, TopKSequence, TopKStore
from fusemerge.fuse.workdir import ALIGNED_DIR, TEACHER_DIR, FuseWorkDir
from fusemerge.lm.chat_data import ChatData
from fusemerge.lm.unknown import UNKNOWN_SHARE_LIMIT, WARN_SHARE, unknown_share
from fusemerge.yaml_recipes import with_recipe_line

# The unknown-token share is measured on an evenly spread sample of this many sequences: enough for a
# share of 1% to show, and seconds rather than a second tokenization of a 95,000-conversation dataset.
UNKNOWN_SAMPLE = 1000


class FusionInputs(NamedTuple):
    """(pivot store, {source name: aligned store}); unpacks as a pair."""

    pivot: TopKStore
    sources: dict[str, TopKStore]

    @property
    def n_sequences(self) -> int:
        return self.pivot.n_sequences

    def sequence(self, index: int) -> tuple[TopKSequence, dict[str, TopKSequence]]:
        """The pivot's own top-K of sequence `index` and every source's, in pivot positions and ids."""
        return self.pivot.sequence(index), {name: s.sequence(index) for name, s in self.sources.items()}


def open_fusion_inputs(where: FuseRecipe | str | Path) -> FusionInputs:
    """Open the stores the training needs, refusing any that are missing, unfinished or inconsistent.

    Args:
        where: a fuse recipe (object or YAML file): its work_dir and models name the folders; or a
            work_dir folder: every store under `aligned/` is opened and the pivot store is the teacher
            store whose model and tokenizer hash the aligned stores name.
    """
    if isinstance(where, FuseRecipe) or Path(where).is_file() or Path(where).suffix in (".yml", ".yaml"):
        recipe = where if isinstance(where, FuseRecipe) else load_fuse_recipe(where)
        return _from_recipe(recipe)
    return _from_work_dir(Path(where))


def _from_recipe(recipe: FuseRecipe) -> FusionInputs:
    return _checked(*FuseWorkDir(recipe).fusion_stores())


def _from_work_dir(work_dir: Path) -> FusionInputs:
    aligned = sorted(p.parent for p in (work_dir / ALIGNED_DIR).glob(f"*/{MANIFEST}"))
    if not aligned:
        raise FusemergeError(
            "no aligned stores under aligned/; run fusemerge fuse --steps align", file=work_dir
        )
    sources = {folder.name: TopKStore.open(folder) for folder in aligned}
    first = next(iter(sources.values())).identity
    for folder in sorted(p.parent for p in (work_dir / TEACHER_DIR).glob(f"*/{MANIFEST}")):
        identity = json.loads((folder / MANIFEST).read_text(encoding="utf-8")).get("identity", {})
        if (identity.get("model"), identity.get("tokenizer_hash")) == (
            first["pivot_model"],
            first["pivot_tokenizer_hash"],
        ):
            return _checked(TopKStore.open(folder), sources)
    raise FusemergeError(
        f"no teacher store of the pivot {first['pivot_model']} under teacher/", file=work_dir
    )


def _checked(pivot: TopKStore, sources: dict[str, TopKStore]) -> FusionInputs:
    """Every aligned store must be in this pivot's positions: same data, tokenizer and rows per shard."""
    rows = [s["tokens"] for s in pivot.manifest["shards"]]
    for name, store in sources.items():
        identity = store.identity
        problem = None
        if identity.get("kind") != "aligned" or identity.get("positions") != "pivot":
            problem = "is not an aligned store"
        elif identity.get("pivot_tokenizer_hash") != pivot.identity["tokenizer_hash"]:
            problem = "was aligned to another pivot tokenizer"
        elif identity.get("dataset_hash") != pivot.identity["dataset_hash"]:
            problem = "was made from other chat data than the pivot store"
        elif (store.n_sequences, store.shard_size) != (pivot.n_sequences, pivot.shard_size) or [
            s["tokens"] for s in store.manifest["shards"]
        ] != rows:
            problem = "does not have the pivot store's rows"
        if problem:
            raise FusemergeError(f"aligned store '{name}' {problem}; rerun the align step", file=store.path)
    return FusionInputs(pivot, sources)


# ---------------------------------------------------------------- the run's inputs, checked up front


class FuseInputChecks:
    """What `check_fuse_inputs` found: the tokenizers it loaded, for the checks that need the data."""

    def __init__(self, recipe: FuseRecipe, tokenizers: dict[str, Any], recipe_path: Path | None) -> None:
        self.recipe = recipe
        self.tokenizers = tokenizers  # recipe key of the model ("pivot", "sources[0]") -> its tokenizer
        self.recipe_path = recipe_path

    def check_data(self, data: ChatData, *, echo: Callable[[str], None] = print) -> None:
        """Refuse a teacher whose tokenizer maps more than UNKNOWN_SHARE_LIMIT of the assistant bytes to its
        unknown token; warn above WARN_SHARE. Only models whose teacher pass is to run are measured."""
        if not self.tokenizers or not data.sequences:
            return
        step = max(1, len(data.sequences) // UNKNOWN_SAMPLE)
        sample = data.sequences[::step][:UNKNOWN_SAMPLE]
        for key, tokenizer in self.tokenizers.items():
            share = unknown_share(sample, tokenizer)
            model = _spec(self.recipe, key).model
            what = f"{share:.1%} of the assistant text's bytes are unknown tokens ({tokenizer.unk_token}) for {model}"
            if share > UNKNOWN_SHARE_LIMIT:
                raise _error(
                    f"{what}: its cross-entropy would be low for the wrong reason (MinCE would pick it); "
                    f"more than {UNKNOWN_SHARE_LIMIT:.0%} is refused: use a model whose tokenizer covers the "
                    "data (byte-level BPE or byte fallback), or remove it",
                    f"{key}.model",
                    self.recipe_path,
                    self.recipe,
                )
            if share > WARN_SHARE:
                echo(f"fusemerge: warning: {what}; its teacher distributions say nothing about those bytes")


def check_fuse_inputs(
    recipe: FuseRecipe, steps: Iterable[str], *, recipe_path: str | Path | None = None
) -> FuseInputChecks:
    """Every input the steps will read or write, checked before any model is run (explicit fusion).

    The pivot is always checked (the data is rendered with its tokenizer, training starts from it); the
    sources when their teacher pass or alignment is to run; `teacher.top_k` against each vocabulary when
    the teacher pass is; the work folder always and the output folder when the train step is to run.
    """
    steps = set(steps)
    path = Path(recipe_path) if recipe_path is not None else None
    teaching = "teach" in steps and not recipe.fine_tune
    keys = ["pivot"] + (
        [f"sources[{i}]" for i in range(len(recipe.sources))]
        if not recipe.fine_tune and steps & {"teach", "align"}
        else []
    )
    for key in keys:
        _check_location(_spec(recipe, key), key, path, recipe)
    _check_distinct(recipe, keys, path)
    check_writable_folders(recipe, steps, recipe_path=path)
    tokenizers = {key: _checked_tokenizer(_spec(recipe, key), key, path, recipe) for key in keys}
    if teaching:
        for key in keys:
            _check_top_k(_spec(recipe, key), key, recipe.teacher.top_k, path, recipe)
    return FuseInputChecks(recipe, tokenizers if teaching else {}, path)


def check_writable_folders(
    recipe: FuseRecipe, steps: Iterable[str], *, recipe_path: str | Path | None = None
) -> None:
    """The work folder (always) and the output folder (when the train step runs) can be written.

    Also called by `run_fuse` before it takes the run's lock, which is itself a file in the work folder:
    a read-only or full disk is then named by its recipe key, not met as a bare OSError.
    """
    path = Path(recipe_path) if recipe_path is not None else None
    _check_writable(recipe.work_path, "work_dir" if recipe.work_dir else "output", path, recipe)
    if "train" in set(steps):
        _check_writable(Path(recipe.output), "output", path, recipe)


def _spec(recipe: FuseRecipe, key: str) -> ModelSpec:
    return recipe.pivot if key == "pivot" else recipe.sources[int(key[len("sources[") : -1])]


def _error(message: str, key: str, path: Path | None, recipe: FuseRecipe) -> FusemergeError:
    exc = FusemergeError(message, key=key)
    return with_recipe_line(exc, path, recipe.raw_yaml) if path is not None and recipe.raw_yaml else exc


def _is_hub_id(model: str) -> bool:
    """Whether a string that names no local folder can be a Hub id ('name' or 'namespace/name')."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if model.startswith((".", "/", "~")) or model.count("/") > 1 or os.sep != "/" and os.sep in model:
        return False
    try:
        validate_repo_id(model)
    except HFValidationError:
        return False
    return True


def _check_location(spec: ModelSpec, key: str, path: Path | None, recipe: FuseRecipe) -> None:
    from fusemerge.lm.loading import check_weights

    folder = Path(spec.model)
    if folder.exists():
        if not folder.is_dir():
            raise _error(f"{spec.model} is a file, not a model folder", f"{key}.model", path, recipe)
        try:
            check_weights(spec.model, allow_pickle=spec.allow_pickle, option=f"set {key}.allow_pickle: true")
        except FusemergeError as exc:
            raise _error(f"{spec.model}: {exc.message}", f"{key}.model", path, recipe) from None
    elif not _is_hub_id(spec.model):
        relative = "" if folder.is_absolute() else f" (relative to the current folder, {Path.cwd()})"
        raise _error(
            f"no such model folder: {spec.model}{relative}, nor is it a Hub id (namespace/name)",
            f"{key}.model",
            path,
            recipe,
        )


def _check_distinct(recipe: FuseRecipe, keys: list[str], path: Path | None) -> None:
    """The same folder under two spellings is one model: fusing a model with itself teaches nothing."""
    seen: dict[tuple[int, int], str] = {}
    for key in keys:
        folder = Path(_spec(recipe, key).model)
        if not folder.is_dir():
            continue  # a Hub id: the recipe compares the strings
        stat = folder.stat()
        first = seen.setdefault((stat.st_dev, stat.st_ino), key)
        if first != key:
            other = _spec(recipe, first).model
            raise _error(
                f"{_spec(recipe, key).model} is the same folder as {first}.model ({other}: {folder.resolve()}): "
                "pivot and sources must be different models",
                f"{key}.model",
                path,
                recipe,
            )


def _check_writable(folder: Path, key: str, path: Path | None, recipe: FuseRecipe) -> None:
    """Create `folder` if needed and write a file into it: a read-only or full disk found before the work."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".fusemerge-probe-", dir=folder)
        try:
            os.write(fd, b"fusemerge")
        finally:
            os.close(fd)
            os.unlink(probe)
    except OSError as exc:
        raise _error(
            f"cannot write to {folder}: {exc.strerror or exc} (choose a writable folder)", key, path, recipe
        ) from None


def _checked_tokenizer(spec: ModelSpec, key: str, path: Path | None, recipe: FuseRecipe) -> Any:
    from fusemerge.lm.loading import load_tokenizer

    try:
        return load_tokenizer(spec.model, trust_remote_code=spec.trust_remote_code)
    except FusemergeError as exc:
        local = "" if Path(spec.model).is_dir() else "not a local folder, and as a Hub id: "
        raise _error(f"{spec.model}: {local}{exc.message}", f"{key}.model", path, recipe) from None


def _check_top_k(spec: ModelSpec, key: str, top_k: int, path: Path | None, recipe: FuseRecipe) -> None:
    """The teacher keeps the top-K of each next-token distribution: K cannot exceed the vocabulary."""
    vocab = _vocab_size(spec)
    if vocab is not None and vocab < top_k:
        raise _error(
            f"top_k {top_k} is more than the {vocab} ids of {spec.model}'s vocabulary ({key}): "
            f"lower teacher.top_k to at most {vocab}",
            "teacher.top_k",
            path,
            recipe,
        )


def _vocab_size(spec: ModelSpec) -> int | None:
    """The model's output vocabulary (config.json's vocab_size, or its text config's), None if unknown."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(spec.model, trust_remote_code=spec.trust_remote_code)
    except (OSError, ValueError):
        return None  # loading the model reports it
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    size = getattr(text, "vocab_size", None)
    return int(size) if isinstance(size, int) else None
