"""The checks that merge and fuse share below them: the NaN/Inf scan of weights, the content fingerprint
of a model folder, and which temporary siblings are orphans of dead writers."""

from __future__ import annotations

import os
import subprocess

import pytest
import torch
from safetensors.torch import load_file, save_file

from fusemerge.checkpoint import fingerprint
from fusemerge.checkpoint.fingerprint import weights_fingerprint
from fusemerge.checkpoint.finite import all_finite, check_finite_model, first_nonfinite
from fusemerge.checkpoint.layout import TMP_MARK, orphan_tmp_siblings
from fusemerge.errors import FusemergeError

FLOATS = [torch.bfloat16, torch.float16, torch.float32, torch.float64]


@pytest.mark.parametrize("dtype", FLOATS)
def test_every_nan_and_inf_is_found_and_extremes_are_not(dtype):
    info = torch.finfo(dtype)
    tensor = torch.randn(4097, dtype=torch.float32).to(dtype)
    tensor[:4] = torch.tensor([info.max, -info.max, info.tiny, info.smallest_normal / 2], dtype=dtype)
    assert all_finite(tensor)
    for bad in (float("nan"), float("inf"), float("-inf")):
        for where in (0, 2048, 4096):
            hostile = tensor.clone()
            hostile[where] = bad
            assert not all_finite(hostile), (dtype, bad, where)
            assert not all_finite(hostile.reshape(17, 241).t())  # not contiguous: scanned as a copy
    assert all_finite(torch.arange(10)) and all_finite(torch.zeros(0, dtype=dtype))


def test_the_scan_returns_the_first_bad_index():
    """The scan is a vectorised max over the exponent bits, then a search: the index is still the first."""
    from fusemerge.checkpoint.finite import _bits_view, first_nonfinite_bits

    for dtype in (torch.bfloat16, torch.float16, torch.float32, torch.float64):
        tensor = torch.randn(5000).to(dtype)
        bits, mask = _bits_view(tensor)
        assert first_nonfinite_bits(bits, mask) == -1
        tensor[4999], tensor[1234] = float("nan"), float("-inf")
        bits, mask = _bits_view(tensor)
        assert first_nonfinite_bits(bits, mask) == 1234, dtype


def test_the_first_bad_tensor_is_named_and_a_model_is_refused():
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.LayerNorm(3))
    assert first_nonfinite(model.named_parameters()) is None
    check_finite_model(model, what="the pivot", file="some/folder")
    with torch.no_grad():
        model[1].bias[2] = float("inf")
    with pytest.raises(FusemergeError) as err:
        check_finite_model(model, what="the pivot", file="some/folder")
    assert err.value.tensor == "1.bias" and err.value.file == "some/folder"
    assert "the pivot holds NaN or Inf weights" in err.value.one_line()


def _model(folder, seed=0, shape=(64, 128)):
    folder.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    tensors = {"a.weight": torch.randn(shape, generator=gen), "b.weight": torch.randn(7, generator=gen)}
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


@pytest.mark.parametrize("sampled", [False, True])
def test_fingerprint_follows_content_not_names_sizes_or_times(sampled, tmp_path, monkeypatch):
    if sampled:  # every file above the whole-file limit: the header and samples of each tensor decide
        monkeypatch.setattr(fingerprint, "WHOLE_FILE_BYTES", 0)
    model = _model(tmp_path / "m")
    first = weights_fingerprint(model)
    os.utime(model / "model.safetensors", (1, 1))
    assert weights_fingerprint(model) == first  # touched or copied: the same weights
    _model(tmp_path / "m", seed=1)  # overwritten in place: same names, shapes and size
    assert (model / "model.safetensors").stat().st_size == (
        _model(tmp_path / "n") / "model.safetensors"
    ).stat().st_size
    assert weights_fingerprint(model) != first


def test_a_sampled_fingerprint_sees_a_tensor_changed_in_its_middle(tmp_path, monkeypatch):
    monkeypatch.setattr(fingerprint, "WHOLE_FILE_BYTES", 0)
    model = _model(tmp_path / "m", shape=(512, 512))
    first = weights_fingerprint(model)
    tensors = load_file(model / "model.safetensors")
    tensors["a.weight"][256, 0] += 1.0  # the first element past the middle: inside the middle sample
    save_file(tensors, model / "model.safetensors", metadata={"format": "pt"})
    assert weights_fingerprint(model) != first
    (model / "pytorch_model.bin").write_bytes(b"\0" * 10_000)  # pickle files are sampled too
    with_pickle = weights_fingerprint(model)
    (model / "pytorch_model.bin").write_bytes(b"\0" * 5_000 + b"\1" + b"\0" * 4_999)
    assert weights_fingerprint(model) != with_pickle


def test_only_the_temporary_siblings_of_dead_writers_are_orphans(tmp_path):
    dead = subprocess.Popen(["true"])
    dead.wait()
    orphan = tmp_path / f"target{TMP_MARK}{dead.pid}"
    live = tmp_path / f"target{TMP_MARK}{os.getppid()}"
    mine = tmp_path / f"other{TMP_MARK}{os.getpid()}"
    odd = tmp_path / f"target{TMP_MARK}abc"
    for path in (orphan, live, mine, odd):
        path.mkdir()
    assert orphan_tmp_siblings(tmp_path) == [orphan]
    assert orphan_tmp_siblings(tmp_path / "missing") == []
