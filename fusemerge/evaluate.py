"""`fusemerge eval`: held-out cross-entropy of several models on the assistant turns of chat data.

    fusemerge eval pivot/ fused/ merged/ --data heldout.jsonl
    fusemerge eval pivot/ merged/ --data code.jsonl --data chat.jsonl --json > scores.json
    fusemerge eval merged/ --data heldout.jsonl --save-to merged/    # the model card picks it up

    from fusemerge.evaluate import evaluate_models
    report = evaluate_models(["pivot/", "merged/"], ["heldout.jsonl"])
    print(report.table())

Why bits per byte: nats per token depend on the tokenizer (a tokenizer with longer tokens has fewer,
harder predictions), so models of different tokenizers cannot be ranked by it. Every model therefore reads
the *same text* (each conversation rendered once, with one chat template: the first model's unless
`chat_template` says otherwise, as FuseChat does with the pivot's) and the summed negative log-likelihood of
its assistant tokens, in bits, is divided by the UTF-8 bytes of the assistant text those tokens cover. Nats
per token and perplexity are reported too, for comparisons within one tokenizer. An assistant turn's text
includes the special token that ends it in the rendered text (`<|im_end|>` with ChatML, 10 bytes), as in
fusion's training mask (`fusemerge.fuse.data.render_conversation`).

Domains: a record's `domain` field (`domain_field`), else the file's stem, so one file per domain works.

Unknown tokens: a model whose tokenizer maps part of the text to `<unk>` predicts one token for many
different bytes, so its bits per byte is low for the wrong reason (a random 3-word `<unk>` model scores
0.4 against a real tokenizer's 4). Each score keeps the assistant bytes its unknown tokens cover
(`fusemerge.lm.unknown`, the measure fuse refuses such teachers by); above `UNKNOWN_SHARE_LIMIT` of the
bytes the table marks the model's bits/byte with `!` and says it is not comparable, and the JSON lists it
under `not_comparable`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fusemerge import __version__
from fusemerge.errors import FusemergeError
from fusemerge.lm.chat import ChatSequence, read_records
from fusemerge.lm.chat_data import render_records
from fusemerge.lm.templates import resolve_render_template
from fusemerge.lm.tokens import ChatTokenizer
from fusemerge.lm.unknown import UNKNOWN_SHARE_LIMIT, unknown_bytes
from fusemerge.progress import progress_bar

EVAL_FILE = "fusemerge_eval.json"
ALL = "all"
# Eval's own model settings, stated here so that a change to the teacher pass's defaults never moves a
# score: float32 logits held at once (rows x vocab, 128 MiB), no remote code, no 4-bit.
LOGITS_BUDGET = 2**25
TRUST_REMOTE_CODE = False


@dataclass
class Score:
    """Sums over one model's assistant tokens in one domain; the ratios are derived from them."""

    sequences: int = 0
    tokens: int = 0
    bytes: int = 0
    nll_nats: float = 0.0
    unknown_bytes: int = 0  # of `bytes`, those the model's unknown token (<unk>) stands for

    @property
    def unknown_share(self) -> float:
        return min(1.0, self.unknown_bytes / self.bytes) if self.bytes else 0.0

    @property
    def comparable(self) -> bool:
        """False when unknown tokens cover so much of the text that bits per byte means little."""
        return self.unknown_share <= UNKNOWN_SHARE_LIMIT

    @property
    def nats_per_token(self) -> float:
        return self.nll_nats / self.tokens if self.tokens else float("nan")

    @property
    def perplexity(self) -> float:
        return math.exp(self.nats_per_token) if self.tokens else float("nan")

    @property
    def bits_per_token(self) -> float:
        return self.nats_per_token / math.log(2)

    @property
    def bits_per_byte(self) -> float:
        return self.nll_nats / math.log(2) / self.bytes if self.bytes else float("nan")

    def add(self, other: Score) -> None:
        self.sequences += other.sequences
        self.tokens += other.tokens
        self.bytes += other.bytes
        self.nll_nats += other.nll_nats
        self.unknown_bytes += other.unknown_bytes


