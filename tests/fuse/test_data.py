"""Chat data: records in both formats, rendering with the pivot's template, masks per tokenizer, lengths."""

from __future__ import annotations

import pytest

from fusemerge.errors import FusemergeError
from fusemerge.fuse.data import build_chat_data
from fusemerge.fuse.recipe import DatasetSpec
from fusemerge.lm.chat import ChatSequence, conversation_messages
from fusemerge.lm.tokens import ChatTokenizer


@pytest.fixture
def h(fuse_helpers):
    return fuse_helpers


def _sharegpt(record: dict) -> dict:
    names = {"user": "human", "assistant": "gpt", "system": "system"}
    return {"conversations": [{"from": names[m["role"]], "value": m["content"]} for m in record["messages"]]}


def _assistant_text(seq: ChatSequence) -> str:
    return "".join(seq.text[a:b] for a, b in seq.spans)


def test_openai_and_sharegpt_give_the_same_sequences(h, tmp_path, qwen_tokenizer):
    records = h.chat_records(12)
    openai = h.write_jsonl(tmp_path / "openai.jsonl", records)
    sharegpt = h.write_jsonl(tmp_path / "sharegpt.jsonl", [_sharegpt(r) for r in records])
    a = build_chat_data(DatasetSpec(path=str(openai)), qwen_tokenizer)
    b = build_chat_data(DatasetSpec(path=str(sharegpt), format="sharegpt"), qwen_tokenizer)
    c = build_chat_data(DatasetSpec(path=str(sharegpt)), qwen_tokenizer)  # auto-detected
    assert a.sequences == b.sequences == c.sequences
    assert a.fingerprint() == c.fingerprint()
    for seq, record in zip(a.sequences, records, strict=True):
        replies = [m["content"] for m in record["messages"] if m["role"] == "assistant"]
        # each span is the reply followed by Qwen's end-of-turn token, so the student learns to stop
        assert [seq.text[s:e] for s, e in seq.spans] == [r + "<|im_end|>" for r in replies]


def test_datasets_folder_reads_like_jsonl(h, tmp_path, qwen_tokenizer):
    import datasets

    records = h.chat_records(8)
    datasets.Dataset.from_list([_sharegpt(r) for r in records]).save_to_disk(str(tmp_path / "ds"))
    from_folder = build_chat_data(DatasetSpec(path=str(tmp_path / "ds")), qwen_tokenizer)
    from_jsonl = build_chat_data(
        DatasetSpec(path=str(h.write_jsonl(tmp_path / "c.jsonl", records))), qwen_tokenizer
    )
    assert [s.text for s in from_folder.sequences] == [s.text for s in from_jsonl.sequences]


