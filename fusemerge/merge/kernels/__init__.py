"""Kernel plumbing under the merge methods: bounded chunks, numba CPU loops, array views, the NaN/Inf scan.

Nothing here knows a merge method; methods (`fusemerge.merge.methods`), sparsification
(`fusemerge.merge.sparsify`) and the engine's read check stand on it (see ARCHITECTURE.md, "Layers").
"""
