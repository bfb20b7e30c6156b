"""Prepared data for the training half: SFT conversations and preference pairs in TRL's formats, normalised,
and bad records stopped with one line naming the file, the line and the key."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fusemerge.errors import FusemergeError
from fusemerge.fuse.implicit.datasets import read_preference_data, read_sft_data
from fusemerge.fuse.implicit.spec import DataFileSpec

U = {"role": "user", "content": "What is 2 plus 2?"}
A = {"role": "assistant", "content": "4."}
B = {"role": "assistant", "content": "5, probably."}
T = {"role": "assistant", "content": "2 plus 2 is 4."}


def jsonl(tmp_path: Path, *records, name: str = "data.jsonl") -> DataFileSpec:
    lines = [r if isinstance(r, str) else json.dumps(r) for r in records]
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return DataFileSpec(path=str(path))


def test_sft_reads_openai_and_sharegpt_records_with_their_lines(tmp_path):
    spec = jsonl(
        tmp_path,
        {"messages": [U, A], "prompt_id": "p1", "score": 0.9},
        "",
        {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"}]},
    )
    records = read_sft_data(spec=spec)
    assert [r.line for r in records] == [1, 3]
    assert records[0].messages == [U, A]
    assert records[1].messages == [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
    ]


def test_sft_limit_and_a_datasets_folder_with_splits(tmp_path):
    import datasets

    rows = [{"messages": [U, {"role": "assistant", "content": f"answer {i}"}]} for i in range(5)]
    folder = tmp_path / "saved"
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(rows), "test": datasets.Dataset.from_list(rows[:2])}
    ).save_to_disk(str(folder))
    assert len(read_sft_data(spec=DataFileSpec(path=str(folder)))) == 5  # "train" by default
    assert len(read_sft_data(spec=DataFileSpec(path=str(folder), split="test"))) == 2
    assert [
        r.messages[1]["content"] for r in read_sft_data(spec=DataFileSpec(path=str(folder), limit=2))
    ] == [
        "answer 0",
        "answer 1",
    ]
    with pytest.raises(FusemergeError, match=r"key 'implicit.sft_data.split'"):
        read_sft_data(spec=DataFileSpec(path=str(folder), split="nope"))


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ("{not json", r"data.jsonl:2, key 'implicit.sft_data': not valid JSON"),
        ({"messages": [U]}, r"data.jsonl:2, key 'implicit.sft_data': no assistant turn"),
        (
            {"messages": [{"role": "robot", "content": "x"}, A]},
            r":2, key 'implicit.sft_data': messages\[0\] has unknown role",
        ),
        ({"text": "plain"}, r":2, key 'implicit.sft_data': neither 'messages'"),
    ],
)
def test_sft_bad_record_names_file_line_and_key(tmp_path, bad, message):
    spec = jsonl(tmp_path, {"messages": [U, A]}, bad)
    with pytest.raises(FusemergeError, match=message):
        read_sft_data(spec=spec)


def test_missing_and_empty_files_are_errors(tmp_path):
    with pytest.raises(FusemergeError, match=r"nope.jsonl, key 'implicit.sft_data': not found"):
        read_sft_data(spec=DataFileSpec(path=str(tmp_path / "nope.jsonl")))
    (tmp_path / "empty.jsonl").write_text("\n", encoding="utf-8")
    with pytest.raises(FusemergeError, match="no preference pairs"):
        read_preference_data(spec=DataFileSpec(path=str(tmp_path / "empty.jsonl")))


def test_preference_formats_are_normalised_to_one_shape(tmp_path):
    spec = jsonl(
        tmp_path,
        # TRL conversational, explicit prompt, plus WRPO's target-chosen response
        {"prompt": [U], "chosen": [A], "rejected": [B], "chosen_target": [T]},
        # string prompt before conversational responses
        {"prompt": U["content"], "chosen": [A], "rejected": [B]},
        # implicit prompt: full conversations sharing the user turn (UltraFeedback, FuseChat-3.0's DPO set)
        {"prompt": U["content"], "chosen": [U, A], "rejected": [U, B], "chosen_target": [U, T]},
        {"chosen": [U, A], "rejected": [U, B]},
        # string responses after a conversational prompt; a single message given as an object
        {"prompt": [U], "chosen": A["content"], "rejected": B, "chosen_target": T["content"]},
    )
    pairs = read_preference_data(spec=spec)
    assert [p.line for p in pairs] == [1, 2, 3, 4, 5]
    for p in pairs:
        assert p.conversational
        assert (p.prompt, p.chosen, p.rejected) == ([U], [A], [B])
    assert [p.chosen_target for p in pairs] == [[T], None, [T], None, [T]]
    assert pairs[0].as_row() == {"prompt": [U], "chosen": [A], "rejected": [B]}
    assert pairs[0].as_row(with_target=True)["chosen_target"] == [T]


def test_multi_turn_prompts_keep_earlier_assistant_turns(tmp_path):
    earlier = [U, {"role": "assistant", "content": "4."}, {"role": "user", "content": "And times 3?"}]
    spec = jsonl(
        tmp_path, {"chosen": [*earlier, {"role": "assistant", "content": "12."}], "rejected": [*earlier, B]}
    )
    (pair,) = read_preference_data(spec=spec)
    assert pair.prompt == earlier
    assert pair.chosen == [{"role": "assistant", "content": "12."}] and pair.rejected == [B]


def test_standard_plain_text_pairs(tmp_path):
    spec = jsonl(
        tmp_path, {"prompt": "Q: 2+2?\nA:", "chosen": " 4", "rejected": " 5", "chosen_target": " four"}
    )
    (pair,) = read_preference_data(spec=spec)
    assert not pair.conversational
    assert (pair.prompt, pair.chosen, pair.rejected, pair.chosen_target) == (
        "Q: 2+2?\nA:",
        " 4",
        " 5",
        " four",
    )


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ({"prompt": [U], "chosen": [A]}, r"data.jsonl:2, key 'implicit.preference_data': no 'rejected'"),
        (
            {"prompt": [U], "chosen": [A], "rejected": [{"role": "bot", "content": "x"}]},
            r"'rejected\[0\].role' must be one of",
        ),
        (
            {"prompt": [U], "chosen": [{"role": "assistant", "content": "  "}], "rejected": [B]},
            r"'chosen\[0\].content' is empty",
        ),
        ({"prompt": [U, A], "chosen": [A], "rejected": [B]}, r"the prompt must end with a user turn"),
        ({"chosen": [A], "rejected": [B]}, r"'prompt' is missing and 'chosen' holds only the response"),
        ({"chosen": "4", "rejected": "5"}, r"'prompt' is missing \(plain-text"),
        ({"chosen": [U, A], "rejected": [{"role": "user", "content": "other"}, B]}, r"share no prompt"),
        (
            {"prompt": [U], "chosen": [A], "rejected": [B], "chosen_target": [U]},
            r"'chosen_target' must start with an assistant turn",
        ),
        ({"prompt": [U], "chosen": [A], "rejected": 7}, r"'rejected' must be a non-empty list"),
        ([1, 2], r"a record is a JSON object, got list"),
    ],
)
def test_preference_bad_record_names_file_line_and_key(tmp_path, bad, message):
    spec = jsonl(tmp_path, {"prompt": [U], "chosen": [A], "rejected": [B]}, bad)
    with pytest.raises(FusemergeError, match=message) as info:
        read_preference_data(spec=spec)
    assert info.value.line == 2 and info.value.key == "implicit.preference_data"
    assert "\n" not in str(info.value)


def test_preference_file_mixing_formats_is_an_error(tmp_path):
    spec = jsonl(
        tmp_path,
        {"prompt": [U], "chosen": [A], "rejected": [B]},
        {"prompt": "Q", "chosen": "4", "rejected": "5"},
    )
    with pytest.raises(FusemergeError, match=r"data.jsonl:2, .*mixes formats: line 1 is conversational"):
        read_preference_data(spec=spec)


def test_preference_limit_and_a_custom_key(tmp_path):
    spec = jsonl(tmp_path, *[{"prompt": [U], "chosen": [A], "rejected": [B]}] * 4)
    assert len(read_preference_data(spec=spec.model_copy(update={"limit": 3}))) == 3
    with pytest.raises(FusemergeError, match=r"key 'pairs.out'"):
        read_preference_data(spec=jsonl(tmp_path, {"chosen": [A]}, name="x.jsonl"), key="pairs.out")
