"""The fusion demo's parts (data split, chat format, the cut Qwen3 tokenizer) and a scaled-down run of it.

The full demo (`make demo`, several minutes) is what users run; here the same code runs end to end on a
few dozen records and two-layer models of a few training steps, to check the wiring: every stage, the
table, results.json and the PNG. The numbers of a run that small mean nothing, so none is asserted there; the full demo's claims are
asserted by a slow test (CI runs it) that runs `fusemerge demo` itself.
"""

from __future__ import annotations

import json

import pytest

from fusemerge.demo.corpus import DOMAINS, CorpusPlan, Split, build_corpus, chat_records, record_text
from fusemerge.demo.fusion import PAPER, RECOMMENDED, DemoPlan, describe, run_fusion_demo
from fusemerge.demo.pretrain import ModelPlan, demo_tokenizer
from fusemerge.demo.report import check_lines, claims
from fusemerge.demo.results import DemoResult
from fusemerge.offline.assets import QWEN3_32K_IDS, load_shipped_tokenizer

TEXTS = [
    "def f(x):\n    return {'a': [1, 2.5e-3]}  # naïve café",
    "Emoji 🙂🚀, Chinese 你好世界, Hindi नमस्ते, tabs\tand\r\nnewlines.",
]


def test_qwen3_32k_is_qwen3_bpe_cut_to_its_first_ids():
    cut, full = load_shipped_tokenizer("qwen3-32k"), load_shipped_tokenizer("qwen3")
    vocab = cut.get_vocab()
    assert sorted(i for i in vocab.values() if i < QWEN3_32K_IDS) == list(range(QWEN3_32K_IDS))
    assert sorted(vocab.values()) == list(range(len(cut)))  # the special tokens follow, no gaps
    full_vocab = full.get_vocab()
    assert all(full_vocab[piece] == i for piece, i in vocab.items() if i < QWEN3_32K_IDS)
    for text in TEXTS:  # any text still encodes (all 256 bytes are kept) and decodes back exactly
        ids = cut(text, add_special_tokens=False)["input_ids"]
        assert max(ids) < QWEN3_32K_IDS
        assert cut.decode(ids) == text
    common = "Hello, how are you today? I am fine, thank you."
    assert cut.tokenize(common) == full.tokenize(common)  # frequent merges are all kept
    assert cut.convert_tokens_to_ids("<|im_end|>") >= QWEN3_32K_IDS


@pytest.mark.parametrize("name", ["mistral", "gpt2", "qwen3-32k"])
def test_pretraining_text_is_what_the_chat_template_renders(name):
    tok = demo_tokenizer(ModelPlan("m", name, "llama"))
    for record in chat_records()[:20:3]:
        assert tok.apply_chat_template(record["messages"], tokenize=False) == record_text(record)


def test_corpus_parts_are_disjoint_and_stable(tmp_path):
    plan = CorpusPlan(code=Split(5, 6, 3, 4), chat=Split(7, 8, 3, 4))
    a = build_corpus(tmp_path / "a", plan)
    b = build_corpus(tmp_path / "b", plan)
    assert a.fusion_file.read_text() == b.fusion_file.read_text()
    assert a.heldout_file.read_text() == b.heldout_file.read_text()
    fusion = [json.loads(line) for line in a.fusion_file.read_text().splitlines()]
    heldout = [json.loads(line) for line in a.heldout_file.read_text().splitlines()]
    assert sorted(r["domain"] for r in fusion) == ["chat"] * 8 + ["code"] * 6
    assert sorted(r["domain"] for r in heldout) == ["chat"] * 7 + ["code"] * 5
    texts = {
        "fusion": {record_text(r) for r in fusion},
        "heldout": {record_text(r) for r in heldout},
        "pivot": set(a.pretraining_texts("pivot")),
        "specialist": {t for d in DOMAINS for t in a.texts["specialist"][d]},
    }
    names = list(texts)
    for i, x in enumerate(names):
        for y in names[i + 1 :]:
            assert not texts[x] & texts[y], f"{x} and {y} share text"


def test_a_corpus_too_small_for_the_split_is_refused(tmp_path):
    with pytest.raises(ValueError, match="code domain"):
        build_corpus(tmp_path, CorpusPlan(code=Split(10_000, 1, 1, 1)))


