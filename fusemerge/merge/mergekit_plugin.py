"""VaRM for mergekit users: importing this module registers `variation_ratio` (and `varm`) in mergekit.

    import fusemerge.merge.mergekit_plugin   # then mergekit.merge.run_merge runs `merge_method: variation_ratio`
    python -m fusemerge.merge.mergekit_plugin recipe.yml out/ [mergekit-yaml options]

mergekit has no plugin entry points, so registration happens on import; running this module is
`mergekit-yaml` with the plugin loaded. The math is fusemerge's own (`variation_ratio` in
fusemerge.merge.methods), so both engines give the same tensors. Inside mergekit the statistics are
pooled per matrix only (the paper's default): mergekit merges tensor by tensor with no first pass over a
layer or the whole model, so `granularity: layer | model` needs fusemerge's streaming engine. Only
VaRM is registered: every other fusemerge method is mergekit's own.
"""

from __future__ import annotations

from typing import Literal

import torch
from mergekit import merge_methods
from mergekit.merge_methods import BasePolicy, InputContract, PerNonBase, TensorGroup
from mergekit.merge_methods.easy_define import merge_method

from fusemerge.merge.methods.variation_ratio import variation_ratio as _varm_math

NAMES = ("variation_ratio", "varm")


def _kernel(
    group: TensorGroup, weight: PerNonBase[float] = 1.0, granularity: Literal["matrix"] = "matrix"
) -> torch.Tensor:
    entries = group.non_base
    base = group.base.tensor
    result = _varm_math(
        [e.tensor for e in entries], base, weight=weight.values_for(entries), granularity=granularity
    )
    return result.to(base.dtype)


def register() -> None:
    """Register VaRM under both names; a second call (or a second import) is a no-op."""
    present = {m.spec.name for m in merge_methods.registered_methods()}
    for name in NAMES:
        if name in present:
            continue
        method = merge_method(
            _kernel,
            name=name,
            pretty_name="VaRM (Variation Ratio Merge)",
            reference_url="https://arxiv.org/abs/2408.07990",
            contract=InputContract(base=BasePolicy.REQUIRED, min_non_base=2),
        )
        merge_methods.register(method)


register()

if __name__ == "__main__":  # pragma: no cover - mergekit-yaml with the plugin loaded
    from mergekit.scripts.run_yaml import main

    main()