@pytest.mark.parametrize(
    ("bad", "reason"),
    [
        ({"messages": [{"content": "hi"}, {"role": "assistant", "content": "yo"}]}, "has no 'role'"),
        (
            {"messages": [{"role": "user", "content": "  "}, {"role": "assistant", "content": "yo"}]},
            "is empty",
        ),
        (
            {"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "yo"}]},
            "must be a string",
        ),
        ({"messages": "hello"}, "non-empty list"),
        ({"messages": [{"role": "user", "content": "only a question"}]}, "no assistant turn"),
        (
            {"messages": [{"role": "wizard", "content": "x"}, {"role": "assistant", "content": "y"}]},
            "unknown role",
        ),
        ({"text": "plain"}, "neither 'messages'"),
    ],
)
def test_malformed_records_are_reported_with_their_line(h, tmp_path, qwen_tokenizer, bad, reason):
    path = h.write_jsonl(tmp_path / "c.jsonl", h.chat_records(3) + [bad] + h.chat_records(1, start=5))
    data = build_chat_data(DatasetSpec(path=str(path)), qwen_tokenizer, warn=lambda _: None)
    assert len(data.sequences) == 4 and data.records == 5
    assert len(data.skipped) == 1 and "c.jsonl:4: " in data.skipped[0].one_line()
    assert reason in data.skipped[0].one_line()
    with pytest.raises(FusemergeError, match=r"c\.jsonl:4: ") as info:
        build_chat_data(DatasetSpec(path=str(path), on_bad_record="error"), qwen_tokenizer)
    assert reason in str(info.value)


def test_broken_json_line_and_template_refusal_are_bad_records(h, tmp_path, mistral_tokenizer):
    # a template that refuses a system message, as some real templates do: reported, never a crash
    strict = "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system') }}{% endif %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    (tmp_path / "strict.jinja").write_text(strict)
    records = h.chat_records(2)
    system = {"messages": [{"role": "system", "content": "Be brief."}] + records[0]["messages"]}
    path = tmp_path / "c.jsonl"
    h.write_jsonl(path, records + [system])
    with path.open("a") as fh:
        fh.write("{not json\n")
    data = build_chat_data(DatasetSpec(path=str(path)), mistral_tokenizer, str(tmp_path / "strict.jinja"))
    assert len(data.sequences) == 2
    lines = [e.one_line() for e in data.skipped]
    assert "c.jsonl:3: " in lines[0] and "no system" in lines[0]
    assert "c.jsonl:4: " in lines[1] and "not valid JSON" in lines[1]


@pytest.mark.parametrize("name", ["qwen_tokenizer", "gpt2_tokenizer", "mistral_tokenizer"])
def test_assistant_mask_covers_exactly_the_replies(request, chat_jsonl, qwen_tokenizer, name):
    tokenizer = request.getfixturevalue(name)
    data = build_chat_data(DatasetSpec(path=str(chat_jsonl)), qwen_tokenizer)
    chat = ChatTokenizer(tokenizer)
    for seq in data.sequences[:10]:
        ids, mask = chat(seq)
        assert mask.any() and not mask[0]
        decoded = tokenizer.decode(ids[mask].tolist())
        for a, b in seq.spans:  # every reply is inside the masked tokens, the prompt is not
            assert seq.text[a:b].replace("<|im_end|>", "").strip() in decoded
        assert "<|im_start|>user" not in decoded
        same_ids, same_mask, offsets = chat.with_offsets(seq)
        assert (same_ids == ids).all() and (same_mask == mask).all() and offsets.shape == (len(ids), 2)
        assert offsets[-1, 1] == len(seq.text.rstrip("\n")) or offsets[-1, 1] == len(seq.text)
        # Exactly: a token is masked if and only if its characters lie inside a reply's span, and the
        # masked tokens' characters are the spans' characters, none missing and none extra.
        inside = [e > s and any(a <= s and e <= b for a, b in seq.spans) for s, e in offsets.tolist()]
        assert mask.tolist() == inside
        covered = {
            c for (s, e), m in zip(offsets.tolist(), mask.tolist(), strict=True) if m for c in range(s, e)
        }
        assert covered == {c for a, b in seq.spans for c in range(a, b)}


def test_slow_tokenizer_path_gives_the_same_mask_on_clean_boundaries(chat_jsonl, qwen_tokenizer):
    data = build_chat_data(DatasetSpec(path=str(chat_jsonl)), qwen_tokenizer)
    fast, slow = ChatTokenizer(qwen_tokenizer), ChatTokenizer(qwen_tokenizer)
    slow.fast = False  # the segment-by-segment path that slow tokenizers (no offsets) take
    for seq in data.sequences[:10]:
        (ids_f, mask_f), (ids_s, mask_s) = fast(seq), slow(seq)
        assert qwen_tokenizer.decode(ids_f[mask_f].tolist()) == qwen_tokenizer.decode(ids_s[mask_s].tolist())
        assert qwen_tokenizer.decode(ids_s.tolist()) == seq.text


def _long_conversation(h) -> dict:
    turns = [m for r in h.chat_records(6, start=2) for m in r["messages"][:2]]
    return {"messages": [{"role": "system", "content": "You are a friendly chatbot."}] + turns}


def test_split_long_cuts_between_rounds(h, tmp_path, qwen_tokenizer):
    record = _long_conversation(h)
    path = h.write_jsonl(tmp_path / "long.jsonl", [record])
    whole = build_chat_data(DatasetSpec(path=str(path), max_length=4096), qwen_tokenizer)
    assert len(whole.sequences) == 1
    spec = DatasetSpec(path=str(path), max_length=90, split_long=True)
    data = build_chat_data(spec, qwen_tokenizer)
    assert len(data.sequences) > 1
    measure = ChatTokenizer(qwen_tokenizer)
    for seq in data.sequences:
        assert len(measure(seq)[0]) <= 90
        assert seq.text.startswith(
            "<|im_start|>system\nYou are a friendly chatbot.<|im_end|>\n<|im_start|>user"
        )
    replies = [m["content"] + "<|im_end|>" for m in record["messages"] if m["role"] == "assistant"]
    assert [seq.text[a:b] for seq in data.sequences for a, b in seq.spans] == replies


def test_without_split_long_the_conversation_is_truncated(h, tmp_path, qwen_tokenizer, gpt2_tokenizer):
    path = h.write_jsonl(tmp_path / "long.jsonl", [_long_conversation(h)])
    whole = build_chat_data(DatasetSpec(path=str(path), max_length=4096), qwen_tokenizer).sequences[0]
    data = build_chat_data(DatasetSpec(path=str(path), max_length=90, split_long=False), qwen_tokenizer)
    (seq,) = data.sequences
    assert whole.text.startswith(seq.text) and len(seq.text) < len(whole.text)
    assert 80 <= len(ChatTokenizer(qwen_tokenizer)(seq)[0]) <= 90
    assert all(b <= len(seq.text) for _, b in seq.spans)
    # a slow pivot tokenizer is measured by bisection instead of offsets: same limit holds
    slow = ChatTokenizer(qwen_tokenizer)
    slow.fast = False
    assert len(slow(seq)[0]) <= 91


def test_named_template_for_a_pivot_without_one(h, chat_jsonl, gpt2_tokenizer):
    with pytest.raises(FusemergeError, match="no chat template"):
        build_chat_data(DatasetSpec(path=str(chat_jsonl)), gpt2_tokenizer)
    data = build_chat_data(DatasetSpec(path=str(chat_jsonl)), gpt2_tokenizer, "chatml")
    assert data.sequences[0].text.startswith("<|im_start|>user\n")
    # gpt2 has no <|im_end|> special token: the span is the reply alone
    reply = h.chat_records(1)[0]["messages"][1]["content"]
    assert _assistant_text(data.sequences[0]) == reply
    with pytest.raises(FusemergeError, match="unknown chat template 'llama9'"):
        build_chat_data(DatasetSpec(path=str(chat_jsonl)), gpt2_tokenizer, "llama9")


def test_sharegpt_roles_are_mapped():
    record = {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]}
    assert conversation_messages(record) == [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
    ]


def test_missing_dataset_is_a_user_error(tmp_path, qwen_tokenizer):
    with pytest.raises(FusemergeError, match="dataset not found"):
        build_chat_data(DatasetSpec(path=str(tmp_path / "nope.jsonl")), qwen_tokenizer)
