"""Scorers for `score`: how good one response to one prompt is. A new scorer is one registered function.

    @SCORERS.register("my_scorer")
    def my_scorer(items: Sequence[ScoreItem], *, context: ScorerContext) -> list[ScoreResult]: ...

A scorer takes a batch (a reward model amortises its forward over it, the code runner its processes) and
returns one `ScoreResult` per item: a score (higher is better), `passed` for verifiers (True/False; None
for a reward model) and a one-line `detail` a user can read in the stage file. `context.cache` keeps what
is expensive to load (the reward model) across shards and models.

- `reward_model`: any Hugging Face sequence-classification reward model (ArmoRM's `score` output too),
  batched, on the chat rendered with the reward model's own chat template.
- `math_answer`: the final answer (`\\boxed{...}`, else the last number) against the record's `answer`,
  compared as numbers when both are numbers (fractions, thousands separators, LaTeX wrappers removed).
- `code_tests`: the response's code and the record's `tests`, run in a sandboxed subprocess
  (`fusemerge.fuse.implicit.sandbox`); a timeout, crash, memory blow-up or network attempt fails it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

from fusemerge.errors import FusemergeError
from fusemerge.fuse.implicit.sandbox import cpu_count, extract_code, run_python_tests
from fusemerge.fuse.implicit.spec import ScoringSpec
from fusemerge.registry import Registry

Message = dict[str, str]


@dataclass(frozen=True)
class ScoreItem:
    """One response to score, with what its verifier needs from the prompt record."""

    prompt_id: str
    prompt: Sequence[Message]
    response: str
    domain: str = "general"
    answer: str | None = None
    tests: str | None = None


@dataclass(frozen=True)
class ScoreResult:
    score: float
    passed: bool | None = None  # verifiers only
    detail: str = ""


@dataclass
class ScorerContext:
    """What every scorer may use: the recipe's scoring section, the progress flag, a cache of loaded models."""

    spec: ScoringSpec
    progress: bool = True
    cache: dict[str, Any] = field(default_factory=dict)


Scorer = Callable[..., list[ScoreResult]]
SCORERS: Registry[Scorer] = Registry("scorer")


