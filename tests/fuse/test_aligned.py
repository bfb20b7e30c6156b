"""The align step: sources' top-K stores in the pivot's positions and vocabulary, on real tokenizers and chat.

One teach+align run through the CLI (pivot: Qwen3 tokenizer; sources: Mistral and GPT-2 tokenizers) is
shared by the module; the other tests realign from its teacher stores.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from fusemerge.errors import FusemergeError
from fusemerge.fuse.align import VocabMapping
from fusemerge.fuse.aligned import run_align
from fusemerge.fuse.cli import fuse
from fusemerge.fuse.inputs import open_fusion_inputs
from fusemerge.fuse.pipeline import chat_data, run_fuse
from fusemerge.fuse.recipe import load_fuse_recipe
from fusemerge.fuse.store import TopKStore
from fusemerge.lm.loading import load_tokenizer
from fusemerge.lm.tokens import ChatTokenizer

ROOT = Path(__file__).resolve().parents[2]
SOURCES = ["mistral-source", "gpt2-source"]


def _quiet(_: str) -> None:
    pass


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def fused(tmp_path_factory, tiny_models, chat_jsonl, fuse_helpers):
    """`fusemerge fuse recipe --steps teach,align` end to end; returns (recipe path, work_dir, CLI output)."""
    root = tmp_path_factory.mktemp("fused")
    recipe = fuse_helpers.write_recipe(
        root / "recipe.yml",
        pivot=str(tiny_models["qwen"]),
        sources=[str(tiny_models["mistral"]), str(tiny_models["gpt2"])],
        dataset={"path": str(chat_jsonl), "limit": 12},
        teacher={"shard_size": 3, "device": "cpu"},
        alignment={"tokens": "dtw", "vocab": "stats"},
        output=str(root / "fused"),
    )
    result = CliRunner().invoke(fuse, [str(recipe), "--steps", "teach,align", "-q"])
    assert result.exit_code == 0, result.output
    return recipe, root / "fused" / "work", result.output


@pytest.fixture(scope="module")
def pivot_view(fused, tiny_models):
    """The pivot's tokenizer and chat data, as the pipeline builds them."""
    recipe = load_fuse_recipe(fused[0])
    return chat_data(recipe, echo=_quiet)


def test_cli_teach_align_writes_the_documented_layout(fused):
    _, work, output = fused
    assert sorted(p.name for p in (work / "aligned").iterdir()) == sorted(SOURCES)
    assert sorted(p.name for p in (work / "vocab").iterdir()) == sorted(
        f"{s}-to-qwen-pivot.safetensors" for s in SOURCES
    )
    assert output.count("% with a teacher distribution") == 2


def test_aligned_stores_live_in_pivot_positions_and_vocab(fused, qwen_tokenizer):
    recipe, work, _ = fused
    pivot, sources = open_fusion_inputs(recipe)
    assert list(sources) == SOURCES
    by_dir = open_fusion_inputs(work)
    assert by_dir.pivot.path == pivot.path and sorted(by_dir.sources) == sorted(SOURCES)
    vocab = len(qwen_tokenizer)
    for name, store in sources.items():
        teacher = TopKStore.open(work / "teacher" / name)
        ident = store.identity
        assert (ident["kind"], ident["positions"], ident["vocab"]) == ("aligned", "pivot", "pivot")
        assert ident["model"] == teacher.identity["model"]
        assert ident["pivot_tokenizer_hash"] == pivot.identity["tokenizer_hash"]
        np.testing.assert_array_equal(store.metric_ce(), teacher.metric_ce())  # MinCE compares these
        for i in range(len(pivot)):
            own, moved = pivot.sequence(i), store.sequence(i)
            assert moved.ids.shape == own.ids.shape and moved.ids.dtype == np.int32
            assert moved.logprobs.dtype == np.float16
            assert ((moved.ids >= -1) & (moved.ids < vocab)).all()
            empty = moved.ids < 0
            assert np.isneginf(moved.logprobs[empty]).all() and np.isfinite(moved.logprobs[~empty]).all()
            mass = np.where(empty, 0.0, np.exp(moved.logprobs.astype(np.float64))).sum(axis=1)
            assert (mass <= 1.0 + 5e-3).all(), (name, i, mass.max())
            assert not empty[
                :-1, 0
            ].any()  # every row but the last has a distribution or the next-gold one-hot


