"""Linear and task arithmetic stream each tensor through small cached chunks (merge/elementwise.py).

The streamed output must be bit-equal to the whole-tensor engine's, for bf16 and float32 models, with
tensors cut into many chunks (the last one short), and a NaN must still be refused naming its tensor.
"""

from __future__ import annotations

import filecmp

import pytest
from safetensors.torch import load_file, save_file

from fusemerge.errors import FusemergeError
from fusemerge.merge import elementwise
from fusemerge.merge.api import run_merge

RECIPES = {
    "linear": "merge_method: linear\nmodels:\n  - model: {base}\n    parameters: {{weight: 0.4}}\n"
    "  - model: {ft1}\n    parameters: {{weight: 0.3}}\n  - model: {ft2}\n    parameters: {{weight: 0.3}}\n",
    "linear_raw": "merge_method: linear\nmodels:\n  - model: {ft1}\n    parameters: {{weight: 0.7}}\n"
    "  - model: {ft2}\n    parameters: {{weight: 0.6}}\nparameters: {{normalize: false}}\n",
    "task_arithmetic": "merge_method: task_arithmetic\nbase_model: {base}\nmodels:\n"
    "  - model: {ft1}\n    parameters: {{weight: [0.2, 0.9]}}\n  - model: {ft2}\n    parameters: {{weight: 0.5}}\n"
    "parameters: {{normalize: true, lambda: 0.8}}\n",
}


def _run(recipe, out, *, streamed: bool, monkeypatch) -> list[str]:
    """Merge `recipe` into `out`; returns the names of the tensors that went through the stream."""
    seen: list[str] = []
    real = elementwise._merge_task

    def spy(plan, writer, task, *args):
        seen.append(task.name)
        return real(plan, writer, task, *args)

    with monkeypatch.context() as m:
        m.setattr(elementwise, "_merge_task", spy)
        m.setattr(elementwise, "CHUNK_ELEMENTS", 1000)  # many chunks per tensor, a short last one
        if not streamed:
            m.setattr(elementwise, "streamable", lambda *a: False)
        run_merge(recipe, out, progress=False, echo=lambda _: None, out_shard_size=200_000)
    return seen


@pytest.mark.parametrize("family", ["mistral_bf16", "llama_fp32"])
@pytest.mark.parametrize("method", list(RECIPES))
def test_streamed_output_is_bit_equal_to_the_whole_tensor_engine(
    family, method, request, tmp_path, write_recipe, monkeypatch
):
    models = request.getfixturevalue(family)
    recipe = write_recipe(RECIPES[method].format(**{k: str(v) for k, v in models.items()}))
    streamed = _run(recipe, tmp_path / "streamed", streamed=True, monkeypatch=monkeypatch)
    assert _run(recipe, tmp_path / "whole", streamed=False, monkeypatch=monkeypatch) == []
    shards = sorted((tmp_path / "whole").glob("*.safetensors"))
    assert len(shards) > 1 and len(streamed) == len(load_file(shards[0])) + sum(
        len(load_file(s)) for s in shards[1:]
    )
    for shard in shards:
        assert filecmp.cmp(shard, tmp_path / "streamed" / shard.name, shallow=False), shard.name
    index = (tmp_path / "streamed" / "model.safetensors.index.json").read_text()
    assert index == (tmp_path / "whole" / "model.safetensors.index.json").read_text()


def test_a_recipe_dtype_change_keeps_the_whole_tensor_engine(
    mistral_bf16, tmp_path, write_recipe, monkeypatch
):
    text = RECIPES["linear"].format(**{k: str(v) for k, v in mistral_bf16.items()}) + "dtype: float32\n"
    assert _run(write_recipe(text), tmp_path / "out", streamed=True, monkeypatch=monkeypatch) == []


def test_a_nan_in_a_late_chunk_is_refused_naming_the_tensor(
    mistral_bf16, tmp_path, write_recipe, monkeypatch
):
    import shutil

    hostile = tmp_path / "hostile"
    shutil.copytree(mistral_bf16["ft2"], hostile)
    (shard,) = hostile.glob("*.safetensors")
    tensors = load_file(shard)
    name = "model.layers.1.mlp.down_proj.weight"
    tensors[name].view(-1)[-1] = float("nan")
    save_file(tensors, shard, metadata={"format": "pt"})
    refs = {**{k: str(v) for k, v in mistral_bf16.items()}, "ft2": str(hostile)}
    with pytest.raises(FusemergeError, match="NaN or Inf") as info:
        _run(
            write_recipe(RECIPES["linear"].format(**refs)),
            tmp_path / "out",
            streamed=True,
            monkeypatch=monkeypatch,
        )
    assert info.value.tensor == name and str(hostile) in str(info.value.file)
    assert not list((tmp_path / "out").glob("model-*.safetensors"))


def test_a_streamed_merge_never_imports_torch(mistral_bf16, tmp_path, write_recipe):
    """Importing torch costs ~1.4 CPU-s, more than the I/O floor of a small merge: the elementwise stream
    needs none of it (merge/lazy_torch.py). Run in a fresh interpreter, as the CLI is."""
    import subprocess
    import sys

    recipe = write_recipe(RECIPES["task_arithmetic"].format(**{k: str(v) for k, v in mistral_bf16.items()}))
    code = (
        "import sys\nfrom fusemerge.merge.api import run_merge\n"
        f"run_merge({str(recipe)!r}, {str(tmp_path / 'out')!r}, progress=False, echo=lambda _: None)\n"
        "print('torch' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip().splitlines()[-1] == "False", done.stderr
    assert (tmp_path / "out" / "model.safetensors.index.json").is_file()
