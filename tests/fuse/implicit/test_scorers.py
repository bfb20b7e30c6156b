"""Scorers: the code sandbox's failure modes, final-answer matching, a tiny reward model; the score step."""

from __future__ import annotations

import time

import pytest
from implicit_helpers import math_prompts, write_jsonl

from fusemerge.checkpoint.layout import read_state
from fusemerge.errors import FusemergeError
from fusemerge.fuse.implicit import sandbox
from fusemerge.fuse.implicit.prompts import read_prompts
from fusemerge.fuse.implicit.sample import SampleModel, run_sample, shard_name, stage_lines
from fusemerge.fuse.implicit.score import run_score, scorer_of, tie_break_of
from fusemerge.fuse.implicit.scorers import (
    SCORERS,
    ScoreItem,
    ScorerContext,
    answers_match,
    final_answer,
)
from fusemerge.fuse.implicit.spec import CodeTestsSpec, RewardModelSpec, SamplingSpec, ScoringSpec

QUIET = {"progress": False, "echo": lambda _: None}
ADD_TESTS = "assert add(2, 3) == 5\nassert add(-1, 1) == 0"
PROMPT = [{"role": "user", "content": "Write add(a, b) in Python."}]


def fenced(code: str) -> str:
    return f"Here is the code:\n```python\n{code}\n```\nIt adds."


def code_item(response: str, tests: str = ADD_TESTS) -> ScoreItem:
    return ScoreItem(prompt_id="p", prompt=PROMPT, response=response, domain="code", tests=tests)


# -- code_tests -----------------------------------------------------------------------------------------------
BAD_CODE = {
    "wrong": ("def add(a, b):\n    return a - b", "failed: AssertionError"),
    "timeout": ("def add(a, b):\n    while True:\n        pass", "timeout after 2s"),
    "sleeps": ("import time\ntime.sleep(60)\ndef add(a, b):\n    return a + b", "timeout after 2s"),
    "crash": ("import os, signal\nos.kill(os.getpid(), signal.SIGSEGV)", "crashed (SIGSEGV)"),
    "memory": ("hog = bytearray(4 * 1024**3)\ndef add(a, b):\n    return a + b", "memory limit"),
    "network": (
        "import socket\ntry:\n    socket.create_connection(('10.0.0.1', 80), timeout=1)\nexcept OSError:\n    pass\n"
        "def add(a, b):\n    return a + b",
        "network attempt",
    ),
    "raw socket": (
        "import socket\ntry:\n    socket.socket(socket.AF_INET, socket.SOCK_STREAM)\nexcept OSError:\n    pass\n"
        "def add(a, b):\n    return a + b",
        "network attempt (socket.__new__)",
    ),
    "spawn": (
        "import subprocess\nsubprocess.run(['true'])\ndef add(a, b):\n    return a + b",
        "process spawn",
    ),
    "exit": ("import sys\nsys.exit(3)", "failed: exit code 3"),
    "write outside": (
        "import os\nopen(os.path.join(os.sep, 'tmp', 'fusemerge-escape.txt'), 'w')\ndef add(a, b):\n    return a + b",
        "filesystem write outside the sandbox",
    ),
    "delete outside": (
        "import os\ntry:\n    os.remove('/tmp/fusemerge-no-such-file')\nexcept OSError:\n    pass\n"
        "def add(a, b):\n    return a + b",
        "filesystem change outside the sandbox (os.remove)",
    ),
}


def test_code_scorer_fails_what_misbehaves_and_the_run_carries_on():
    spec = ScoringSpec(default="code_tests", code_tests=CodeTestsSpec(timeout_s=2, memory_mb=512, workers=2))
    good = fenced("def add(a, b):\n    return a + b")
    items = [code_item(good)] + [code_item(fenced(code)) for code, _ in BAD_CODE.values()]
    items += [code_item("No code here, sorry."), code_item(good)]
    start = time.perf_counter()
    results = SCORERS.get("code_tests").fn(items, context=ScorerContext(spec, progress=False))
    elapsed = time.perf_counter() - start
    assert [r.passed for r in results] == [True] + [False] * len(BAD_CODE) + [False, True]
    assert [r.score for r in results] == [float(r.passed) for r in results]
    for result, (name, (_, expected)) in zip(results[1:], BAD_CODE.items(), strict=False):
        assert result.detail.startswith(expected), (name, result.detail)
    assert results[-2].detail == "no code block"
    assert elapsed < 2 * 2 + 20, "the two timeouts ran in parallel and nothing else hung"