def test_a_source_with_the_pivots_tokenizer_aligns_to_the_identity(fused, pivot_view, tmp_path):
    """The pivot's own store, aligned onto the pivot (same tokenizer, dtw, stats), comes back unchanged."""
    _, work, _ = fused
    pivot_tok, data = pivot_view
    own = TopKStore.open(work / "teacher" / "qwen-pivot")
    report = run_align(
        pivot_tok,
        pivot_tok,
        data,
        source_store=own.path,
        pivot_store=own.path,
        aligned_dir=tmp_path / "aligned",
        mapping_file=tmp_path / "mapping.safetensors",
        progress=False,
        echo=_quiet,
    )
    assert report.from_teacher == report.positions
    for i in range(len(own)):
        a, b = report.store.sequence(i), own.sequence(i)
        np.testing.assert_array_equal(a.ids, b.ids)
        np.testing.assert_array_equal(a.logprobs, b.logprobs)
        assert a.metric_ce == b.metric_ce


def test_rows_carry_their_own_sequences_distributions(fused, pivot_view, tiny_models, tmp_path):
    """Where a pivot token and a source token cover the same characters with the same text, the aligned
    row is that source row through the mapping: checked independently of the aligner, with offsets."""
    _, work, _ = fused
    pivot_tok, data = pivot_view
    source_tok = load_tokenizer(str(tiny_models["mistral"]))
    report = run_align(
        source_tok,
        pivot_tok,
        data,
        source_store=work / "teacher" / "mistral-source",
        pivot_store=work / "teacher" / "qwen-pivot",
        aligned_dir=tmp_path / "aligned",
        mapping_file=tmp_path / "mapping.safetensors",
        tokens="offsets",
        vocab="exact",
        progress=False,
        echo=_quiet,
    )
    assert report.sequences == len(data.sequences) and 0 < report.from_teacher < report.positions
    table = VocabMapping.load(tmp_path / "mapping.safetensors")
    source = TopKStore.open(work / "teacher" / "mistral-source")
    checked = 0
    for i, seq in enumerate(data.sequences):
        p_ids, _, p_off = ChatTokenizer(pivot_tok).with_offsets(seq)
        s_ids, _, s_off = ChatTokenizer(source_tok).with_offsets(seq)
        s_at = {tuple(span): k for k, span in enumerate(s_off.tolist()) if span[1] > span[0]}
        p_text = pivot_tok.convert_ids_to_tokens(p_ids.tolist())
        s_text = source_tok.convert_ids_to_tokens(s_ids.tolist())
        moved, src = report.store.sequence(i), source.sequence(i)
        for j, span in enumerate(p_off.tolist()):
            k = s_at.get(tuple(span))
            if k is None or p_text[j].replace("Ġ", "▁") != s_text[k] or len(seq.text[span[0] : span[1]]) < 2:
                continue
            mapped = table(src.ids[k])
            keep = mapped >= 0
            order = np.argsort(-src.logprobs[k][keep].astype(np.float32), kind="stable")
            want = mapped[keep][order]
            np.testing.assert_array_equal(moved.ids[j][: len(want)], want)
            np.testing.assert_array_equal(moved.logprobs[j][: len(want)], src.logprobs[k][keep][order])
            checked += 1
    assert checked > 50


def test_a_rerun_skips_finished_work(fused):
    recipe, work, _ = fused
    before = {name: _files(work / "aligned" / name) for name in SOURCES}
    lines: list[str] = []
    folders = run_fuse(recipe, steps=["align"], progress=False, echo=lines.append)
    assert sorted(folders) == ["aligned/source1", "aligned/source2"]
    assert sum("align" in line and "skipped" in line for line in lines) == 2
    assert {name: _files(work / "aligned" / name) for name in SOURCES} == before


