"""The merged folder is a complete, loadable Hugging Face model."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from fusemerge.merge.api import run_merge


@pytest.mark.parametrize("family", ["llama_fp32", "mistral_bf16"])
def test_merged_model_loads_and_gives_finite_logits(family, request, tmp_path, write_recipe):
    models = request.getfixturevalue(family)
    text = (
        f"merge_method: variation_ratio\nbase_model: {models['base']}\nmodels:\n"
        f"  - model: {models['ft1']}\n  - model: {models['ft2']}\n"
    )
    out = run_merge(
        write_recipe(text), tmp_path / "merged", progress=False, out_shard_size=2_000_000, echo=lambda _: None
    )
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    ids = tokenizer("Merging models is fun.", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape[-1] == model.config.vocab_size
    assert torch.isfinite(logits).all()


def test_help_imports_no_heavy_library():
    """`fusemerge --help` stays instant because torch, transformers and mergekit load only when needed."""
    probe = (
        "import sys, fusemerge.cli\n"
        "from click.testing import CliRunner\n"
        "r = CliRunner().invoke(fusemerge.cli.main, ['merge', '--help'])\n"
        "assert r.exit_code == 0 and 'merge_method: variation_ratio' in r.output, r.output\n"
        "heavy = sorted(m for m in ('torch', 'transformers', 'mergekit', 'safetensors') if m in sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    version = subprocess.run(
        [sys.executable, "-m", "fusemerge.cli", "--version"], capture_output=True, text=True
    )
    assert version.returncode == 0 and "fusemerge" in version.stdout
