"""The implicit-fusion demo's task: the addition and multiplication tables (1 to 9), answers a program checks.

Every fact `a + b` or `a * b` (a, b from 1 to 9: 81 facts per table) is asked as a prompt record with its
gold `answer`, scored by `math_answer` (the last number of the response against the gold), in three
wordings ("What is 7 * 8?", "Compute 7 * 8.", "What is 7 times 8?"):

    specialist  the whole of one table, many times over, in every wording: a source that knows its table
                and not the other
    pivot       a quarter of each table's facts: a pivot that knows a little of both
    fusion      every fact of both tables in two of the wordings, drawn per fact: the prompts the
                pipeline samples, scores, splits into SFT prompts and preference prompts, and trains on
    heldout     every fact of both tables in its third wording: prompts the pipeline never asked, which
                only the evaluation reads

So a fused target is evaluated on no prompt it was trained on: it answers a held-out prompt right only if
it knows the fact.

Every answer restates the fact in one canonical form, "7 * 8 = 56", whatever the wording (as chat models
restate a question before answering it). With bare answers ("56") each wording was its own question and
every fact shared one answer slot: the specialists, trained on their whole table in every wording,
answered 62% (addition) and 78% (multiplication) of it held-out and 36% / 53% in two wordings no model
saw; the SFT target, at the demo's settings, answered 38% of its new facts held-out and kept 31% of the
pivot's own (27.2% in all, below the pivot's 30.2%). Restated, the wording has only to be copied into
"7 * 8 =" and the fact is that one continuation, which every wording reaches and no other fact shares:
the specialists answer 100% / 99% of their table held-out (76% / 75% in the unseen wordings), the SFT
target 69% of its new facts and 65% of the pivot's (49.4% in all, the pivot 28.4%). The prompts and
the pivot's facts do not change with the form (`answer="bare"` builds the old texts, for comparison).

Each fact is asked in two wordings because FuseChat-3.0 splits prompts, not knowledge: its SFT and
preference sets are drawn from one prompt distribution, so each covers every skill. Asked once, the 4:6
split of the prompts was a 4:6 split of the facts: the SFT stage never saw 60% of them, and the pivot's
own facts among those fell from 100% to 37.5% under full fine-tuning on the other 40%. Asked twice,
about two thirds of the facts have an SFT prompt.

Why the tables, and not multi-digit arithmetic whose held-out problems would be new problems: a model
small enough to train on two CPU cores in seconds learns facts within a few hundred steps (a
multiplication specialist: 95% of its table after 680 steps), but long addition only after thousands
(two-digit addition: 2% after 950 steps, the loss still on its plateau). What the pipeline has to move
into the pivot is then exactly the sources' knowledge: the facts the pivot never saw. And two tables give
two sources that are each good at one part of the task and useless on the other.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from fusemerge.checkpoint.layout import atomic_write_text
from fusemerge.demo.corpus import record_text

DOMAINS = ("addition", "multiplication")
SYMBOL = {"addition": "+", "multiplication": "*"}
WORD = {"addition": "plus", "multiplication": "times"}
WORDINGS = ("What is {a} {symbol} {b}?", "Compute {a} {symbol} {b}.", "What is {a} {word} {b}?")


@dataclass(frozen=True)
class ArithmeticPlan:
    """The demo's data sizes; the defaults keep the whole demo within minutes on two CPU cores."""

    largest: int = 9  # the operands run from 1 to this (the tests' scaled-down run asks a 3 x 3 table)
    specialist_texts: int = 2400  # pre-training texts of each specialist (its table about 30 times over)
    pivot_share: float = 0.25  # of each table's facts, the pivot's pre-training holds this share
    pivot_texts: int = 1200  # pre-training texts of the pivot (its facts about 15 times over)
    # How an answer is written: "restated" ("7 * 8 = 56", the fact in one canonical form whatever the
    # wording) or "bare" ("56"). See the module docstring for why the demo restates.
    answer: Literal["restated", "bare"] = "restated"
    # Wordings the fusion prompts ask each fact in (the held-out prompts ask it in the others). Two, so
    # that a fact's prompts can fall on both sides of the SFT/preference split, as FuseChat-3.0's two
    # sets are drawn from one prompt distribution (see the module docstring).
    fusion_wordings: int = 2
    seed: int = 0


