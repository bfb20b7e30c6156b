"""mergekit 0.1.5 as the oracle: run its `run_merge` on the same recipe and load both outputs."""

from __future__ import annotations

from pathlib import Path

import torch
import yaml
from safetensors import safe_open


def run_mergekit(recipe_text: str, out: Path, *, seed: int | None = None) -> Path:
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    config = MergeConfiguration.model_validate(yaml.safe_load(recipe_text))
    options = MergeOptions(
        quiet=True,
        random_seed=seed,
        write_model_card=False,
        lora_merge_cache=str(out.parent / "mergekit-lora"),
    )
    run_merge(config, str(out), options=options)
    return out


def merge_both(
    recipe_template: str, family: dict, dtype: str, tmp_path: Path, write_recipe, *, seed: int = 0
):
    """Run fusemerge and mergekit on the same recipe (model paths and dtype filled in); load both outputs."""
    from fusemerge.merge.api import run_merge

    text = recipe_template.format(dtype=dtype, **{k: str(v) for k, v in family.items()})
    recipe = write_recipe(text)
    # The streaming engine by name: under "auto" a routing change could send both runs through mergekit.
    ours = load_folder(
        run_merge(recipe, tmp_path / "ours", progress=False, echo=lambda _: None, engine="streaming")
    )
    theirs = load_folder(run_mergekit(text, tmp_path / "mergekit", seed=seed))
    assert set(ours) == set(theirs)
    return ours, theirs


def load_folder(folder: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(file, framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                tensors[name] = f.get_tensor(name)
    return tensors


def bf16_steps(ours: torch.Tensor, theirs: torch.Tensor, base: torch.Tensor | None = None) -> torch.Tensor:
    """|ours - theirs| in bf16 steps (spacing of bf16 numbers) at the scale of the larger operand.

    The scale includes the base tensor where given: when base + delta nearly cancels, the rounding of
    the bf16 operands, not of the tiny result, bounds what either implementation can get right.
    """
    a, b = ours.float(), theirs.float()
    scale = torch.maximum(a.abs(), b.abs())
    if base is not None:
        scale = torch.maximum(scale, base.float().abs())
    _, exponent = torch.frexp(scale)
    spacing = torch.ldexp(torch.ones_like(scale), exponent - 8)  # 8 significant bits in bf16
    return (a - b).abs() / spacing


def beyond_one_step(
    ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor], base: dict[str, torch.Tensor]
) -> dict[str, tuple[int, int]]:
    """Per tensor: (elements more than one bf16 step apart, elements), in `bf16_steps`' units.

    Counted per tensor because a pooled fraction is dominated by the largest tensors: in the test
    families the embedding and lm_head (32,000 x 64) hold 98% of the elements, so a pooled bound of a few
    percent would pass with every layer element wrong.
    """
    counts = {}
    for name, expected in theirs.items():
        steps = bf16_steps(ours[name], expected.to(torch.bfloat16), base[name])
        counts[name] = (int((steps > 1).sum()), steps.numel())
    return counts


def worst_tensor(counts: dict[str, tuple[int, int]]) -> tuple[str, float]:
    """The tensor with the largest fraction of elements beyond one bf16 step, and that fraction."""
    name = max(counts, key=lambda n: counts[n][0] / counts[n][1])
    return name, counts[name][0] / counts[name][1]