# -- reward model --------------------------------------------------------------------------------------------
class RewardModel:
    """A sequence-classification reward model: one scalar per (prompt, response) chat."""

    def __init__(self, spec: Any, *, progress: bool = True) -> None:
        import torch
        from transformers import AutoModelForSequenceClassification
        from transformers.utils import logging as hf_logging

        from fusemerge.lm.loading import load_tokenizer, resolve_device, resolve_dtype
        from fusemerge.lm.templates import resolve_render_template
        from fusemerge.lm.tokens import ChatTokenizer

        self.spec = spec
        self.torch = torch
        self.device = resolve_device(spec.device)
        dtype = resolve_dtype(spec.dtype, self.device)
        self.tokenizer = load_tokenizer(spec.model, trust_remote_code=spec.trust_remote_code)
        self.template = resolve_render_template("pivot", self.tokenizer)  # the reward model's own template
        self.chat_tokenizer = ChatTokenizer(self.tokenizer)
        bars = hf_logging.is_progress_bar_enabled()
        if not progress:
            hf_logging.disable_progress_bar()
        try:
            lm = AutoModelForSequenceClassification.from_pretrained(
                spec.model,
                dtype=getattr(torch, dtype),
                trust_remote_code=spec.trust_remote_code,
                use_safetensors=True,
            )
        except (OSError, ValueError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise FusemergeError(
                f"cannot load the reward model: {first}", file=spec.model, key="scoring.reward_model"
            ) from exc
        finally:
            if bars:
                hf_logging.enable_progress_bar()
        pad = lm.config.pad_token_id
        if pad is None:  # the pooling finds each row's last real token by the pad id
            pad = (
                self.tokenizer.pad_token_id
                if self.tokenizer.pad_token_id is not None
                else self.tokenizer.eos_token_id
            )
            lm.config.pad_token_id = pad
        self.pad = int(pad if pad is not None else 0)
        self.lm = lm.to(self.device).eval()

    def token_ids(self, prompt: Sequence[Message], response: str) -> list[int]:
        """The chat (prompt + the response as the assistant's turn) in the reward model's own template.

        Rendered with `apply_chat_template` rather than `render_conversation`: a reward needs the text
        only, and the assistant spans that `render_conversation` locates would make a response that a
        template rewrites (a reasoning block it strips) a fatal error instead of a score.
        """
        from fusemerge.lm.chat import ChatSequence

        messages = [*prompt, {"role": "assistant", "content": response}]
        try:
            text = self.tokenizer.apply_chat_template(messages, chat_template=self.template, tokenize=False)
        except Exception as exc:  # jinja's own errors, and templates that call raise_exception
            raise FusemergeError(
                f"the reward model's chat template refused a chat: {exc}", key="scoring.reward_model"
            ) from exc
        ids, _ = self.chat_tokenizer(ChatSequence(record=0, text=text, spans=()))
        return [int(i) for i in ids[: self.spec.max_length]]  # the head of a too-long chat

    def score(self, items: Sequence[ScoreItem]) -> list[float]:
        """Scores in item order; batches of `batch_size` chats of similar length, right-padded."""
        torch = self.torch
        ids = [self.token_ids(it.prompt, it.response) for it in items]
        order = sorted(range(len(ids)), key=lambda i: (len(ids[i]), i))
        out = [0.0] * len(ids)
        size = self.spec.batch_size
        for start in range(0, len(order), size):
            chunk = order[start : start + size]
            width = max(len(ids[i]) for i in chunk)
            input_ids = torch.full((len(chunk), width), self.pad, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for r, i in enumerate(chunk):
                input_ids[r, : len(ids[i])] = torch.tensor(ids[i])
                mask[r, : len(ids[i])] = 1
            with torch.inference_mode():
                output = self.lm(input_ids=input_ids.to(self.device), attention_mask=mask.to(self.device))
            values = getattr(output, "score", None)  # ArmoRM's custom output
            if values is None:
                logits = output.logits
                if logits.shape[-1] != 1:
                    raise FusemergeError(
                        f"a reward model has one output; this one has {logits.shape[-1]} labels",
                        file=self.spec.model,
                        key="scoring.reward_model.model",
                    )
                values = logits[:, 0]
            for r, i in enumerate(chunk):
                out[i] = float(values.reshape(len(chunk), -1)[r, 0])
        return out


@SCORERS.register(
    "reward_model",
    pretty_name="reward model (sequence classification)",
    reference_url="https://huggingface.co/RLHFlow/ArmoRM-Llama3-8B-v0.1",
)
def reward_model(items: Sequence[ScoreItem], *, context: ScorerContext) -> list[ScoreResult]:
    """Score every response with `scoring.reward_model`, loaded once per context.

    Args:
        items: the responses.
        context: the scoring section and the model cache.
    """
    if context.spec.reward_model is None:
        raise FusemergeError("scoring uses reward_model: give scoring.reward_model.model", key="scoring")
    rm = context.cache.get("reward_model")
    if rm is None:
        rm = context.cache["reward_model"] = RewardModel(context.spec.reward_model, progress=context.progress)
    return [ScoreResult(score=s, detail=f"reward {s:.4f}") for s in rm.score(items)]


# -- math ------------------------------------------------------------------------------------------------------
_NUMBER = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?(?:/\d+)?|-?\.\d+")  # 1,000 is one number; "7, so" is 7


def boxed_contents(text: str) -> str | None:
    """The contents of the last `\\boxed{...}` (or `\\fbox{...}`), braces balanced; None when there is none."""
    start = max(text.rfind("\\boxed{"), text.rfind("\\fbox{"))
    if start < 0:
        return None
    i = text.index("{", start) + 1
    depth = 1
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j]
    return None


def final_answer(text: str) -> str | None:
    """A response's final answer: the last boxed expression, else the last number in the text."""
    boxed = boxed_contents(text)
    if boxed is not None:
        return boxed
    numbers = _NUMBER.findall(text)
    return numbers[-1] if numbers else None


def normalise_answer(answer: str) -> str:
    """LaTeX and formatting removed, so that `$\\frac{1}{2}$`, `\\dfrac12`-like forms and `0.5` can meet."""
    s = answer.strip()
    inner = boxed_contents(s)
    s = inner if inner is not None else s
    s = re.sub(r"\\text\{([^{}]*)\}", r"\1", s)
    s = re.sub(r"\\[dt]frac", r"\\frac", s)
    s = re.sub(r"\\frac\{([^{}]*)\}\{([^{}]*)\}", r"(\1)/(\2)", s)
    for token in ("\\left", "\\right", "\\!", "\\,", "\\;", "\\ ", "$", "^\\circ", "^{\\circ}", "\\%", "%"):
        s = s.replace(token, "")
    s = s.replace(" ", "").rstrip(".")
    s = re.sub(r"^\((-?[\d.]+)\)/\((-?[\d.]+)\)$", r"\1/\2", s)
    return s


def answer_value(answer: str) -> Fraction | None:
    """The answer as an exact number when it is one (`1,000`, `-3.5`, `7/2`), else None."""
    s = answer.replace("(", "").replace(")", "")
    if re.fullmatch(r"-?\d{1,3}(,\d{3})+(\.\d+)?", s):
        s = s.replace(",", "")
    try:
        value = Fraction(s)
    except (ValueError, ZeroDivisionError):
        return None
    return value


def answers_match(predicted: str, gold: str) -> bool:
    """Equal as numbers (to 1e-6 relative), else equal as normalised strings."""
    a, b = normalise_answer(predicted), normalise_answer(gold)
    va, vb = answer_value(a), answer_value(b)
    if va is not None and vb is not None:
        return math.isclose(float(va), float(vb), rel_tol=1e-6, abs_tol=1e-9)
    return a == b and a != ""


@SCORERS.register("math_answer", pretty_name="final-answer match", reference_url=None)
def math_answer(items: Sequence[ScoreItem], *, context: ScorerContext) -> list[ScoreResult]:
    """1 when the response's final answer matches the record's gold `answer`, else 0.

    Args:
        items: the responses; each prompt record needs an `answer`.
        context: unused (the scorer needs nothing loaded).
    """
    results = []
    for it in items:
        if it.answer is None:
            raise FusemergeError(
                f"prompt {it.prompt_id} (domain {it.domain}) has no 'answer' for math_answer", key="dataset"
            )
        got = final_answer(it.response)
        if got is None:
            results.append(ScoreResult(0.0, False, "no final answer"))
            continue
        ok = answers_match(got, it.answer)
        sign = "=" if ok else "!="
        results.append(ScoreResult(float(ok), ok, f"answer {got.strip()[:40]} {sign} gold {it.answer[:40]}"))
    return results


# -- code ------------------------------------------------------------------------------------------------------
@SCORERS.register("code_tests", pretty_name="code run against the record's tests", reference_url=None)
def code_tests(items: Sequence[ScoreItem], *, context: ScorerContext) -> list[ScoreResult]:
    """1 when the response's code passes the record's tests in the sandbox, else 0; parallel workers.

    Args:
        items: the responses; each prompt record needs `tests`.
        context: `scoring.code_tests` (time and memory limits, workers).
    """
    spec = context.spec.code_tests
    for it in items:
        if not it.tests:
            raise FusemergeError(
                f"prompt {it.prompt_id} (domain {it.domain}) has no 'tests' for code_tests", key="dataset"
            )

    def one(it: ScoreItem) -> ScoreResult:
        code = extract_code(it.response)
        if code is None:
            return ScoreResult(0.0, False, "no code block")
        outcome = run_python_tests(code, it.tests or "", timeout_s=spec.timeout_s, memory_mb=spec.memory_mb)
        return ScoreResult(float(outcome.passed), outcome.passed, outcome.detail)

    workers = max(1, min(spec.workers or cpu_count(), len(items) or 1))
    with ThreadPoolExecutor(max_workers=workers) as pool:  # threads only wait on their child processes
        return list(pool.map(one, items))
