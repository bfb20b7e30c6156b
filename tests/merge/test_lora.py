"""`model+lora` references: a peft adapter folded in tensor by tensor equals peft's merge_and_unload."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fusemerge.errors import FusemergeError
from fusemerge.merge.api import run_merge
from tests.merge.oracle import load_folder, run_mergekit


def _adapter(base: Path, out: Path, *, targets, alpha: int = 8, rslora: bool = False, seed: int = 0) -> Path:
    """A peft LoRA adapter with random (nonzero) A and B, saved the way peft saves it."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base)
    config = LoraConfig(r=4, lora_alpha=alpha, target_modules=targets, lora_dropout=0.0, use_rslora=rslora)
    peft_model = get_peft_model(model, config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.05)
    peft_model.save_pretrained(out)
    return out


def _peft_merged(base: Path, adapter: Path) -> dict[str, torch.Tensor]:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter)
    return {k: v.detach() for k, v in model.merge_and_unload().state_dict().items()}


@pytest.fixture(scope="module")
def adapters(llama_fp32, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    base = llama_fp32["base"]
    return {
        "attn": _adapter(base, root / "attn", targets=["q_proj", "v_proj", "o_proj"]),
        "mlp_embed": _adapter(
            base, root / "mlp_embed", targets=["down_proj", "embed_tokens"], alpha=16, rslora=True, seed=1
        ),
    }


@pytest.mark.parametrize("which", ["attn", "mlp_embed"])
def test_folded_adapter_equals_peft_merge(which, llama_fp32, adapters, tmp_path, write_recipe):
    base, adapter = llama_fp32["base"], adapters[which]
    recipe = write_recipe(
        f"merge_method: passthrough\nmodels:\n  - model: {base}+{adapter}\ndtype: float32\n"
    )
    ours = load_folder(run_merge(recipe, tmp_path / "out", progress=False, echo=lambda _: None))
    expected = _peft_merged(base, adapter)
    original = load_folder(base)
    changed = set()
    for name, tensor in ours.items():
        torch.testing.assert_close(tensor, expected[name], rtol=1e-6, atol=1e-7, msg=name)
        if not torch.equal(tensor, original[name]):
            changed.add(name.split(".")[-2])
    # The adapter really moved every module it targets (and only those).
    assert (
        changed == {"attn": {"q_proj", "v_proj", "o_proj"}, "mlp_embed": {"down_proj", "embed_tokens"}}[which]
    )


def test_lora_input_in_a_merge_equals_mergekit(llama_fp32, adapters, tmp_path, write_recipe):
    text = f"""
merge_method: task_arithmetic
base_model: {llama_fp32["base"]}
models:
  - model: {llama_fp32["ft1"]}
    parameters: {{weight: 0.5}}
  - model: {llama_fp32["base"]}+{adapters["attn"]}
    parameters: {{weight: [0.2, 1.0]}}
dtype: float32
"""
    ours = load_folder(
        run_merge(
            write_recipe(text), tmp_path / "ours", progress=False, echo=lambda _: None, engine="streaming"
        )
    )
    theirs = load_folder(run_mergekit(text, tmp_path / "mergekit"))
    for name, expected in theirs.items():
        torch.testing.assert_close(ours[name], expected, rtol=2e-6, atol=2e-7, msg=name)


def test_bad_adapters_are_refused_before_any_tensor_is_read(llama_fp32, adapters, tmp_path, write_recipe):
    base = llama_fp32["base"]
    broken = tmp_path / "broken"
    broken.mkdir()
    for item in adapters["attn"].iterdir():
        (broken / item.name).write_bytes(item.read_bytes())
    config = json.loads((broken / "adapter_config.json").read_text())
    (broken / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    recipe = write_recipe(f"merge_method: passthrough\nmodels:\n  - model: {base}+{broken}\n")
    with pytest.raises(FusemergeError, match="DoRA"):
        run_merge(recipe, tmp_path / "out", echo=lambda _: None)

    other = write_recipe(
        f"merge_method: passthrough\nmodels:\n  - model: {llama_fp32['ft1']}+{tmp_path}\n", "o.yml"
    )
    with pytest.raises(FusemergeError, match="not a peft adapter folder"):
        run_merge(other, tmp_path / "out", echo=lambda _: None)
    assert not (tmp_path / "out").exists()
