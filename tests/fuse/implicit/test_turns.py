"""Where an assistant turn ends: `sample` stores the content without a plain-text template's turn end, and
`sft` / `preference` end every turn on a stop token when the template writes none (the demo's template)."""

from __future__ import annotations

import copy

import pytest
from implicit_helpers import write_jsonl
from train_helpers import make_recipe

from fusemerge.demo.corpus import CHAT_TEMPLATE
from fusemerge.fuse.implicit import generate
from fusemerge.fuse.implicit.datasets import PreferencePair, SftRecord
from fusemerge.fuse.implicit.generate import Generation
from fusemerge.fuse.implicit.preference import (
    build_preference_trainer,
    preference_dataset,
    preference_student,
)
from fusemerge.fuse.implicit.prompts import read_prompts
from fusemerge.fuse.implicit.sample import SampleModel, run_sample, stage_lines
from fusemerge.fuse.implicit.sft import sft_dataset
from fusemerge.fuse.implicit.spec import SamplingSpec
from fusemerge.fuse.implicit.turns import TurnEnd, close_spans, strip_turn_end, turn_end
from fusemerge.lm.templates import BUILTIN_TEMPLATES
from fusemerge.offline.assets import build_random_model

QUIET = {"progress": False, "echo": lambda _: None}


@pytest.fixture(scope="module")
def plain_tokenizer(qwen_tokenizer):
    """Qwen's tokenizer with the demo's plain template: turns end with a blank line, no special token."""
    tok = copy.deepcopy(qwen_tokenizer)
    tok.chat_template = CHAT_TEMPLATE
    return tok


def test_turn_end_of_a_plain_template_and_of_chatml(plain_tokenizer, qwen_tokenizer):
    plain = turn_end(plain_tokenizer, CHAT_TEMPLATE)
    assert plain == TurnEnd(suffix="\n\n", text_before_stop="\n\n", eos=plain_tokenizer.eos_token)
    chatml = turn_end(qwen_tokenizer, BUILTIN_TEMPLATES["chatml"])
    assert chatml.suffix.startswith("<|im_end|>") and chatml.text_before_stop == "" and not chatml.needs_eos


def test_strip_turn_end_removes_only_the_templates_own_trailing_text():
    end = TurnEnd(suffix="\n\n", text_before_stop="\n\n", eos="</s>")
    assert strip_turn_end("28\n\n", end) == "28"
    assert strip_turn_end("a\n\nb", end) == "a\n\nb"  # a blank line inside the answer stays
    assert strip_turn_end("28\n\n", TurnEnd(suffix="<|im_end|>\n")) == "28\n\n"  # ChatML: nothing to strip


def test_close_spans_puts_the_stop_token_after_each_turn_end_inside_the_span():
    end = TurnEnd(suffix="\n\n", text_before_stop="\n\n", eos="<E>")
    text = "User: q\n\nAssistant: 28\n\nUser: r\n\nAssistant: 9\n\n"
    spans = ((text.index("28"), text.index("28") + 2), (text.index("9\n"), text.index("9\n") + 1))
    closed, new = close_spans(text, spans, end)
    assert closed == "User: q\n\nAssistant: 28\n\n<E>User: r\n\nAssistant: 9\n\n<E>"
    assert [closed[a:b] for a, b in new] == ["28\n\n<E>", "9\n\n<E>"]
    assert close_spans(text, spans, TurnEnd(suffix="<|im_end|>\n")) == (text, spans)


def test_sft_rows_of_a_plain_template_end_on_the_eos_with_loss(plain_tokenizer):
    """Before: the demo's SFT rows ended "28\\n\\n" with no stop token, and the target never stopped."""
    messages = [{"role": "user", "content": "What is 7 * 4?"}, {"role": "assistant", "content": "28"}]
    dataset, _, _ = sft_dataset(
        records=[SftRecord(1, messages)], tokenizer=plain_tokenizer, template=CHAT_TEMPLATE, max_length=64
    )
    ids, mask = dataset[0]["input_ids"], dataset[0]["assistant_masks"]
    learned = plain_tokenizer.decode([t for t, m in zip(ids, mask, strict=True) if m])
    assert ids[-1] == plain_tokenizer.eos_token_id and mask[-1] == 1
    assert learned == "28\n\n" + plain_tokenizer.eos_token


def test_preference_completions_of_a_plain_template_end_on_the_eos(plain_tokenizer, tmp_path):
    pivot = build_random_model(
        tmp_path / "pivot",
        architecture="qwen2",
        vocab_size=len(plain_tokenizer),
        tokenizer=plain_tokenizer,
        tie_word_embeddings=True,
        seed=3,
    )
    recipe = make_recipe(str(pivot))
    recipe = type(recipe)(**{**recipe.__dict__, "chat_template": "pivot"})
    pair = PreferencePair(
        line=1,
        prompt=[{"role": "user", "content": "What is 7 * 4?"}],
        chosen=[{"role": "assistant", "content": "28"}],
        rejected=[{"role": "assistant", "content": "21"}],
    )
    dataset, _, _ = preference_dataset(pairs=[pair], loss="dpo")
    trainer = build_preference_trainer(
        recipe=recipe,
        student=preference_student(recipe=recipe, policy=str(pivot)),
        tokenizer=plain_tokenizer,
        dataset=dataset,
        checkpoints=tmp_path / "ckpt",
        progress=False,
    )
    row = trainer.train_dataset[0]
    eos = plain_tokenizer.eos_token_id
    assert plain_tokenizer.decode(row["chosen_ids"]) == "28\n\n" + plain_tokenizer.eos_token
    assert row["rejected_ids"][-1] == eos and row["prompt_ids"][-1] != eos


class FakeGenerator:
    """Answers every prompt "28" followed by the template's blank line: once stopped, once cut by length."""

    def __init__(self, **_: object) -> None:
        pass

    def generate(self, prompts, counts, *, seed, on_batch=None):
        out = [[Generation("28\n\n", "stop", 3), Generation("28\n\n", "length", 3)][:c] for c in counts]
        if on_batch is not None:
            on_batch([g for gs in out for g in gs])
        return out

    def describe(self):
        return {"backend": "fake"}


def test_sample_stores_a_stopped_response_without_the_templates_turn_end(
    plain_tokenizer, tmp_path, monkeypatch
):
    """Before: "28\\n\\n" was stored, and the template wrote its blank line again when training on it."""
    model = tmp_path / "model"
    plain_tokenizer.save_pretrained(model)
    monkeypatch.setattr(generate, "TransformersGenerator", FakeGenerator)
    prompts = read_prompts(
        path=str(write_jsonl(tmp_path / "p.jsonl", [{"messages": [{"role": "user", "content": "7 * 4?"}]}]))
    )
    folder = tmp_path / "samples"
    run_sample(
        model=SampleModel(name="m", model=str(model)),
        prompts=prompts,
        spec=SamplingSpec(samples=2),
        folder=folder,
        **QUIET,
    )
    responses = {line["finish_reason"]: line["response"] for line in stage_lines(folder)}
    assert responses == {"stop": "28", "length": "28\n\n"}  # a cut-off response is left as generated


def test_turn_end_of_a_template_that_refuses_the_probe_changes_nothing(qwen_tokenizer):
    strict = "{{ raise_exception('needs a system turn') }}"
    assert turn_end(qwen_tokenizer, strict) == TurnEnd()
