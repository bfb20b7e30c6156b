"""`fusemerge eval` flags a model whose `<unk>` tokens cover the text: its bits per byte ranks it first
for the wrong reason (a random 3-word model scored 0.40 bits/byte against a real tokenizer's 4.24)."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from fusemerge.cli import main
from fusemerge.evaluate import EvalReport, evaluate_models
from tests.faults.fuse_fixtures import build_fuse_models


@pytest.fixture(scope="module")
def fuse_models(tmp_path_factory):
    return build_fuse_models(tmp_path_factory.mktemp("fuse-models"))


def test_an_unk_heavy_model_is_marked_not_comparable(fuse_models):
    pivot, unk = str(fuse_models["pivot"]), str(fuse_models["unk"])
    report = evaluate_models([pivot, unk], [fuse_models["data"]], device="cpu", progress=False)
    assert report.score(unk).bits_per_byte < report.score(pivot).bits_per_byte  # the trap
    assert report.score(unk).unknown_share > 0.5 and report.score(pivot).unknown_share == 0.0
    assert report.not_comparable == [unk]
    table = report.table()
    row = next(line for line in table.splitlines() if line.startswith("chat"))
    assert row.count("!") == 1 and row.split()[1][-1] != "!" and row.split()[4].endswith("!"), row
    note = table.splitlines()[-1]
    assert note.startswith("! unk: ") and "not comparable" in note and "do not rank it" in note
    again = EvalReport.from_json(report.to_json())
    assert again.not_comparable == [unk] and again.score(unk).unknown_bytes == report.score(unk).unknown_bytes


def test_the_json_lists_models_that_are_not_comparable(fuse_models):
    args = ["eval", str(fuse_models["pivot"]), str(fuse_models["unk"]), "--data", str(fuse_models["data"])]
    result = CliRunner().invoke(main, [*args, "--json", "-q", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["not_comparable"] == [str(fuse_models["unk"])]
    shares = {r["model"]: r["unknown_share"] for r in data["results"] if r["domain"] == "all"}
    assert shares[str(fuse_models["pivot"])] == 0.0 and shares[str(fuse_models["unk"])] > 0.5


def test_pickle_only_weights_mention_allow_pickle(tmp_path, fuse_models):
    folder = tmp_path / "bin-only"
    folder.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (folder / name).write_bytes((fuse_models["pivot"] / name).read_bytes())
    (folder / "pytorch_model.bin").write_bytes(b"not loaded")
    result = CliRunner().invoke(main, ["eval", str(folder), "--data", str(fuse_models["data"]), "-q"])
    assert result.exit_code == 2 and "--allow-pickle" in result.stderr, result.output
