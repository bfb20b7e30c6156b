"""`fusemerge eval` on cases whose answer is known: a uniform model, bits per byte by hand, domains, errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from click.testing import CliRunner

from fusemerge.cli import main
from fusemerge.errors import FusemergeError
from fusemerge.evaluate import evaluate_models, load_eval_data
from fusemerge.lm.tokens import ChatTokenizer
from fusemerge.offline.assets import build_random_model

RECORDS = [
    {
        "messages": [
            {"role": "user", "content": "How do I say coffee in French?"},
            {"role": "assistant", "content": "Café, as in « un café, s'il vous plaît »."},
        ],
        "domain": "language",
    },
    {
        "conversations": [
            {"from": "human", "value": "What is 2 + 2?"},
            {"from": "gpt", "value": "4."},
            {"from": "human", "value": "And times 3?"},
            {"from": "gpt", "value": "12, since 4 x 3 = 12."},
        ],
        "domain": "math",
    },
    {"messages": [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello there."}]},
]


def _uniform_model(folder: Path, tokenizer, vocab_size: int) -> Path:
    """A tiny Llama whose output head is all zeros: every logit is equal, so p = 1/vocab everywhere."""
    from safetensors.torch import load_file, save_file

    build_random_model(
        folder, vocab_size=vocab_size, hidden_size=16, intermediate_size=32, num_layers=1, tokenizer=tokenizer
    )
    weights = load_file(folder / "model.safetensors")
    weights["lm_head.weight"].zero_()
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


@pytest.fixture(scope="module")
def models(tmp_path_factory, qwen_tokenizer, gpt2_tokenizer):
    root = tmp_path_factory.mktemp("eval_models")
    qwen = _uniform_model(root / "qwen-uniform", qwen_tokenizer, len(qwen_tokenizer))
    gpt2 = build_random_model(
        root / "gpt2-random", vocab_size=len(gpt2_tokenizer), hidden_size=16, intermediate_size=32,
        num_layers=1, tokenizer=gpt2_tokenizer,
    )  # fmt: skip
    return {"qwen": qwen, "gpt2": gpt2, "vocab": len(qwen_tokenizer)}


@pytest.fixture
def data(tmp_path) -> Path:
    path = tmp_path / "heldout.jsonl"
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in RECORDS) + "\n", encoding="utf-8")
    return path


def test_uniform_model_scores_log_vocab_per_token(models, data):
    report = evaluate_models([models["qwen"]], [data], device="cpu", progress=False)
    score = report.score(str(models["qwen"]))
    vocab = models["vocab"]
    assert score.tokens > 20
    assert score.nats_per_token == pytest.approx(math.log(vocab), rel=1e-5)
    assert score.bits_per_token == pytest.approx(math.log2(vocab), rel=1e-5)
    assert score.perplexity == pytest.approx(vocab, rel=1e-4)


def test_bits_per_byte_by_hand(models, data, qwen_tokenizer):
    """Uniform model: bits = scored tokens x log2(vocab); bytes = UTF-8 bytes of the characters they cover."""
    report = evaluate_models([models["qwen"]], [data], device="cpu", progress=False)
    seqs = load_eval_data([data], qwen_tokenizer)
    tokens = nbytes = 0
    for item in seqs:
        text, spans = item.seq.text, item.seq.spans
        enc = qwen_tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        covered: set[int] = set()
        for i, (a, b) in enumerate(enc["offset_mapping"]):
            if i > 0 and any(a < e and b > s for s, e in spans):
                tokens += 1
                covered.update(range(a, b))
        nbytes += sum(len(text[c].encode("utf-8")) for c in covered)
    # the content of each assistant turn and its end-of-turn marker, nothing of the user turns
    assert nbytes >= sum(
        len(r.encode()) for r in ("Café, as in « un café, s'il vous plaît ».", "4.", "Hello there.")
    )
    score = report.score(str(models["qwen"]))
    assert (score.tokens, score.bytes) == (tokens, nbytes)
    assert score.bits_per_byte == pytest.approx(tokens * math.log2(models["vocab"]) / nbytes, rel=1e-5)


def test_two_tokenizers_side_by_side_per_domain(models, data, qwen_tokenizer, gpt2_tokenizer):
    report = evaluate_models([models["qwen"], models["gpt2"]], [data], device="cpu", progress=False)
    assert report.domains == [
        "heldout",
        "language",
        "math",
    ]  # the record without a domain takes the file stem
    q, g = (str(models[k]) for k in ("qwen", "gpt2"))
    for m in (q, g):
        parts = [report.score(m, d) for d in report.domains]
        assert [p.sequences for p in parts] == [1, 1, 1]
        total = report.score(m)
        assert total.tokens == sum(p.tokens for p in parts) and total.nll_nats == pytest.approx(
            sum(p.nll_nats for p in parts)
        )
    # Same text for both: GPT-2 splits the ChatML markers into many tokens, so it has more of them.
    assert report.score(g).tokens > report.score(q).tokens
    assert abs(report.score(g).bytes - report.score(q).bytes) <= 6  # token edges differ by a few chars only
    table = report.table()
    assert "qwen-uniform" in table and "gpt2-random" in table
    assert [line.split()[0] for line in table.splitlines()[3:7]] == ["heldout", "language", "math", "all"]
    ids, mask = ChatTokenizer(gpt2_tokenizer)(load_eval_data([data], qwen_tokenizer)[0].seq)
    assert mask.any() and not mask.all()


def test_cli_json_with_domain_files_and_save_to(models, tmp_path):
    for domain, rec in (("code", RECORDS[1]), ("chat", RECORDS[2])):
        rec = {k: v for k, v in rec.items() if k != "domain"}
        (tmp_path / f"{domain}.jsonl").write_text(json.dumps(rec) + "\n")
    runner = CliRunner()
    args = [
        "eval",
        str(models["qwen"]),
        "--data",
        str(tmp_path / "code.jsonl"),
        "--data",
        str(tmp_path / "chat.jsonl"),
    ]
    result = runner.invoke(main, [*args, "--json", "-q", "--device", "cpu", "--save-to", str(models["qwen"])])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["domains"] == ["chat", "code"]
    rows = {(r["domain"]): r for r in report["results"]}
    assert rows["all"]["nats_per_token"] == pytest.approx(math.log(models["vocab"]), rel=1e-5)
    assert (models["qwen"] / "fusemerge_eval.json").is_file()
    table = runner.invoke(main, [*args, "-q", "--device", "cpu"])
    assert table.exit_code == 0 and "bits/byte" in table.stdout and "code" in table.stdout


def test_cli_bad_input_exits_2_with_one_line(models, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(RECORDS[0]) + "\n" + '{"messages": [{"role": "user", "content": "x"}]}\n')
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text("{}")
    cases = [
        ([str(models["qwen"]), "--data", str(bad)], f"{bad}:2"),
        ([str(models["qwen"]), "--data", str(tmp_path / "missing.jsonl")], "data file not found"),
        ([str(empty), "--data", str(bad)], "no *.safetensors weights"),
        ([str(tmp_path / "nope"), "--data", str(bad)], "model folder not found"),
        ([str(models["gpt2"]), "--data", str(bad)], "--chat-template"),  # GPT-2 has no chat template
    ]
    for args, expected in cases:
        result = CliRunner().invoke(main, ["eval", *args, "-q", "--device", "cpu"])
        assert result.exit_code == 2, (args, result.output)
        assert expected in result.stderr and result.stderr.count("\n") == 1, result.stderr


def test_chat_template_override_renders_for_every_model(models, data):
    with pytest.raises(FusemergeError, match="unknown chat template"):
        evaluate_models([models["gpt2"]], [data], chat_template="nope", device="cpu", progress=False)
    report = evaluate_models([models["gpt2"]], [data], chat_template="chatml", device="cpu", progress=False)
    assert report.chat_template == "chatml" and report.score(str(models["gpt2"])).tokens > 0