def test_the_audit_hook_alone_stops_the_network(monkeypatch):
    """Without a network namespace (no `unshare` here), the audit hook still ends the attempt."""
    monkeypatch.setattr(sandbox, "network_isolation", lambda: ())
    code, expected = BAD_CODE["network"]
    outcome = sandbox.run_python_tests(code, ADD_TESTS, timeout_s=5, memory_mb=512)
    assert not outcome.passed and outcome.detail.startswith(expected)


def test_the_child_runs_isolated_in_an_empty_directory_it_may_write(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "secret")
    code = (
        "import os, sys\nassert os.listdir('.') == [], os.listdir('.')\nassert sys.flags.isolated == 1\n"
        "assert 'OPENAI_API_KEY' not in os.environ\n"
        "import tempfile, numpy\nwith open('scratch.txt', 'w') as f:\n    f.write('its own directory is writable')\n"
        "with tempfile.NamedTemporaryFile('w') as f:\n    f.write('and so is its TMPDIR')\n"
        "def add(a, b):\n    return a + b"
    )
    outcome = sandbox.run_python_tests(code, ADD_TESTS, timeout_s=5, memory_mb=512)
    assert outcome.passed, outcome.detail


def test_extract_code_takes_the_longest_python_block():
    response = "```python\nprint(add(1, 2))\n```\nand\n```py\ndef add(a, b):\n    return a + b\n```\n```bash\nrm -rf /\n```"
    assert sandbox.extract_code(response) == "def add(a, b):\n    return a + b\n"
    assert sandbox.extract_code("```bash\nls\n```") is None
    assert sandbox.extract_code("plain text") is None


def test_missing_tests_are_a_user_error():
    spec = ScoringSpec(default="code_tests")
    with pytest.raises(FusemergeError, match="no 'tests'"):
        SCORERS.get("code_tests").fn([code_item("x", tests="")], context=ScorerContext(spec))


# -- math_answer ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("response", "gold", "ok"),
    [
        ("So the answer is \\boxed{42}.", "42", True),
        ("\\boxed{\\frac{1}{2}}", "0.5", True),
        ("\\boxed{\\dfrac{3}{4}}", "\\frac{3}{4}", True),
        ("The total is 1,000 apples.", "1000", True),
        ("First 3, then 4, so 7", "7", True),
        ("First 7, then 4", "7", False),
        ("The answer is 7, I think.", "7", True),
        ("We get 12,345.5 in total", "12345.5", True),
        ("\\boxed{x^{2}+1}", "x^{2} + 1", True),
        ("\\boxed{\\text{(B)}}", "(B)", True),
        ("It is $-3.50$.", "-3.5", True),
        ("\\boxed{41}", "42", False),
        ("I do not know.", "42", False),
    ],
)
def test_math_answer_matches_final_answers(response, gold, ok):
    item = ScoreItem(prompt_id="m", prompt=PROMPT, response=response, domain="math", answer=gold)
    (result,) = SCORERS.get("math_answer").fn([item], context=ScorerContext(ScoringSpec()))
    assert result.passed is ok and result.score == float(ok)


def test_final_answer_prefers_the_last_box_and_balances_braces():
    assert final_answer("\\boxed{1} then \\boxed{\\frac{2}{3}} so 9") == "\\frac{2}{3}"
    assert final_answer("no digits") is None
    assert answers_match("7/2", "3.5") and not answers_match("", "")


def test_missing_gold_answer_is_a_user_error():
    item = ScoreItem(prompt_id="m", prompt=PROMPT, response="\\boxed{1}", domain="math")
    with pytest.raises(FusemergeError, match="prompt m .* no 'answer'"):
        SCORERS.get("math_answer").fn([item], context=ScorerContext(ScoringSpec()))


