"""Seeds of the random merge methods (DARE, DELLA), owned by the engine.

The engine derives one seed per output tensor from the run's `--random-seed` and the tensor's name
(`derive_seed(run_seed, name)`) and hands it to the method as its `seed` keyword; methods only pass it on
to sparsification (`fusemerge.merge.sparsify`), which derives the per-model and per-chunk seeds from it.
So a tensor's result depends neither on the order the reader delivers tensors in nor on which shards a
resume redoes, and the same seed gives the same draws on a CPU or a GPU.
"""

from __future__ import annotations

import hashlib

from fusemerge.merge.lazy_torch import torch


def derive_seed(*parts: object) -> int:
    """A 63-bit seed from any parts (run seed, tensor name, model index, chunk offset)."""
    digest = hashlib.sha256(":".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def uniform(seed: int, shape: torch.Size | tuple[int, ...], device: torch.device) -> torch.Tensor:
    """U[0, 1) draws from a CPU generator, moved to `device`: the same seed gives the same draws on a
    CPU or a GPU merge (CUDA generators produce other streams)."""
    gen = torch.Generator()
    gen.manual_seed(seed)
    return torch.rand(shape, generator=gen).to(device)
