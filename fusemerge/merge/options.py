"""How a merge runs, as one frozen object: built once (by the CLI, or by `run_merge`'s keywords) and
handed to both engines, as mergekit's `MergeOptions` is.

What is merged is the recipe's business; these are the run's settings. The fingerprint of a streaming
merge covers what changes its output (`out_shard_size`, and `random_seed` for the random methods); the
others only change how it runs.
"""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_OUT_SHARD_SIZE = 5 * 10**9


@dataclass(frozen=True)
class MergeOptions:
    """Settings of one merge run.

    Attributes:
        dry_run: print the plan (tensors, bytes, estimated peak memory) and write nothing.
        device: where the arithmetic runs ("cpu", "cuda", "cuda:1"); reading and writing stay streaming.
        out_shard_size: largest output shard, in bytes of tensor data.
        overwrite: replace an output folder that holds something else.
        allow_pickle: accept pickle checkpoints (they can run code when loaded).
        allow_nonfinite: merge inputs that hold NaN or Inf instead of stopping at the first one.
        progress: show progress bars.
        engine: "streaming", "mergekit" (the fallback engine) or "auto": streaming unless the recipe
            uses what only mergekit does (slices, modules, tokenizer surgery, MoE).
        random_seed: seed of the random methods (DARE, DELLA); the same seed gives the same model
            (None: the streaming engine's default, 0; mergekit's own default in the fallback).
        strict: a parameter the merge method does not use is an error (by default it is ignored with a
            warning naming its file:line, as mergekit ignores it).
    """

    dry_run: bool = False
    device: str = "cpu"
    out_shard_size: int = DEFAULT_OUT_SHARD_SIZE
    overwrite: bool = False
    allow_pickle: bool = False
    allow_nonfinite: bool = False
    progress: bool = True
    engine: str = "auto"
    random_seed: int | None = None
    strict: bool = False