@pytest.mark.slow
def test_scaled_down_demo_runs_every_stage(tmp_path):
    def tiny(name: str, tokenizer: str, arch: str, seed: int) -> ModelPlan:
        return ModelPlan(name, tokenizer, arch, hidden_size=32, intermediate_size=64, block=64, seed=seed)

    plan = DemoPlan(
        corpus=CorpusPlan(code=Split(4, 8, 4, 8), chat=Split(6, 12, 6, 12), code_max_chars=400),
        pivot=tiny("pivot", "mistral", "llama", 1),
        specialists=(
            ("code", tiny("code-specialist", "qwen3-32k", "qwen2", 2)),
            ("chat", tiny("chat-specialist", "gpt2", "mistral", 3)),
        ),
    )
    plan.fuse["training"]["epochs"] = 1
    lines: list[str] = []
    result = run_fusion_demo(tmp_path / "demo", plan, progress=False, echo=lines.append)

    assert result.labels == [
        "pivot",
        "code specialist (teacher)",
        "chat specialist (teacher)",
        "pivot + CLM only (baseline)",
        "fused with code specialist",
        "fused with chat specialist",
        "fused with code specialist (paper's setting)",
        "fused with chat specialist (paper's setting)",
        "VaRM merge",
        "linear merge",
    ]
    for row in result.bits_per_byte.values():
        assert set(row) == {*DOMAINS, "average"} and all(0 < v < 20 for v in row.values())
    saved = json.loads((tmp_path / "demo" / "results.json").read_text())
    for label, row in result.bits_per_byte.items():
        assert saved["bits_per_byte"][label] == pytest.approx(row)
    assert (tmp_path / "demo" / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = "\n".join(lines)
    assert "held-out bits per byte" in text and "VaRM merge no worse than linear" in text
    assert text.count("beats CLM-only") == 2
    # the recommended setting is the demo's, the paper's is a row beside it: both named, one line each
    assert (
        f"recommended setting (the best setting of bench/fusion_ablation.py): {describe(RECOMMENDED)}" in text
    )
    assert f"paper's setting, trained beside it: {describe(PAPER)}" in text
    assert text.count("  at the paper's setting: ") == 2
    assert "metric: ce_per_token" in (tmp_path / "demo" / "fuse-paper.yml").read_text()
    assert "metric: ce_per_byte" in (tmp_path / "demo" / "fuse.yml").read_text()
    # Each printed verdict is the comparison of the numbers in the table, whichever way it went here.
    bpb = result.bits_per_byte
    for domain in DOMAINS:
        beats = bpb[f"fused with {domain} specialist"][domain] < bpb["pivot + CLM only (baseline)"][domain]
        verdict = "yes" if beats else "NO"
        assert f"fused with the {domain} specialist beats CLM-only on {domain}: {verdict} (" in text
    no_worse = bpb["VaRM merge"]["average"] <= 1.0001 * bpb["linear merge"]["average"]
    assert f"VaRM merge no worse than linear on average: {'yes' if no_worse else 'NO'} (" in text
    # The CLM-only baseline is the FuseChat recipe's own (`fuse --baseline`), carded as a fine-tune.
    baseline = result.folders["pivot + CLM only (baseline)"]
    assert baseline == tmp_path / "demo" / "fused" / "pivot-finetune"
    assert "# Fine-tuned model" in (baseline / "README.md").read_text()

    # A rerun reuses every finished stage and gives the same numbers.
    again = run_fusion_demo(tmp_path / "demo", plan, progress=False, echo=lambda _: None)
    assert again.bits_per_byte == result.bits_per_byte


def _result(code: float, chat: float, varm: float, linear: float) -> DemoResult:
    """A results table with the given fused-target, VaRM and linear numbers; the baseline is 2.0 and 3.0."""
    rows = {
        "pivot + CLM only (baseline)": {"code": 2.0, "chat": 3.0},
        "fused with code specialist": {"code": code, "chat": 3.0},
        "fused with chat specialist": {"code": 2.0, "chat": chat},
        "VaRM merge": {"code": varm, "chat": varm},
        "linear merge": {"code": linear, "chat": linear},
    }
    for row in rows.values():
        row["average"] = (row["code"] + row["chat"]) / 2
    return DemoResult(rows, {})


def test_claims_are_strict_for_the_targets_and_allow_a_varm_tie_within_a_hundredth_of_a_percent():
    assert all(claims(_result(1.99, 2.99, 2.5, 2.5), list(DOMAINS)).values())
    # The H200 run of the README: VaRM 0.00002 bits/byte behind linear is a tie, so the claim holds.
    assert all(claims(_result(1.99, 2.99, 2.66595, 2.66593), list(DOMAINS)).values())
    failed = {
        c for c, held in claims(_result(2.0, 2.99, 2.5 * 1.00011, 2.5), list(DOMAINS)).items() if not held
    }
    assert failed == {
        "fused with the code specialist beats CLM-only on code",  # equal is not better
        "VaRM merge no worse than linear on average",  # 0.011% behind
    }
    lines = check_lines(_result(2.0, 2.99, 2.5 * 1.00011, 2.5), list(DOMAINS))
    assert [line.split(": ")[1][:3] for line in lines] == ["NO ", "yes", "NO "]


@pytest.mark.parametrize(("code", "status"), [(1.99, 0), (2.01, 3)])
def test_demo_command_exits_3_when_a_claim_does_not_hold(tmp_path, monkeypatch, code, status):
    """The command's exit status, from the verdicts on a given table (the demo's training is not run)."""
    from click.testing import CliRunner

    import fusemerge.demo.fusion
    from fusemerge.cli import main

    def stand_in(out, plan, *, progress, echo):
        echo("the demo's table would be here")
        return _result(code, 2.99, 2.5, 2.5)

    monkeypatch.setattr(fusemerge.demo.fusion, "run_fusion_demo", stand_in)
    result = CliRunner().invoke(main, ["demo", "-q", "--out", str(tmp_path)])
    assert result.exit_code == status, result.output
    if status:
        assert "claim did not hold: fused with the code specialist beats CLM-only on code" in result.output


@pytest.mark.slow
def test_full_demo_shows_what_fusechat_predicts(tmp_path):
    """Issue 7's acceptance on the embedded default, run as users run it (`fusemerge demo`): each fused
    target beats the CLM-only baseline on its specialist's domain, VaRM is within 0.01% of linear on
    average or better, and the command exits 0."""
    from click.testing import CliRunner

    from fusemerge.cli import main

    run = CliRunner().invoke(main, ["demo", "-q", "--out", str(tmp_path / "demo")])
    assert run.exit_code == 0, run.output
    bpb = json.loads((tmp_path / "demo" / "results.json").read_text())["bits_per_byte"]
    baseline = bpb["pivot + CLM only (baseline)"]
    for domain in DOMAINS:
        fused = bpb[f"fused with {domain} specialist"][domain]
        assert fused < baseline[domain], f"{domain}: fused {fused} vs CLM-only {baseline[domain]}"
    varm, linear = bpb["VaRM merge"]["average"], bpb["linear merge"]["average"]
    assert varm <= linear * 1.0001, f"VaRM {varm} vs linear {linear}"
    assert "VaRM merge no worse than linear on average: yes" in run.output