@dataclass
class ArithmeticData:
    """Pre-training texts per part and domain, and the two prompt files the pipeline and the eval read."""

    texts: dict[str, dict[str, list[str]]] = field(default_factory=dict)  # part -> domain -> texts
    pivot_facts: dict[str, list[tuple[int, int]]] = field(default_factory=dict)
    fusion_file: Path = Path()
    heldout_file: Path = Path()

    def pretraining_texts(self, part: str, domains: tuple[str, ...] = DOMAINS) -> list[str]:
        """The plain texts of one part, the domains interleaved in a fixed order."""
        out = [t for domain in domains for t in self.texts[part][domain]]
        random.Random(len(out)).shuffle(out)
        return out


def facts(largest: int = 9) -> list[tuple[int, int]]:
    """Every operand pair of a table (both tables have the same), in a fixed order."""
    return [(a, b) for a in range(1, largest + 1) for b in range(1, largest + 1)]


def gold(domain: str, a: int, b: int) -> int:
    return a + b if domain == "addition" else a * b


def question(domain: str, a: int, b: int, wording: str) -> str:
    return wording.format(a=a, b=b, symbol=SYMBOL[domain], word=WORD[domain])


def answer_text(domain: str, a: int, b: int, form: str = "restated") -> str:
    """The answer as the models learn to write it: "7 * 8 = 56" (restated) or "56" (bare)."""
    value = str(gold(domain, a, b))
    return f"{a} {SYMBOL[domain]} {b} = {value}" if form == "restated" else value


def prompt_record(domain: str, a: int, b: int, wording: str, *, prompt_id: str) -> dict:
    """One fact asked in one wording, with its gold answer (what `math_answer` checks)."""
    return {
        "prompt_id": prompt_id,
        "domain": domain,
        "answer": str(gold(domain, a, b)),
        "messages": [{"role": "user", "content": question(domain, a, b, wording)}],
    }


def fact_text(domain: str, a: int, b: int, wording: str, form: str = "restated") -> str:
    """One fact as pre-training text: the question and its answer, as the demo's chat template renders."""
    messages = [
        {"role": "user", "content": question(domain, a, b, wording)},
        {"role": "assistant", "content": answer_text(domain, a, b, form)},
    ]
    return record_text({"messages": messages})


def build_arithmetic(folder: str | Path, plan: ArithmeticPlan = ArithmeticPlan()) -> ArithmeticData:
    """Write `fusion.jsonl` and `heldout.jsonl` (prompts with gold answers) in `folder`; same files each run."""
    folder = Path(folder)
    data = ArithmeticData(texts={"pivot": {}, "specialist": {}})
    prompts: dict[str, list[dict]] = {"fusion": [], "heldout": []}
    for domain in DOMAINS:
        rng = random.Random(f"{plan.seed}:{domain}")
        table = facts(plan.largest)
        data.texts["specialist"][domain] = [
            fact_text(domain, *table[i % len(table)], rng.choice(WORDINGS), plan.answer)
            for i in range(plan.specialist_texts)
        ]
        known = rng.sample(table, round(plan.pivot_share * len(table)))
        data.pivot_facts[domain] = sorted(known)
        per_domain = plan.pivot_texts // len(DOMAINS)
        data.texts["pivot"][domain] = [
            fact_text(domain, *known[i % len(known)], rng.choice(WORDINGS), plan.answer)
            for i in range(per_domain)
        ]
        for a, b in table:
            fact = f"{domain}-{a}-{b}"
            if plan.fusion_wordings == 1:
                asked = [rng.randrange(len(WORDINGS))]
            else:
                asked = sorted(rng.sample(range(len(WORDINGS)), plan.fusion_wordings))
            prompts["fusion"] += [
                prompt_record(
                    domain, a, b, WORDINGS[k], prompt_id=fact if len(asked) == 1 else f"{fact}-ask{k}"
                )
                for k in asked
            ]
            prompts["heldout"] += [
                prompt_record(domain, a, b, w, prompt_id=f"{fact}-heldout{k}")
                for k, w in enumerate(WORDINGS)
                if k not in asked
            ]
    random.Random(plan.seed).shuffle(prompts["fusion"])
    data.fusion_file, data.heldout_file = folder / "fusion.jsonl", folder / "heldout.jsonl"
    folder.mkdir(parents=True, exist_ok=True)
    for part, path in (("fusion", data.fusion_file), ("heldout", data.heldout_file)):
        atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in prompts[part]))
    return data
