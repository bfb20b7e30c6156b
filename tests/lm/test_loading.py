"""Loading under one policy: a folder without tokenizer files is refused up front; pickle hints name the option."""

from __future__ import annotations

import json

import pytest

from fusemerge.errors import FusemergeError
from fusemerge.lm.loading import check_weights, load_tokenizer
from fusemerge.offline.assets import build_random_model


def test_a_folder_without_tokenizer_files_is_refused_not_loaded_empty(tmp_path, qwen_tokenizer):
    folder = build_random_model(tmp_path / "m", vocab_size=len(qwen_tokenizer), hidden_size=16,
                                intermediate_size=32, num_layers=1)  # fmt: skip
    with pytest.raises(FusemergeError, match="no tokenizer files in this model folder") as info:
        load_tokenizer(str(folder))
    assert info.value.file == str(folder)
    qwen_tokenizer.save_pretrained(folder)
    assert load_tokenizer(str(folder))("hello")["input_ids"]


def test_a_tokenizer_that_encodes_nothing_is_refused(tmp_path):
    from fusemerge.offline.assets import load_shipped_tokenizer

    folder = tmp_path / "m"
    load_shipped_tokenizer("qwen3-1k").save_pretrained(folder)
    spec = json.loads((folder / "tokenizer.json").read_text())
    spec["model"].update(vocab={}, merges=[])  # a tokenizer.json whose vocabulary was lost
    (folder / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(FusemergeError, match="the tokenizer is empty"):
        load_tokenizer(str(folder))


def test_pickle_only_weights_name_the_callers_option(tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(FusemergeError, match="pass --allow-pickle if you trust them"):
        check_weights(str(tmp_path), allow_pickle=False, option="pass --allow-pickle")
    with pytest.raises(FusemergeError, match="set allow_pickle: true"):
        check_weights(str(tmp_path), allow_pickle=False)
