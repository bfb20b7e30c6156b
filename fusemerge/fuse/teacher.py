"""The teacher pass: one model over every sequence, keeping top-K next-token log-probs and its CE.

Each sequence's cross-entropy is kept two ways, for `fusion.metric`: per assistant token (`metric_ce`,
FuseChat's) and per UTF-8 byte of the assistant text those tokens cover (`ce_per_byte`, the measure
`fusemerge eval` reports, counted by its `scored_positions`), which compares fairly across tokenizers.

    from fusemerge.fuse.teacher import TeacherSettings, run_teacher
    store = run_teacher("path/to/model", data, "work/teacher/model", settings=TeacherSettings(top_k=10))

Batches are length-sorted buckets inside a store shard (little padding), padded on the right with an
attention mask; each model reads the pivot-rendered text with its own tokenizer (`ChatTokenizer`).
The forward itself is `fusemerge.lm.forward.topk_forward` (chunked logits within `logits_budget`), the
same one `fusemerge eval` scores with.

Under `accelerate launch`, every process takes its own shards of the store (shard j belongs to process
j mod N; finished ones are skipped), so the slices land in one store; the main process finishes the manifest.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fusemerge.errors import FusemergeError
from fusemerge.evaluate import scored_positions
from fusemerge.fuse.store import TopKStore
from fusemerge.lm.chat_data import ChatData
from fusemerge.lm.forward import topk_forward
from fusemerge.lm.loading import (
    FourBit,
    check_weights,
    four_bit_config,
    load_causal_lm,
    load_tokenizer,
    resolve_device,
    resolve_dtype,
)
from fusemerge.lm.padding import pad_right, pad_token_id
from fusemerge.lm.tokens import ChatTokenizer
from fusemerge.progress import TokenRate

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


def load_teacher_model(model: str, settings: TeacherSettings, device: str, *, progress: bool = True) -> Any:
    """The causal LM in eval mode on `device`: safetensors only unless allowed, 4-bit only on a GPU.

    4-bit teachers use bitsandbytes' default quantization (fp4, no double quantization), as they always have.
    """
    # load_causal_lm checks again; checking here first keeps the pickle refusal ahead of the 4-bit checks
    check_weights(model, allow_pickle=settings.allow_pickle)
    dtype = resolve_dtype(settings.dtype, device)
    quantization, device_map = None, None
    if settings.load_in_4bit:
        import torch

        quantization = four_bit_config(
            FourBit(
                compute_dtype="bfloat16" if dtype == "float32" else dtype,
                quant_type="fp4",
                double_quant=False,
            ),
            cuda=device.startswith("cuda"),
            option="load_in_4bit",
            no_gpu=f"load_in_4bit needs a CUDA GPU (bitsandbytes); this teacher runs on {device}",
            file=model,
        )
        device_map = {"": torch.device(device).index or 0}
    lm = load_causal_lm(
        model,
        dtype=dtype,
        allow_pickle=settings.allow_pickle,
        trust_remote_code=settings.trust_remote_code,
        quantization_config=quantization,
        device_map=device_map,
        progress=progress,
    )
    if not settings.load_in_4bit:
        lm = lm.to(device)
    from fusemerge.checkpoint.finite import check_finite_model

    check_finite_model(lm, what="the model", file=model)  # before any forward pass: NaN in, NaN store out
    return lm.eval()


def check_weights_first(models: list[str], stores: list[Path]) -> None:
    """Before the first teacher pass: the weights of every model whose store is still to be made are
    scanned for NaN/Inf on disk, so that a bad source is refused before the pivot's pass, not after it.

    A model whose store is complete is not read (its weights passed when the store was made; a change
    since is its fingerprint's business). Models that cannot be scanned on disk (Hub ids, pickles) are
    checked when loaded (`load_teacher_model`).
    """
    from fusemerge.checkpoint.finite import check_finite_folder

    for model, store in zip(models, stores, strict=True):
        if not _store_complete(store):
            check_finite_folder(Path(model), what="the model")


def _store_complete(store: Path) -> bool:
    try:
        return TopKStore.open(store).complete
    except FusemergeError:
        return False


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
    """sha256 of a model folder's config.json and its weights' content fingerprint (safetensors headers
    plus sampled bytes, `fusemerge.checkpoint.fingerprint`): weights overwritten in place with the same
    shapes are a new model. A Hub id is fingerprinted by its name."""
    from fusemerge.checkpoint.fingerprint import weights_fingerprint

    folder = Path(model)
    if not folder.is_dir():
        return hashlib.sha256(model.encode()).hexdigest()
    h = hashlib.sha256()
    if (folder / "config.json").is_file():
        h.update((folder / "config.json").read_bytes())
    h.update(weights_fingerprint(folder).encode())
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
    tokenizer = load_tokenizer(model, trust_remote_code=settings.trust_remote_code)
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
    pad = pad_token_id(tokenizer)
    total = sum(len(store.shard_sequences(j)) for j in mine)
    bar = TokenRate(total, f"teach {name}", enabled=progress and state.is_local_main_process)
    try:
        for shard in mine:
            seqs = [data.sequences[i] for i in store.shard_sequences(shard)]
            tokenized = [_scored(s, chat_tok) for s in seqs]
            ids, lps, ces = _teach_shard(lm, tokenized, settings, pad, device, bar)
            check_store_values(store.path, store.shard_sequences(shard), lps, ces, identity["dtype"])
            per_byte = [per_byte_ce(ce, tok[1], tok[2]) for ce, tok in zip(ces, tokenized, strict=True)]
            store.write_shard(shard, ids, lps, ces, ce_per_byte=per_byte)
    finally:
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
        input_ids, attention = pad_right([tokenized[i][0] for i in batch], pad)
        values, top_ids, next_lp = topk_forward(
            lm,
            torch.from_numpy(input_ids).to(device),
            torch.from_numpy(attention).to(device),
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
        bar.update(len(batch), sum(lengths))
    return ids_out, lps_out, ces


def check_store_values(
    store: Path, sequences: list[int] | range, lps: list[np.ndarray], ces: list[float], dtype: str
) -> None:
    """Refuse a shard whose log-probabilities or metric_ce hold NaN or +Inf, before it is written.

    The weights were finite (checked at load), so such values come from an overflow in the forward (a
    bfloat16-trained model run in float16 is the usual one); stored, a NaN metric_ce silently never wins
    MinCE and a +Inf reaches the loss. -Inf is a probability of zero and stays allowed; a NaN metric_ce
    is the mark of a sequence without assistant tokens, which `metric_ce` writes only for those.
    """
    for i, lp, ce in zip(sequences, lps, ces, strict=True):
        bad = "NaN" if np.isnan(lp).any() else "+Inf" if np.isposinf(lp).any() else None
        what = f"{bad} log-probabilities" if bad else "an infinite metric_ce" if np.isposinf(ce) else None
        if what is not None:
            raise FusemergeError(
                f"the teacher pass gave {what} for sequence {i}, although the weights are "
                f"finite: the forward overflows in dtype {dtype}; run this model in float32 or bfloat16 "
                "(its `dtype` in the recipe); nothing of this shard was written",
                file=store,
            )


def _scored(seq: Any, chat_tok: ChatTokenizer) -> tuple[np.ndarray, np.ndarray, int]:
    """(ids, assistant mask, UTF-8 bytes of the scored assistant text): eval's count, so the two agree."""
    ids, scored, nbytes = scored_positions(seq, chat_tok)
    mask = np.zeros(len(ids), dtype=bool)
    mask[scored] = True  # eval's scored tokens: the assistant tokens after the first (what metric_ce sums)
    return ids, mask, nbytes


def per_byte_ce(mean_ce: float, assistant_mask: np.ndarray, nbytes: int) -> float:
    """Nats per byte: the summed NLL of the scored assistant tokens (mean x count) over their bytes."""
    count = int(np.asarray(assistant_mask)[1:].sum())
    if not count or nbytes <= 0 or not np.isfinite(mean_ce):
        return float("nan")
    return float(mean_ce) * count / nbytes


def metric_ce(next_logprob: np.ndarray, assistant_mask: np.ndarray) -> float:
    """Mean cross-entropy of the assistant tokens: position t predicts token t + 1 (FuseChat's metric_ce).

    NaN when the sequence has no predictable assistant token (MinCE then never picks this teacher).
    """
    targets = assistant_mask[1:]
    if not targets.any():
        return float("nan")
    ce = float(-np.mean(next_logprob[:-1][targets], dtype=np.float64))
    return float("inf") if np.isnan(ce) else ce  # a NaN here would read as "no assistant token"
