"""The built-in merge methods, one module each; importing this package registers them all.

Look methods up here (`get_method`, `all_methods`): importing the package is what fills the registry
(`fusemerge.merge.methods.registry`), so a lookup through it always sees every built-in method. Kernel
plumbing lives in `fusemerge.merge.kernels`, sparsification in `fusemerge.merge.sparsify`, seeds in
`fusemerge.merge.seeds`; see ARCHITECTURE.md, "Extension points", for adding a method.
"""

from fusemerge.merge.methods import (  # noqa: F401  (each registers its methods on import)
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
from fusemerge.merge.methods.registry import METHODS, MergeMethod, merge_method


def get_method(name: str) -> MergeMethod:
    """The method registered as `name` (or an alias); an unknown name is a user mistake (key merge_method)."""
    return METHODS.get(name)


def all_methods() -> list[MergeMethod]:
    """Every built-in (and registered) merge method, sorted by name."""
    return METHODS.methods()


__all__ = ["MergeMethod", "all_methods", "get_method", "merge_method"]
