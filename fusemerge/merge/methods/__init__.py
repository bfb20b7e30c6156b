"""Built-in merge methods; importing this package registers them all (see `registry`)."""

from fusemerge.merge.methods import (  # noqa: F401
    arcee_fusion,
    linear,
    model_stock,
    nearswap,
    passthrough,
    ram,
    sce,
    slerp,
    sparsified,
    spherical,
    task_arithmetic,
    variation_ratio,
)
from fusemerge.merge.methods.registry import MergeMethod, all_methods, get_method, merge_method

__all__ = ["MergeMethod", "all_methods", "get_method", "merge_method"]
