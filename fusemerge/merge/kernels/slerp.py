"""Numba kernels for SLERP's three passes over its two inputs (norms, dot product, interpolation).

Written in torch, each pass converted every bf16 element to a fresh float32 tensor and made one more
full-size temporary per operation (`x / norm`, `y / norm`, their product, `coef * x`, ...): at 337M
parameters 28.7 s of 67 s went to the conversions alone. Here bf16 is read in place (see `cpu.as_f32`),
each elementwise step runs in one loop, and the result is written straight in the output dtype.

The reductions are not reimplemented: SLERP must equal mergekit to the bit, and near-collinear tensors
make acos amplify any difference in the dot product, so the chunk norms and the chunk sums stay torch's
own `vector_norm` and `sum`, run over a float32 buffer holding exactly the values torch would have
reduced (same IEEE float32 operations in the same order: widening is exact, `/` is a true division,
and numba does not contract `a * b + c` into a fused multiply-add without fastmath).
"""

from __future__ import annotations

from numba import njit

from fusemerge.merge.kernels.cpu import as_f32, store


@njit(cache=True)
def widen(x, out):  # pragma: no cover - compiled
    """out = x as float32 (the values `x.to(torch.float32)` holds), for torch's norm of the chunk."""
    for i in range(x.size):
        out[i] = as_f32(x[i])


@njit(cache=True, error_model="numpy")
def normalized_product(a, b, norm_a, norm_b, out):  # pragma: no cover - compiled
    """out = (a / norm_a) * (b / norm_b) in float32: the terms of mergekit's chunk dot product.

    error_model="numpy": no zero-divisor check in the loop (the norms are never 0: the caller maps
    norms <= eps to 1), so LLVM vectorises it."""
    for i in range(out.size):
        out[i] = (as_f32(a[i]) / norm_a) * (as_f32(b[i]) / norm_b)


@njit(cache=True)
def interpolate(a, b, coef_a, coef_b, out):  # pragma: no cover - compiled
    """out = coef_a * a + coef_b * b in float32, stored in out's dtype (float32, or bf16 bits rounded
    to nearest even as the engine's cast would)."""
    for i in range(out.size):
        store(out, i, coef_a * as_f32(a[i]) + coef_b * as_f32(b[i]))