# -- reward_model -----------------------------------------------------------------------------------------------
def test_reward_model_scores_the_chat_in_its_own_template_batched_as_alone(reward_model_dir, qwen32k):
    import torch
    from transformers import AutoModelForSequenceClassification

    responses = ["Hello there.", "A much longer answer, with several clauses, to pad the batch.", "Hm", "4"]
    items = [ScoreItem(prompt_id=str(i), prompt=PROMPT, response=r) for i, r in enumerate(responses)]
    batched = ScoringSpec(reward_model=RewardModelSpec(model=str(reward_model_dir), batch_size=4))
    alone = ScoringSpec(reward_model=RewardModelSpec(model=str(reward_model_dir), batch_size=1))
    got = [
        r.score for r in SCORERS.get("reward_model").fn(items, context=ScorerContext(batched, progress=False))
    ]
    one = [
        r.score for r in SCORERS.get("reward_model").fn(items, context=ScorerContext(alone, progress=False))
    ]
    assert got == pytest.approx(one, abs=1e-5)
    assert len(set(round(s, 6) for s in got)) == len(got)
    # by hand: the reward model's own template over prompt + response, its logit at the last token
    lm = AutoModelForSequenceClassification.from_pretrained(reward_model_dir).eval()
    for item, score in zip(items, got, strict=True):
        text = qwen32k.apply_chat_template(
            [*PROMPT, {"role": "assistant", "content": item.response}], tokenize=False
        )
        ids = torch.tensor([qwen32k(text, add_special_tokens=False)["input_ids"]])
        with torch.inference_mode():
            assert lm(input_ids=ids).logits[0, 0].item() == pytest.approx(score, abs=1e-5)


def test_unknown_scorer_names_its_key_and_the_choices():
    from fusemerge.fuse.implicit.score import check_scorers

    check_scorers(ScoringSpec(domains={"math": "math_answer", "code": "code_tests"}))
    spec = ScoringSpec(domains={"math": "math_answer", "chess": "llm_judge"})
    with pytest.raises(
        FusemergeError, match="domains.chess'.*unknown scorer 'llm_judge'.*code_tests, math_answer"
    ):
        check_scorers(spec)


# -- the score step ---------------------------------------------------------------------------------------------
def test_score_step_scores_every_sample_resumes_and_refuses_stale(chat_models, reward_model_dir, tmp_path):
    prompts = read_prompts(path=str(write_jsonl(tmp_path / "p.jsonl", math_prompts(6))))
    spec = SamplingSpec(samples=2, max_new_tokens=5, batch_size=2, shard_size=2)
    samples = tmp_path / "samples" / "qwen"
    run_sample(
        model=SampleModel(name="qwen", model=str(chat_models["qwen"])),
        prompts=prompts,
        spec=spec,
        folder=samples,
        **QUIET,
    )
    scoring = ScoringSpec(
        domains={"math": "math_answer"}, reward_model=RewardModelSpec(model=str(reward_model_dir))
    )
    assert (
        scorer_of("math", spec=scoring) == "math_answer"
        and scorer_of("general", spec=scoring) == "reward_model"
    )
    assert tie_break_of(scoring) == "reward_model"
    folder = tmp_path / "scores" / "qwen"
    context = ScorerContext(scoring, progress=False)
    report = run_score(
        name="qwen", samples=samples, folder=folder, prompts=prompts, spec=scoring, context=context, **QUIET
    )
    assert report.shards_done == 3 and report.scored == 12
    lines = list(stage_lines(folder))
    assert [(x["prompt_id"], x["sample_index"], x["response"]) for x in lines] == [
        (x["prompt_id"], x["sample_index"], x["response"]) for x in stage_lines(samples)
    ]
    for line in lines:
        if line["domain"] == "math":
            assert line["scorer"] == "math_answer" and line["passed"] is False  # random models cannot add
            assert isinstance(line["tie_break"], float)
        else:
            assert line["scorer"] == "reward_model" and line["passed"] is None and line["tie_break"] is None
    # a lost shard is rescored to the same lines; a complete folder is skipped
    before = (folder / shard_name(1)).read_bytes()
    (folder / shard_name(1)).unlink()
    again = run_score(
        name="qwen", samples=samples, folder=folder, prompts=prompts, spec=scoring, context=context, **QUIET
    )
    assert again.shards_done == 1 and (folder / shard_name(1)).read_bytes() == before
    assert run_score(
        name="qwen", samples=samples, folder=folder, prompts=prompts, spec=scoring, context=context, **QUIET
    ).skipped
    assert read_state(folder)["complete"]
    # other scoring settings are refused; a different worker count is not a different result
    other = scoring.model_copy(update={"domains": {}})
    with pytest.raises(FusemergeError, match="different scoring"):
        run_score(name="qwen", samples=samples, folder=folder, prompts=prompts, spec=other, **QUIET)
    workers = scoring.model_copy(update={"code_tests": CodeTestsSpec(workers=7)})
    assert run_score(
        name="qwen", samples=samples, folder=folder, prompts=prompts, spec=workers, context=context, **QUIET
    ).skipped