@dataclass
class EvalReport:
    """Scores per (model, domain), plus an `all` row per model; printable and JSON round-trippable."""

    models: list[str]
    domains: list[str]
    scores: dict[tuple[str, str], Score]
    chat_template: str = "first model"
    names: dict[str, str] = field(default_factory=dict)

    def score(self, model: str, domain: str = ALL) -> Score:
        return self.scores[(model, domain)]

    def name(self, model: str) -> str:
        return self.names.get(model) or model

    @property
    def not_comparable(self) -> list[str]:
        """The models whose unknown tokens cover more than UNKNOWN_SHARE_LIMIT of the scored bytes."""
        return [m for m in self.models if (m, ALL) in self.scores and not self.scores[(m, ALL)].comparable]

    def table(self) -> str:
        """A terminal table: one row per domain, per model bits/byte, nats/token and perplexity."""
        sub = ("bits/byte", "nats/tok", "ppl")
        widths = [max(len(self.name(m)), 3 * 10 + 2) for m in self.models]
        rows = [*self.domains, ALL] if len(self.domains) > 1 else list(self.domains)
        dom_w = max(len("domain"), *(len(d) for d in rows))
        line1 = (
            " " * dom_w
            + "  "
            + "  ".join(self.name(m).center(w) for m, w in zip(self.models, widths, strict=True))
        )
        line2 = (
            "domain".ljust(dom_w)
            + "  "
            + "  ".join(" ".join(s.rjust(10) for s in sub).rjust(w) for w in widths)
        )
        out = [line1.rstrip(), line2, "-" * len(line2)]
        flagged = self.not_comparable
        for d in rows:
            cells = []
            for m, w in zip(self.models, widths, strict=True):
                s = self.scores[(m, d)]
                bpb = f"{s.bits_per_byte:10.4f}" if m not in flagged else f"{s.bits_per_byte:9.4f}!"
                cells.append(f"{bpb} {s.nats_per_token:10.4f} {_fmt_ppl(s.perplexity):>10}".rjust(w))
            out.append(d.ljust(dom_w) + "  " + "  ".join(cells))
        out.append(
            "bits/byte: lower is better, comparable across tokenizers; nats/tok and ppl per model's tokens"
        )
        for m in flagged:
            share = self.scores[(m, ALL)].unknown_share
            out.append(
                f"! {self.name(m)}: {share:.1%} of its scored bytes are unknown tokens (<unk>): its bits/byte "
                f"is low for the wrong reason and not comparable (more than {UNKNOWN_SHARE_LIMIT:.0%}); do not "
                "rank it"
            )
        return "\n".join(out)

    def to_dict(self) -> dict[str, Any]:
        results = []
        for (model, domain), s in self.scores.items():
            results.append(
                {
                    "model": model,
                    "name": self.name(model),
                    "domain": domain,
                    **asdict(s),
                    "nats_per_token": s.nats_per_token,
                    "bits_per_token": s.bits_per_token,
                    "perplexity": s.perplexity,
                    "bits_per_byte": s.bits_per_byte,
                    "unknown_share": s.unknown_share,
                }
            )
        return {
            "fusemerge_version": __version__,
            "chat_template": self.chat_template,
            "models": self.models,
            "domains": self.domains,
            "not_comparable": self.not_comparable,
            "results": results,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str | dict[str, Any]) -> EvalReport:
        data = json.loads(text) if isinstance(text, str) else text
        try:
            scores = {
                (r["model"], r["domain"]): Score(
                    r["sequences"], r["tokens"], r["bytes"], r["nll_nats"], r.get("unknown_bytes", 0)
                )
                for r in data["results"]
            }
            names = {r["model"]: r.get("name", r["model"]) for r in data["results"]}
            return cls(
                list(data["models"]), list(data["domains"]), scores, data.get("chat_template", ""), names
            )
        except (KeyError, TypeError) as exc:
            raise FusemergeError(f"not a fusemerge eval report (missing {exc})") from exc

    def save(self, folder: str | Path) -> Path:
        """Write `fusemerge_eval.json` into a model folder, where the model card and `push` find it."""
        from fusemerge.checkpoint.layout import atomic_write_text

        out = check_save_to(folder) / EVAL_FILE
        atomic_write_text(out, self.to_json())
        return out


