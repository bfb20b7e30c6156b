"""The teacher pass: one model over every sequence, keeping top-K next-token log-probs and metric_ce.

    from fusemerge.fuse.teacher import TeacherSettings, run_teacher
    store = run_teacher("path/to/model", data, "work/teacher/model", settings=TeacherSettings(top_k=10))

Batches are length-sorted buckets inside a store shard (little padding), padded on the right with an
attention mask; each model reads the pivot-rendered text with its own tokenizer (`ChatTokenizer`).
Logits are never materialised for the whole batch: the backbone's hidden states of the real (unpadded)
tokens go through the output head in row chunks, and log_softmax/top-K run in float32 per chunk, so a
150k-token vocabulary at 2,048 tokens x 8 sequences does not need 10 GB.

Under `accelerate launch`, every process takes its own shards of the store (shard j belongs to process
j mod N; finished ones are skipped), so the slices land in one store; the main process finishes the manifest.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fusemerge.checkpoint.layout import PICKLE_SUFFIXES
from fusemerge.errors import FusemergeError
from fusemerge.fuse.data import ChatData, ChatTokenizer
from fusemerge.fuse.store import TopKStore

LOG = logging.getLogger(__name__)


@dataclass(frozen=True)
class TeacherSettings:
    """How to run one teacher; `FuseRecipe.teacher_settings(spec)` builds it from a recipe."""

    top_k: int = 10
    batch_size: int = 8
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    load_in_4bit: bool = False
    allow_pickle: bool = False
    trust_remote_code: bool = False
    shard_size: int = 1024
    logits_budget: int = 2**25  # float32 logits held at once (rows x vocab): 128 MiB


# ---------------------------------------------------------------- loading


def load_teacher_tokenizer(model: str, *, trust_remote_code: bool = False) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise FusemergeError(f"cannot load the tokenizer: {_first_line(exc)}", file=model) from exc


def load_teacher_model(model: str, settings: TeacherSettings, device: str, *, progress: bool = True) -> Any:
    """The causal LM in eval mode on `device`: safetensors only unless allowed, 4-bit only on a GPU."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    folder = Path(model)
    if folder.is_dir() and not settings.allow_pickle and not any(folder.glob("*.safetensors")):
        pickled = [p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES]
        hint = (
            f"only pickle weights ({', '.join(pickled[:3])}); set allow_pickle: true if you trust them"
            if pickled
            else "no *.safetensors weights"
        )
        raise FusemergeError(hint, file=folder)
    dtype = resolve_dtype(settings.dtype, device)
    kwargs: dict[str, Any] = {
        "dtype": getattr(torch, dtype),
        "trust_remote_code": settings.trust_remote_code,
        "use_safetensors": None if settings.allow_pickle else True,
    }
    if settings.load_in_4bit:
        if not device.startswith("cuda"):
            raise FusemergeError(
                f"load_in_4bit needs a CUDA GPU (bitsandbytes); this teacher runs on {device}", file=model
            )
        try:
            import bitsandbytes  # noqa: F401
        except ImportError as exc:
            raise FusemergeError(
                "load_in_4bit needs bitsandbytes: pip install bitsandbytes", file=model
            ) from exc
        from transformers import BitsAndBytesConfig

        compute = torch.bfloat16 if dtype == "float32" else getattr(torch, dtype)
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=compute)
        kwargs["device_map"] = {"": torch.device(device).index or 0}
    bars = hf_logging.is_progress_bar_enabled()
    if not progress:
        hf_logging.disable_progress_bar()
    try:
        lm = AutoModelForCausalLM.from_pretrained(model, **kwargs)
    except (OSError, ValueError) as exc:
        raise FusemergeError(f"cannot load the model: {_first_line(exc)}", file=model) from exc
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    if not settings.load_in_4bit:
        lm = lm.to(device)
    return lm.eval()


def resolve_device(device: str) -> str:
    """'auto' is the accelerate process's device (its own GPU under `accelerate launch`, else cpu)."""
    if device != "auto":
        return device
    from accelerate import PartialState

    return str(PartialState().device)


def resolve_dtype(dtype: str, device: str) -> str:
    return ("bfloat16" if device.startswith("cuda") else "float32") if dtype == "auto" else dtype


def tokenizer_hash(tokenizer: Any) -> str:
    """sha256 of everything that decides tokenization: the full tokenizer.json of a fast tokenizer."""
    h = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode("utf-8"))
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False).encode("utf-8"))
    h.update(json.dumps(tokenizer.all_special_tokens, ensure_ascii=False).encode("utf-8"))
    return h.hexdigest()


def model_fingerprint(model: str) -> str:
    """sha256 of config.json and the weight files' names and sizes (hashing 15 GB of weights is too slow)."""
    folder = Path(model)
    if not folder.is_dir():
        return hashlib.sha256(model.encode()).hexdigest()
    h = hashlib.sha256()
    if (folder / "config.json").is_file():
        h.update((folder / "config.json").read_bytes())
    for p in sorted(folder.iterdir()):
        if p.suffix in (".safetensors", *PICKLE_SUFFIXES):
            h.update(f"{p.name}:{p.stat().st_size}\n".encode())
    return h.hexdigest()


