"""Built-in merge methods; importing this package registers them all (see `registry`)."""

from fusemerge.merge.methods import linear, slerp, task_arithmetic, variation_ratio  # noqa: F401
from fusemerge.merge.methods.registry import MergeMethod, all_methods, get_method, merge_method

__all__ = ["MergeMethod", "all_methods", "get_method", "merge_method"]
