"""The dtype a trained target is saved in (`training.save_dtype`): chosen so that the save keeps the training.

    from fusemerge.fuse.save_dtype import choose_save_dtype
    choice = choose_save_dtype("auto", pivot="org/pivot", pivot_dtype=torch.bfloat16, trained=state_dict)
    model.to(choice.dtype); echo(choice.line)

Training updates float32 master weights. A pivot published in bfloat16 stores each weight to about 3
significant digits; a fine-tune's step is often smaller than half that spacing, so rounding the trained
weights back to the pivot's dtype returns most of them to the pivot's own values. SmolLM2-135M-Instruct
(bf16) fully fine-tuned in float32 for 20 steps at 1e-5 (`bench/save_dtype_bench.py`): the bfloat16 save
kept 6.4% of the weights changed, its rounding error was 95% of the update's norm, and held-out bits per
byte went from 0.8919 (float32) back to 0.9331 (the pivot: 0.9447). A user's longer run (issue 19): 31%
changed, 74% of the update erased, 1.9% of bits per byte lost.

`auto` (the default) measures this before saving: the rounding error as a share of the update's norm,
||round(W) - W|| / ||W - P|| over every floating-point tensor the trained model W shares with the pivot P
(read tensor by tensor from the pivot's safetensors files). The pivot's dtype is kept when that share is at
most `ROUNDING_TOLERANCE` (1%, so the saved target is within 1% of the training), float32 otherwise, and
float32 when it cannot be measured. `pivot` always saves in the pivot's dtype (what fusemerge did before);
`float32`, `bfloat16` and `float16` save in that dtype. A float32 target takes twice the disk of a bfloat16
one; the merge stage reads any mix of dtypes (VaRM computes in float32).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

ROUNDING_TOLERANCE = 0.01  # auto keeps the pivot's dtype only when rounding moves the update by at most this
SAVE_DTYPES = ("auto", "pivot", "float32", "bfloat16", "float16")


@dataclass(frozen=True)
class SaveChoice:
    """The dtype to save in, the one line that says why, and the rounding share (None: not measured)."""

    dtype: torch.dtype
    line: str
    rounded_share: float | None = None


def choose_save_dtype(
    setting: str,
    *,
    pivot: str,
    pivot_dtype: torch.dtype,
    trained: Mapping[str, torch.Tensor],
) -> SaveChoice:
    """The dtype of the saved target for `training.save_dtype` = `setting` (see the module docstring).

    Args:
        setting: one of SAVE_DTYPES.
        pivot: the pivot's folder or Hub id (its safetensors files give P).
        pivot_dtype: the dtype the pivot is published in.
        trained: the trained model's state dict (float32).
    """
    wanted = pivot_dtype if setting in ("auto", "pivot") else getattr(torch, setting)
    if wanted == torch.float32:
        why = "the pivot's dtype" if setting != "float32" else "as the recipe says"
        return SaveChoice(torch.float32, f"saved in float32, {why} (save_dtype {setting})")
    share = rounding_share(trained, pivot_weight_files(pivot), wanted)
    name = _name(wanted)
    if share is None:
        if setting == "auto":
            return SaveChoice(
                torch.float32,
                f"saved in float32 (save_dtype auto): the pivot's safetensors could not be read to measure "
                f"what rounding to {name} would erase",
            )
        return SaveChoice(wanted, f"saved in {name} (save_dtype {setting})")
    if setting == "auto" and share > ROUNDING_TOLERANCE:
        return SaveChoice(
            torch.float32,
            f"saved in float32 (save_dtype auto): rounding to the pivot's {name} would erase {share:.1%} of "
            f"the update's norm, more than the {ROUNDING_TOLERANCE:.0%} auto allows",
            share,
        )
    if setting == "auto":
        return SaveChoice(
            wanted,
            f"saved in {name}, the pivot's dtype (save_dtype auto): rounding moves the trained weights by "
            f"{share:.1%} of the update's norm, within the {ROUNDING_TOLERANCE:.0%} auto allows",
            share,
        )
    hint = "; save_dtype auto would keep float32" if share > ROUNDING_TOLERANCE else ""
    return SaveChoice(
        wanted,
        f"saved in {name} (save_dtype {setting}): the rounding erased {share:.1%} of the update's norm{hint}",
        share,
    )


def rounding_share(
    trained: Mapping[str, torch.Tensor], files: list[Path], dtype: torch.dtype
) -> float | None:
    """||round(W) - W|| / ||W - P|| over the floating-point tensors W shares with the pivot's `files`.

    None when under 90% of the trained floating-point weights have a pivot tensor of the same name and shape
    (another layout: the share would not describe the model).
    """
    from safetensors import safe_open

    floats = {t.data_ptr(): t.numel() for t in trained.values() if t.is_floating_point()}  # tied: once
    total = sum(floats.values())
    seen: set[int] = set()
    matched, update_sq, error_sq = 0, 0.0, 0.0
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            for name in handle.keys():  # noqa: SIM118 (safe_open is no dict)
                w = trained.get(name)
                if w is None or not w.is_floating_point() or w.data_ptr() in seen:
                    continue
                p = handle.get_tensor(name)
                if p.shape != w.shape:
                    continue
                w32 = w.detach().to("cpu", torch.float32)
                update_sq += float(((w32 - p.float()) ** 2).sum())
                error_sq += float(((w32.to(dtype).float() - w32) ** 2).sum())
                matched += w.numel()
                seen.add(w.data_ptr())
    if not total or matched < 0.9 * total:
        return None
    if update_sq == 0.0:
        return 0.0 if error_sq == 0.0 else float("inf")
    return (error_sq / update_sq) ** 0.5


def pivot_weight_files(pivot: str) -> list[Path]:
    """The pivot's safetensors files: its folder's, or those of its Hub snapshot in the local cache."""
    folder = Path(pivot)
    if not folder.is_dir():
        try:
            from huggingface_hub import snapshot_download

            folder = Path(snapshot_download(pivot, allow_patterns=["*.safetensors"], local_files_only=True))
        except Exception:  # not cached, offline, not a repo id: not measurable
            return []
    return sorted(folder.glob("*.safetensors"))


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
