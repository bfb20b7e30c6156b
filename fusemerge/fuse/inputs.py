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
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple

from fusemerge.errors import FusemergeError
from fusemerge.fuse.recipe import FuseRecipe, load_fuse_recipe
from fusemerge.fuse.store import MANIFEST, TopKSequence, TopKStore
from fusemerge.fuse.workdir import ALIGNED_DIR, TEACHER_DIR, FuseWorkDir


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