KILL_SCRIPT = """
import sys, time
from fusemerge.fuse.aligned import run_align
from fusemerge.fuse.pipeline import chat_data
from fusemerge.fuse.recipe import load_fuse_recipe
from fusemerge.fuse.store import TopKStore
from fusemerge.lm.loading import load_tokenizer

recipe_path, source_model, work, out, mapping = sys.argv[1:6]
write = TopKStore.write_shard
def slow_write(self, *args, **kwargs):  # give the parent time to kill us between shards
    path = write(self, *args, **kwargs)
    time.sleep(0.5)
    return path
TopKStore.write_shard = slow_write
pivot_tok, data = chat_data(load_fuse_recipe(recipe_path), echo=lambda _: None)
run_align(load_tokenizer(source_model), pivot_tok, data, source_store=f"{work}/teacher/gpt2-source",
          pivot_store=f"{work}/teacher/qwen-pivot", aligned_dir=out, mapping_file=mapping, progress=False,
          workers=2)  # the parent writes every shard; its workers die with it
"""


def test_an_interrupted_align_resumes_to_an_identical_store(fused, pivot_view, tiny_models, tmp_path):
    recipe, work, _ = fused
    out, mapping = tmp_path / "aligned", tmp_path / "gpt2-to-qwen.safetensors"
    args = [sys.executable, "-c", KILL_SCRIPT, str(recipe), str(tiny_models["gpt2"]), str(work)]
    proc = subprocess.Popen(
        [*args, str(out), str(mapping)],
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 120
    while len(list(out.glob("shard-*.safetensors"))) < 1:
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.monotonic() < deadline
        time.sleep(0.02)
    workers = _children(proc.pid)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = len(list(out.glob("shard-*.safetensors")))
    assert 1 <= done < 4, "the kill must land mid-way"
    assert len(workers) == 2 or not Path("/proc").is_dir(), workers
    deadline = time.monotonic() + 10
    while any(_running(pid) for pid in workers):  # the workers die with their parent (PR_SET_PDEATHSIG)
        assert time.monotonic() < deadline, [pid for pid in workers if _running(pid)]
        time.sleep(0.05)
    pivot_tok, data = pivot_view
    lines: list[str] = []
    run_align(
        load_tokenizer(str(tiny_models["gpt2"])),
        pivot_tok,
        data,
        source_store=work / "teacher" / "gpt2-source",
        pivot_store=work / "teacher" / "qwen-pivot",
        aligned_dir=out,
        mapping_file=mapping,
        workers=3,
        progress=False,
        echo=lines.append,
    )
    assert f"{4 - done} of 4 shards" in "\n".join(lines)
    assert _files(out) == _files(work / "aligned" / "gpt2-source")


def test_a_mismatched_mapping_or_store_is_refused(fused, pivot_view, tiny_models, tmp_path):
    _, work, _ = fused
    pivot_tok, data = pivot_view
    mistral = load_tokenizer(str(tiny_models["mistral"]))

    def realign(mapping: Path, **kwargs):
        return run_align(
            mistral,
            pivot_tok,
            data,
            source_store=work / "teacher" / "mistral-source",
            pivot_store=work / "teacher" / "qwen-pivot",
            aligned_dir=kwargs.pop("aligned_dir", work / "aligned" / "mistral-source"),
            mapping_file=mapping,
            progress=False,
            echo=_quiet,
            **kwargs,
        )

    wrong_pair = tmp_path / "mapping.safetensors"
    shutil.copy(work / "vocab" / "gpt2-source-to-qwen-pivot.safetensors", wrong_pair)
    with pytest.raises(FusemergeError, match="built for another source tokenizer"):
        realign(wrong_pair)
    stats_file = work / "vocab" / "mistral-source-to-qwen-pivot.safetensors"
    with pytest.raises(FusemergeError, match="built with vocab 'stats', the recipe asks for 'exact'"):
        realign(stats_file, vocab="exact")
    with pytest.raises(FusemergeError, match="counted on tokens 'dtw'"):
        realign(stats_file, tokens="offsets")
    with pytest.raises(FusemergeError, match='vocab_mapping: store has "stats", now "exact"'):
        realign(tmp_path / "exact.safetensors", vocab="exact")
    with pytest.raises(FusemergeError, match="teacher store was made with another tokenizer"):
        run_align(
            load_tokenizer(str(tiny_models["gpt2"])),
            pivot_tok,
            data,
            source_store=work / "teacher" / "mistral-source",
            pivot_store=work / "teacher" / "qwen-pivot",
            aligned_dir=tmp_path / "other",
            mapping_file=tmp_path / "other.safetensors",
            progress=False,
            echo=_quiet,
        )


def test_align_alone_needs_the_teacher_stores(tmp_path, tiny_models, chat_jsonl, fuse_helpers):
    recipe = fuse_helpers.write_recipe(
        tmp_path / "recipe.yml",
        pivot=str(tiny_models["qwen"]),
        sources=[str(tiny_models["gpt2"])],
        dataset={"path": str(chat_jsonl), "limit": 2},
        output=str(tmp_path / "fused"),
    )
    result = CliRunner().invoke(fuse, [str(recipe), "--steps", "align", "-q"])
    assert result.exit_code == 2
    teacher = tmp_path / "fused" / "work" / "teacher" / "qwen-pivot"
    assert result.output.strip() == (
        f"fusemerge: error: {teacher}: no teacher store for qwen-pivot; "
        "run the teach step first (--steps teach,align)"
    )
    with pytest.raises(FusemergeError, match="no pivot teacher store"):
        open_fusion_inputs(recipe)


@pytest.mark.parametrize(
    ("tokens", "vocab", "start_method"),
    [("dtw", "stats", "fork"), ("offsets", "prefix", "fork"), ("dtw", "mined", "spawn")],
)
def test_several_workers_write_what_one_worker_writes(
    fused, pivot_view, tiny_models, tmp_path, monkeypatch, tokens, vocab, start_method
):
    """Aligned stores, mapping files and the fused targets read from them: byte for byte the same with 1
    and 3 workers, with chunks smaller than a shard (so a shard is assembled from several workers)."""
    import fusemerge.fuse.aligned as aligned_module
    from fusemerge.fuse.collate import FusionCollator, FusionDataset

    # 12 sequences in shards of 3: one worker takes chunks of 2, three workers chunks of 1 (12 tasks)
    monkeypatch.setattr(aligned_module, "CHUNK", 2)
    monkeypatch.setattr(aligned_module, "MIN_CHUNK", 1)
    _, work, _ = fused
    pivot_tok, data = pivot_view
    source_tok = load_tokenizer(str(tiny_models["mistral"]))
    runs = {}
    for workers in (1, 3):
        out = tmp_path / f"w{workers}"
        lines: list[str] = []
        report = run_align(
            source_tok,
            pivot_tok,
            data,
            source_store=work / "teacher" / "mistral-source",
            pivot_store=work / "teacher" / "qwen-pivot",
            aligned_dir=out / "aligned",
            mapping_file=out / "mapping.safetensors",
            tokens=tokens,
            vocab=vocab,
            workers=workers,
            start_method=start_method,
            progress=False,
            echo=lines.append,
        )
        assert report.sequences == len(data.sequences)
        assert ("3 workers" in "\n".join(lines)) == (workers == 3)
        collate = FusionCollator(
            TopKStore.open(work / "teacher" / "qwen-pivot"), {"mistral": report.store}, function="mince"
        )
        dataset = FusionDataset(data, pivot_tok)
        targets = [collate.target(i, dataset[i]["input_ids"]) for i in range(len(dataset))]
        table = VocabMapping.load(out / "mapping.safetensors").source_to_pivot
        runs[workers] = (_files(out / "aligned"), (table.tobytes(), _metadata(out)), targets)
    one, three = runs[1], runs[3]
    assert one[0] == three[0] and len(one[0]) == 5  # 4 shards and the manifest
    # the mapping's table byte for byte, and its metadata; not the file's bytes: safetensors writes the
    # metadata in hash-map order, which differs from one save to the next even in one process
    assert one[1] == three[1]
    for (ids1, p1), (ids3, p3) in zip(one[2], three[2], strict=True):
        assert ids1.tobytes() == ids3.tobytes() and p1.tobytes() == p3.tobytes()


def _metadata(out: Path) -> dict:
    from safetensors import safe_open

    with safe_open(str(out / "mapping.safetensors"), framework="numpy") as f:
        return dict(f.metadata())


def _stat(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2 :].split()  # state, ppid, ...


def _children(pid: int) -> list[int]:
    """The live child processes of `pid` (Linux /proc; empty elsewhere)."""
    found = []
    for entry in Path("/proc").glob("[0-9]*") if Path("/proc").is_dir() else []:
        fields = _stat(int(entry.name))
        if fields is not None and fields[1] == str(pid) and fields[0] != "Z":
            found.append(int(entry.name))
    return found


def _running(pid: int) -> bool:
    fields = _stat(pid)
    return fields is not None and fields[0] != "Z"
