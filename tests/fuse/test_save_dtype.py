"""`training.save_dtype`: the rule that picks the saved target's dtype, on synthetic weights (no training)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from fusemerge.fuse.save_dtype import ROUNDING_TOLERANCE, choose_save_dtype, rounding_share


@pytest.fixture
def pivot(tmp_path):
    """A bfloat16 'pivot' folder: two matrices and a tied head that is absent from the file."""
    gen = torch.Generator().manual_seed(0)
    weights = {
        "a.weight": (torch.randn(64, 64, generator=gen) * 0.05).to(torch.bfloat16),
        "b.weight": (torch.randn(32, 64, generator=gen) * 0.05).to(torch.bfloat16),
    }
    save_file(weights, str(tmp_path / "model.safetensors"))
    return tmp_path, weights


def trained(weights, scale, seed=1):
    gen = torch.Generator().manual_seed(seed)
    out = {k: v.float() + torch.randn(v.shape, generator=gen) * scale for k, v in weights.items()}
    out["head.weight"] = out["a.weight"]  # tied: the same storage, counted once
    return out


def test_a_small_update_is_saved_in_float32_and_the_line_says_how_much_rounding_would_erase(pivot):
    folder, weights = pivot
    state = trained(weights, 1e-5)
    share = rounding_share(state, [folder / "model.safetensors"], torch.bfloat16)
    assert share is not None and share > 0.5  # most of a 1e-5 step is below bfloat16's spacing
    choice = choose_save_dtype("auto", pivot=str(folder), pivot_dtype=torch.bfloat16, trained=state)
    assert choice.dtype == torch.float32 and choice.rounded_share == pytest.approx(share)
    assert "float32" in choice.line and "bfloat16" in choice.line and f"{share:.1%}" in choice.line


def test_a_large_update_keeps_the_pivots_dtype(pivot):
    folder, weights = pivot
    state = trained(weights, 0.5)
    choice = choose_save_dtype("auto", pivot=str(folder), pivot_dtype=torch.bfloat16, trained=state)
    assert choice.dtype == torch.bfloat16 and choice.rounded_share <= ROUNDING_TOLERANCE, choice


def test_explicit_settings_and_a_float32_pivot(pivot):
    folder, weights = pivot
    state = trained(weights, 1e-5)
    for setting, want in (
        ("pivot", torch.bfloat16),
        ("bfloat16", torch.bfloat16),
        ("float16", torch.float16),
    ):
        choice = choose_save_dtype(setting, pivot=str(folder), pivot_dtype=torch.bfloat16, trained=state)
        assert choice.dtype == want and "%" in choice.line, choice  # the loss is still said
    assert (
        "auto would keep float32"
        in choose_save_dtype("pivot", pivot=str(folder), pivot_dtype=torch.bfloat16, trained=state).line
    )
    for setting in ("auto", "pivot", "float32"):
        choice = choose_save_dtype(setting, pivot=str(folder), pivot_dtype=torch.float32, trained=state)
        assert choice.dtype == torch.float32 and choice.rounded_share is None


def test_an_unreadable_pivot_is_saved_in_float32(tmp_path, pivot):
    _, weights = pivot
    state = trained(weights, 1e-5)
    empty = tmp_path / "no-safetensors"
    empty.mkdir()
    choice = choose_save_dtype("auto", pivot=str(empty), pivot_dtype=torch.bfloat16, trained=state)
    assert choice.dtype == torch.float32 and choice.rounded_share is None
    assert "could not" in choice.line
