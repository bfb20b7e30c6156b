"""The implicit-fusion demo's task: two-digit addition and subtraction, answers a program can check.

Every problem `a + b` or `a - b` (two-digit operands, subtraction never below zero) is one prompt record
with its gold `answer`, scored by `math_answer` (the last number of the response against the gold). The
problems of each domain are shuffled once with a fixed seed and split into disjoint parts, so that no
number in the demo's table comes from a problem a model was trained on:

    specialist  problems the domain's source specialist is pre-trained on (most of them)
    pivot       problems of the pivot's light pre-training (a few of each domain)
    fusion      prompts the implicit pipeline samples, scores and trains on (SFT and preference)
    heldout     prompts only the evaluation answers

Why arithmetic: the verdict on an answer is exact, so the table measures what the pipeline moved into the
pivot (the sources' skill) without a reward model's own errors; and two operations give two sources that
are good at different parts of the task, each one useless on the other's.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

from fusemerge.checkpoint.layout import atomic_write_text
from fusemerge.demo.corpus import record_text

DOMAINS = ("addition", "subtraction")
SYMBOL = {"addition": "+", "subtraction": "-"}
PROMPTS = ("What is {q}?", "Compute {q}.", "Work out {q}.", "{q} = ?")


@dataclass(frozen=True)
class ArithmeticSplit:
    """How many problems of one domain go to each part; the rest of the domain is left unused."""

    heldout: int
    fusion: int
    pivot: int
    specialist: int


@dataclass(frozen=True)
class ArithmeticPlan:
    """The demo's data sizes; the defaults keep the whole demo within minutes on two CPU cores."""

    split: ArithmeticSplit = ArithmeticSplit(heldout=150, fusion=450, pivot=150, specialist=2400)
    seed: int = 0


@dataclass
class ArithmeticData:
    """Pre-training texts per part and domain, and the two prompt files the pipeline and the eval read."""

    texts: dict[str, dict[str, list[str]]] = field(default_factory=dict)  # part -> domain -> texts
    fusion_file: Path = Path()
    heldout_file: Path = Path()

    def pretraining_texts(self, part: str, domains: tuple[str, ...] = DOMAINS) -> list[str]:
        """The plain texts of one part, the domains interleaved in a fixed order."""
        out = [t for domain in domains for t in self.texts[part][domain]]
        random.Random(len(out)).shuffle(out)
        return out


def problems(domain: str) -> list[tuple[int, int]]:
    """Every operand pair of a domain, in a fixed order (subtraction: a >= b, so no negative answers)."""
    pairs = [(a, b) for a in range(10, 100) for b in range(10, 100)]
    return pairs if domain == "addition" else [(a, b) for a, b in pairs if a >= b]


def record(domain: str, a: int, b: int, rng: random.Random) -> dict:
    """One problem as a prompt record (with its gold answer) and the worked reply the specialists learn."""
    q = f"{a} {SYMBOL[domain]} {b}"
    answer = a + b if domain == "addition" else a - b
    return {
        "prompt_id": f"{domain}-{a}-{b}",
        "domain": domain,
        "answer": str(answer),
        "messages": [
            {"role": "user", "content": rng.choice(PROMPTS).format(q=q)},
            {"role": "assistant", "content": str(answer)},
        ],
    }


def prompt_only(rec: dict) -> dict:
    """The record without its reply: what the models are asked (the gold answer stays, for the scorer)."""
    return {**rec, "messages": rec["messages"][:1]}


def build_arithmetic(folder: str | Path, plan: ArithmeticPlan = ArithmeticPlan()) -> ArithmeticData:
    """Split both domains; write `fusion.jsonl` and `heldout.jsonl` (prompts with gold answers) in `folder`."""
    folder = Path(folder)
    data = ArithmeticData(texts={"pivot": {}, "specialist": {}})
    prompts: dict[str, list[dict]] = {"fusion": [], "heldout": []}
    s = plan.split
    for domain in DOMAINS:
        rng = random.Random(f"{plan.seed}:{domain}")
        pairs = problems(domain)
        rng.shuffle(pairs)
        need = s.heldout + s.fusion + s.pivot + s.specialist
        if len(pairs) < need:
            raise ValueError(f"the {domain} domain has {len(pairs)} problems, the demo's split needs {need}")
        records = [record(domain, a, b, rng) for a, b in pairs[:need]]
        cuts = [0, s.heldout, s.heldout + s.fusion, s.heldout + s.fusion + s.pivot, need]
        prompts["heldout"] += [prompt_only(r) for r in records[cuts[0] : cuts[1]]]
        prompts["fusion"] += [prompt_only(r) for r in records[cuts[1] : cuts[2]]]
        data.texts["pivot"][domain] = [record_text(r) for r in records[cuts[2] : cuts[3]]]
        data.texts["specialist"][domain] = [record_text(r) for r in records[cuts[3] : cuts[4]]]
    random.Random(plan.seed).shuffle(prompts["fusion"])
    data.fusion_file, data.heldout_file = folder / "fusion.jsonl", folder / "heldout.jsonl"
    folder.mkdir(parents=True, exist_ok=True)
    for part, path in (("fusion", data.fusion_file), ("heldout", data.heldout_file)):
        atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in prompts[part]))
    return data