def check_save_to(folder: str | Path) -> Path:
    """The `--save-to` folder, refused unless it exists and can be written: checked before evaluating."""
    import os
    import tempfile

    path = Path(folder)
    if not path.is_dir():
        raise FusemergeError(
            "--save-to must be an existing folder (the model folder the scores are for)", file=path
        )
    try:
        fd, probe = tempfile.mkstemp(prefix=".fusemerge-probe-", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise FusemergeError(
            f"--save-to folder cannot be written: {exc.strerror or exc}", file=path
        ) from None
    return path


def _fmt_ppl(value: float) -> str:
    return f"{value:.4g}" if value < 1e5 else f"{value:.3e}"


# ---------------------------------------------------------------- data


@dataclass(frozen=True)
class EvalSequence:
    domain: str
    seq: ChatSequence


def load_eval_data(
    data_files: Sequence[str | Path],
    render_tokenizer: Any,
    *,
    chat_template: str = "pivot",
    domain_field: str = "domain",
    max_length: int = 2048,
) -> list[EvalSequence]:
    """Every conversation of every file, rendered once, tagged with its domain; a bad record is an error.

    Long conversations are split between rounds, as for fusion (`split_long`).
    """
    out: list[EvalSequence] = []
    for file in data_files:
        path = Path(file)
        if not path.is_file():
            raise FusemergeError("data file not found (a .jsonl file of chat records)", file=path)
        domains = {
            number: str(rec[domain_field])
            for number, rec in read_records(path)
            if isinstance(rec, dict) and rec.get(domain_field) not in (None, "")
        }
        try:
            data = render_records(
                read_records(path),
                render_tokenizer,
                resolve_render_template(chat_template, render_tokenizer),
                file=str(path),
                fmt="auto",
                max_length=max_length,
                split_long=True,
                on_bad_record="error",
                limit=None,
            )
        except FusemergeError as exc:
            if exc.key == "chat_template":
                raise FusemergeError(
                    exc.message.replace("the pivot's tokenizer", "the first model's tokenizer").replace(
                        "set chat_template to", "pass --chat-template"
                    ),
                    key="--chat-template",
                ) from exc
            raise
        out.extend(EvalSequence(domains.get(s.record, path.stem), s) for s in data.sequences)
    if not out:
        raise FusemergeError("no data: pass at least one --data FILE")
    return out


def scored_positions(seq: ChatSequence, chat_tok: ChatTokenizer) -> tuple[np.ndarray, np.ndarray, int]:
    """(ids, indices of scored tokens, UTF-8 bytes they cover) for one model.

    A token is scored when it is an assistant token and not the first of the sequence (it needs a
    prediction). The bytes are those of the characters the scored tokens cover (their offsets, merged);
    a tokenizer without offsets is cut at the span boundaries, so its scored tokens cover the spans exactly.
    """
    ids, mask, offsets = chat_tok.with_offsets(seq)
    mask = mask.copy()
    if len(mask):
        mask[0] = False
    idx = np.flatnonzero(mask)
    if offsets is None:
        covered = [(s, e) for s, e in seq.spans]
    else:
        covered = sorted((int(offsets[i, 0]), int(offsets[i, 1])) for i in idx)
    total, end = 0, 0
    for a, b in covered:
        a = max(a, end)
        if b > a:
            total += len(seq.text[a:b].encode("utf-8"))
            end = b
    return ids, idx, total


# ---------------------------------------------------------------- models


def evaluate_models(
    models: Sequence[str | Path],
    data_files: Sequence[str | Path],
    *,
    domain_field: str = "domain",
    chat_template: str | None = None,
    batch_size: int = 8,
    device: str = "auto",
    dtype: str = "auto",
    max_length: int = 2048,
    allow_pickle: bool = False,
    progress: bool = True,
) -> EvalReport:
    """Score each model on the assistant tokens of the chat data, per domain.

    Args:
        models: model folders (safetensors) or Hub ids in the local cache.
        data_files: JSONL files of OpenAI (`messages`) or ShareGPT (`conversations`) records.
        domain_field: the record key naming its domain; records without it take their file's stem.
        chat_template: how conversations are rendered for every model: None for the first model's own,
            a built-in name ("chatml", "openchat") or a .jinja file.
        batch_size: sequences per forward pass.
        device: "auto" (a GPU when present), "cpu", "cuda", "cuda:N".
        dtype: "auto" (bfloat16 on a GPU, float32 on the CPU), "float32", "bfloat16", "float16".
        max_length: longest sequence in tokens of the first model; longer conversations are split
            between rounds, as for fusion.
        allow_pickle: accept pickle checkpoints (they can run code when loaded).
        progress: one progress bar per model.
    """
    from fusemerge.lm.loading import load_tokenizer

    refs = [str(m) for m in models]
    if not refs:
        raise FusemergeError("no model to evaluate")
    for ref in refs:
        _check_model_ref(ref, allow_pickle=allow_pickle)
    tokenizers = [load_tokenizer(ref, trust_remote_code=TRUST_REMOTE_CODE) for ref in refs]
    data = load_eval_data(
        data_files,
        tokenizers[0],
        chat_template=chat_template or "pivot",
        domain_field=domain_field,
        max_length=max_length,
    )
    domains = sorted({s.domain for s in data})
    scores: dict[tuple[str, str], Score] = {}
    for ref, tok in zip(refs, tokenizers, strict=True):
        per_domain = _score_model(ref, tok, data, batch_size, device, dtype, allow_pickle, progress)
        total = Score()
        for d in domains:
            scores[(ref, d)] = per_domain.get(d, Score())
            total.add(scores[(ref, d)])
        scores[(ref, ALL)] = total
    return EvalReport(refs, domains, scores, chat_template or "first model", _short_names(refs))


def _check_model_ref(ref: str, *, allow_pickle: bool) -> None:
    from fusemerge.lm.loading import check_weights

    path = Path(ref)
    if path.is_dir():
        check_weights(ref, allow_pickle=allow_pickle, option="pass --allow-pickle")
        return
    looks_like_hub_id = ref.count("/") == 1 and not ref.startswith((".", "/", "~"))
    if path.exists() or not looks_like_hub_id:
        raise FusemergeError("model folder not found", file=path)


def _short_names(refs: list[str]) -> dict[str, str]:
    names = {r: Path(r).name or r for r in refs}
    if len(set(names.values())) < len(refs):
        return {r: r for r in refs}
    return names


def _score_model(
    ref: str,
    tok: Any,
    data: list[EvalSequence],
    batch_size: int,
    device: str,
    dtype: str,
    allow_pickle: bool,
    progress: bool,
) -> dict[str, Score]:
    import torch

    from fusemerge.lm.forward import topk_forward
    from fusemerge.lm.loading import load_causal_lm, resolve_device, resolve_dtype
    from fusemerge.lm.padding import pad_right, pad_token_id

    device = resolve_device(device)
    lm = load_causal_lm(
        ref,
        dtype=resolve_dtype(dtype, device),
        allow_pickle=allow_pickle,
        trust_remote_code=TRUST_REMOTE_CODE,
        progress=progress,
    )
    lm = lm.to(device).eval()
    chat_tok = ChatTokenizer(tok)
    pad = pad_token_id(tok)
    prepared = [
        (item.domain, *scored_positions(item.seq, chat_tok), unknown_bytes(item.seq, chat_tok)[0])
        for item in data
    ]
    order = sorted(range(len(prepared)), key=lambda i: len(prepared[i][1]))
    scores: dict[str, Score] = {}
    bar = progress_bar(len(order), Path(ref).name or ref, enabled=progress)
    try:
        for a in range(0, len(order), batch_size):
            batch = [prepared[i] for i in order[a : a + batch_size]]
            input_ids, attention = pad_right([ids for _, ids, _, _, _ in batch], pad)
            _, _, next_lp = topk_forward(
                lm,
                torch.from_numpy(input_ids).to(device),
                torch.from_numpy(attention).to(device),
                top_k=1,
                logits_budget=LOGITS_BUDGET,
            )
            next_lp = next_lp.double().cpu().numpy()
            start = 0
            for domain, ids, idx, nbytes, unk in batch:
                lp = next_lp[start : start + len(ids)]
                start += len(ids)
                s = scores.setdefault(domain, Score())
                s.sequences += 1
                s.tokens += len(idx)
                s.bytes += nbytes
                s.nll_nats += float(-lp[idx - 1].sum())
                s.unknown_bytes += unk
            bar.update(len(batch))
    finally:
        bar.close()
        del lm
    return scores
