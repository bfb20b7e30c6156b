"""Corrupt or hostile inputs: one clear line, exit code 2, and nothing under a final output name."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.faults.conftest import (
    assert_nothing_final,
    assert_one_line_exit_2,
    copy_model,
    linear_recipe,
    rewrite_header,
    run_merge_cli,
    shard_in_two,
)


def _truncated(model):
    path = model / "model.safetensors"
    os.truncate(path, path.stat().st_size - 100)
    return "truncated"


def _invalid_header_json(model):
    path = model / "model.safetensors"
    raw = bytearray(path.read_bytes())
    raw[8:20] = b"{not json!!!"
    path.write_bytes(bytes(raw))
    return "invalid JSON"


def _header_longer_than_file(model):
    path = model / "model.safetensors"
    raw = bytearray(path.read_bytes())
    raw[:8] = (len(raw) * 2).to_bytes(8, "little")
    path.write_bytes(bytes(raw))
    return "header bytes"


def _overlapping_ranges(model):
    def change(header):
        names = sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])
        a, b = header[names[0]], header[names[1]]
        size_b = b["data_offsets"][1] - b["data_offsets"][0]
        start = a["data_offsets"][1] - 4
        b["data_offsets"] = [start, start + size_b]

    rewrite_header(model / "model.safetensors", change)
    return "overlap"


def _range_past_end(model):
    def change(header):
        last = max((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][1])
        begin, end = header[last]["data_offsets"]
        header[last]["data_offsets"] = [begin + 64, end + 64]

    rewrite_header(model / "model.safetensors", change)
    return "truncated file"


def _index_names_missing_shard(model):
    _, second = shard_in_two(model)
    second.unlink()
    return "missing"


def _tensor_in_two_shards(model):
    first, second = shard_in_two(model)
    extra = load_file(second)
    extra.update(load_file(first))
    save_file(extra, second, metadata={"format": "pt"})
    return "stored twice"


def _integer_where_float_expected(model):
    tensors = load_file(model / "model.safetensors")
    tensors["model.norm.weight"] = tensors["model.norm.weight"].to(torch.int32)
    save_file(tensors, model / "model.safetensors", metadata={"format": "pt"})
    return "cannot merge a F32 tensor"


def _config_not_json(model):
    (model / "config.json").write_text("{'this': is not json")
    return "not valid JSON"


HOSTILE = {
    "truncated shard": _truncated,
    "header JSON invalid": _invalid_header_json,
    "header length beyond file": _header_longer_than_file,
    "overlapping byte ranges": _overlapping_ranges,
    "byte range past the end": _range_past_end,
    "index names a missing shard": _index_names_missing_shard,
    "tensor in two shards": _tensor_in_two_shards,
    "dtype the method cannot handle": _integer_where_float_expected,
    "config.json not JSON": _config_not_json,
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_input_is_refused_cleanly(case, small_family, tmp_path):
    hostile = copy_model(small_family["ft2"], tmp_path / "hostile")
    expected = HOSTILE[case](hostile)
    out = tmp_path / "out"
    line = assert_one_line_exit_2(run_merge_cli(linear_recipe(tmp_path, small_family["ft1"], hostile), out))
    assert expected in line
    assert str(hostile) in line
    assert_nothing_final(out)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_input_names_tensor_and_model(bad, small_family, tmp_path):
    hostile = copy_model(small_family["ft2"], tmp_path / "hostile")
    tensors = load_file(hostile / "model.safetensors")
    tensors["model.layers.1.mlp.down_proj.weight"][3, 5] = bad
    save_file(tensors, hostile / "model.safetensors", metadata={"format": "pt"})
    recipe = linear_recipe(tmp_path, small_family["ft1"], hostile)
    out = tmp_path / "out"
    line = assert_one_line_exit_2(run_merge_cli(recipe, out, "--out-shard-size", "100KB"))
    assert (
        "model.layers.1.mlp.down_proj.weight" in line and str(hostile) in line and "--allow-nonfinite" in line
    )
    assert_nothing_final(out)

    allowed = run_merge_cli(recipe, out, "--out-shard-size", "100KB", "--allow-nonfinite")
    assert allowed.exit_code == 0, allowed.output
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert "model.layers.1.mlp.down_proj.weight" in index["weight_map"]