def teacher_identity(
    model: str, tokenizer: Any, data: ChatData, settings: TeacherSettings, device: str
) -> dict:
    """What a teacher store's values depend on; a rerun with any of it changed is refused, not reused."""
    return {
        "kind": "teacher",
        "positions": "model",
        "vocab": "model",
        "model": model,
        "model_fingerprint": model_fingerprint(model),
        "tokenizer_hash": tokenizer_hash(tokenizer),
        "dataset_hash": data.fingerprint(),
        "top_k": settings.top_k,
        "dtype": resolve_dtype(settings.dtype, device),
        "load_in_4bit": settings.load_in_4bit,
    }


# ---------------------------------------------------------------- the forward pass


def topk_forward(lm: Any, input_ids: Any, attention_mask: Any, *, top_k: int, logits_budget: int = 2**25):
    """Top-K next-token log-probs at every real position, and the log-prob of the actual next token.

    Returns (values float32 [n, K], ids int64 [n, K], next_logprob float32 [n]) over the real tokens of
    the batch in row-major order (sequence by sequence); next_logprob is NaN at each sequence's last token.
    """
    import torch

    real = attention_mask.bool()
    with torch.inference_mode():
        hidden, head = _hidden_states(lm, input_ids, attention_mask)
        hidden = hidden[real]  # [n, H]: padding never reaches the head
        nxt = torch.full_like(input_ids, -1)
        nxt[:, :-1] = input_ids[:, 1:]
        nxt = nxt.masked_fill(~torch.roll(real, -1, dims=1) | ~real, -1)
        nxt[:, -1] = -1
        targets = nxt[real]
        vocab = (
            lm.config.get_text_config().vocab_size
            if hasattr(lm.config, "get_text_config")
            else lm.config.vocab_size
        )
        rows = max(1, logits_budget // max(vocab, 1))
        values, ids, next_lp = [], [], []
        for a in range(0, hidden.shape[0], rows):
            logits = head(hidden[a : a + rows]).float()
            logp = torch.log_softmax(logits, dim=-1)
            v, i = logp.topk(top_k, dim=-1)
            t = targets[a : a + rows]
            lp = logp.gather(1, t.clamp(min=0).unsqueeze(1)).squeeze(1)
            values.append(v)
            ids.append(i)
            next_lp.append(lp.masked_fill(t < 0, float("nan")))
    return torch.cat(values), torch.cat(ids), torch.cat(next_lp)


def _hidden_states(lm: Any, input_ids: Any, attention_mask: Any) -> tuple[Any, Callable[[Any], Any]]:
    """The last hidden states and a function that turns rows of them into logits, as the model would.

    Models that post-process logits (soft-capping, scaling) get the same treatment; a model without a
    separate backbone falls back to the full forward (its logits are then computed for the whole batch).
    """
    base = getattr(lm, "base_model", lm)
    head = lm.get_output_embeddings() if hasattr(lm, "get_output_embeddings") else None
    if base is lm or head is None:
        logits = lm(input_ids=input_ids, attention_mask=attention_mask).logits
        return logits, lambda x: x
    out = base(input_ids=input_ids, attention_mask=attention_mask)
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    config = lm.config.get_text_config() if hasattr(lm.config, "get_text_config") else lm.config
    softcap = getattr(config, "final_logit_softcapping", None)
    scale_div = getattr(config, "logits_scaling", None)  # granite
    scale_mul = getattr(config, "logit_scale", None)  # cohere

    def project(rows: Any) -> Any:
        logits = head(rows)
        if scale_mul is not None:
            logits = logits * scale_mul
        if scale_div is not None:
            logits = logits / scale_div
        if softcap is not None:
            logits = (logits / softcap).tanh() * softcap
        return logits

    return hidden, project


# ---------------------------------------------------------------- the pass


def run_teacher(
    model: str,
    data: ChatData,
    store_dir: str | Path,
    *,
    settings: TeacherSettings = TeacherSettings(),
    progress: bool = True,
    echo: Callable[[str], None] = print,
    process_index: int | None = None,
    num_processes: int | None = None,
) -> TopKStore:
    """Fill (or finish) the top-K store of `model` over `data`; a complete matching store is skipped.

    Args:
        model: local folder or Hub id of a causal LM.
        data: the rendered sequences (the same for every model of a fusion).
        store_dir: the store folder.
        settings: K, batch size, dtype, device, 4-bit, pickle and remote-code permissions, shard size.
        progress: show a tqdm bar (sequences, tokens/s, ETA) on the main process.
        echo: where one-line status messages go.
        process_index, num_processes: this process's slice; default from `accelerate.PartialState`.
    """
    from accelerate import PartialState

    state = PartialState()
    rank = state.process_index if process_index is None else process_index
    world = state.num_processes if num_processes is None else num_processes
    device = resolve_device(settings.device)
    name = Path(model.rstrip("/")).name or model
    tokenizer = load_teacher_tokenizer(model, trust_remote_code=settings.trust_remote_code)
    identity = teacher_identity(model, tokenizer, data, settings, device)
    n = len(data.sequences)

    if state.is_main_process:
        store = TopKStore.create_or_resume(store_dir, identity, n_sequences=n, shard_size=settings.shard_size)
    state.wait_for_everyone()
    if not state.is_main_process:
        store = TopKStore.create_or_resume(store_dir, identity, n_sequences=n, shard_size=settings.shard_size)
    pending = store.pending_shards()
    state.wait_for_everyone()  # every process saw the same pending list before anyone writes
    if not pending:
        if rank == 0 and not store.complete:
            store.finalize()
        echo(f"teach {name}: store complete, skipped ({store.path})")
        return store
    mine = [j for j in pending if j % world == rank]  # ownership by shard index: no shared state needed
    echo(
        f"teach {name}: {len(pending)} of {store.n_shards} shards to compute on {device}"
        + (f" (process {rank}/{world})" if world > 1 else "")
    )

    lm = load_teacher_model(model, settings, device, progress=progress)
    chat_tok = ChatTokenizer(tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    total = sum(len(store.shard_sequences(j)) for j in mine)
    bar = _progress_bar(total, f"teach {name}", enabled=progress and state.is_local_main_process)
    try:
        for shard in mine:
            seqs = [data.sequences[i] for i in store.shard_sequences(shard)]
            tokenized = [chat_tok(s) for s in seqs]
            ids, lps, ces = _teach_shard(lm, tokenized, settings, pad, device, bar)
            store.write_shard(shard, ids, lps, ces)
    finally:
        if bar is not None:
            bar.close()
    state.wait_for_everyone()
    if rank == 0:
        store.finalize()
    return store


def _teach_shard(lm: Any, tokenized: list, settings: TeacherSettings, pad: int, device: str, bar: Any):
    """Forward every sequence of a shard in length-sorted batches; results come back in shard order."""
    import torch

    count = len(tokenized)
    ids_out: list[np.ndarray] = [np.empty(0)] * count
    lps_out: list[np.ndarray] = [np.empty(0)] * count
    ces: list[float] = [float("nan")] * count
    order = sorted(range(count), key=lambda i: -len(tokenized[i][0]))
    for b in range(0, count, settings.batch_size):
        batch = order[b : b + settings.batch_size]
        lengths = [len(tokenized[i][0]) for i in batch]
        width = max(lengths)
        input_ids = torch.full((len(batch), width), pad, dtype=torch.long)
        attention = torch.zeros((len(batch), width), dtype=torch.long)
        for row, i in enumerate(batch):
            input_ids[row, : lengths[row]] = torch.from_numpy(tokenized[i][0])
            attention[row, : lengths[row]] = 1
        values, top_ids, next_lp = topk_forward(
            lm,
            input_ids.to(device),
            attention.to(device),
            top_k=settings.top_k,
            logits_budget=settings.logits_budget,
        )
        values, top_ids, next_lp = values.cpu().numpy(), top_ids.cpu().numpy(), next_lp.cpu().numpy()
        start = 0
        for row, i in enumerate(batch):
            end = start + lengths[row]
            ids_out[i] = top_ids[start:end].astype(np.int32)
            lps_out[i] = values[start:end].astype(np.float16)
            ces[i] = metric_ce(next_lp[start:end], tokenized[i][1])
            start = end
        if bar is not None:
            bar.update(len(batch), sum(lengths))
    return ids_out, lps_out, ces


def metric_ce(next_logprob: np.ndarray, assistant_mask: np.ndarray) -> float:
    """Mean cross-entropy of the assistant tokens: position t predicts token t + 1 (FuseChat's metric_ce).

    NaN when the sequence has no predictable assistant token (MinCE then never picks this teacher).
    """
    targets = assistant_mask[1:]
    if not targets.any():
        return float("nan")
    return float(-np.mean(next_logprob[:-1][targets], dtype=np.float64))


class _Bar:
    """tqdm over sequences with a tokens/s postfix (tqdm's own rate and ETA count sequences)."""

    def __init__(self, total: int, desc: str) -> None:
        from tqdm.auto import tqdm

        self.tqdm = tqdm(total=total, desc=desc, unit="seq", dynamic_ncols=True)
        self.tokens = 0
        self.start = time.perf_counter()

    def update(self, sequences: int, tokens: int) -> None:
        self.tokens += tokens
        rate = self.tokens / max(time.perf_counter() - self.start, 1e-9)
        self.tqdm.set_postfix_str(f"{rate:,.0f} tok/s", refresh=False)
        self.tqdm.update(sequences)

    def close(self) -> None:
        self.tqdm.close()


def _progress_bar(total: int, desc: str, *, enabled: bool) -> _Bar | None:
    return _Bar(total, desc) if enabled else None


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]
