"""The `sample` step: every model (the sources, and the pivot for WRPO) answers every prompt, in shards.

    report = run_sample(model=SampleModel(name="qwen", model="Qwen/Qwen2.5-72B-Instruct"),
                        prompts=read_prompts(path="prompts.jsonl"), spec=SamplingSpec(), folder=work / "samples/qwen")

One folder per model, `shard-NNNNN.jsonl` per `shard_size` prompts (the stage-file format is in
`fusemerge/fuse/implicit/__init__.py`). kill -9 safety and resumption follow the output-folder protocol
(`fusemerge.checkpoint.layout`): a shard is written under a temporary sibling name, synced, and renamed,
so a shard under its final name is complete and a rerun skips it; an interrupted shard is regenerated
from its own seed, giving the same lines. The manifest (`.fusemerge/manifest.json`, written before the
first shard) records what the samples depend on: the model's fingerprint, the sampling settings, the
backend, the prompts' hash. A rerun whose identity differs is refused (`rebuild=True` starts over),
never silently mixed with the old shards. One writer per folder (`exclusive_lock`).

Data-parallel: under `accelerate launch` or torchrun with N processes, the shards still to do are split
between the processes (accelerate's `split_between_processes`); each generates its share on its own
device and writes each shard as above, and the main process marks the folder complete once every
process is done. A shard's samples come from its own seed and its own fixed batches (`derive_seed`, the
`transformers` backend), never from which process made it, so N processes give the files one process
gives, and a rerun with any number of processes reuses the finished shards. The unit of work is a shard:
with fewer shards to do than processes the rest wait (a smaller `shard_size` spreads a small set).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fusemerge.checkpoint.layout import (
    exclusive_lock,
    publish,
    read_state,
    remove_path,
    stale_tmp_siblings,
    tmp_sibling,
    write_state,
)
from fusemerge.errors import FusemergeError
from fusemerge.fuse.hf_compat import launched_state, wait_for_everyone
from fusemerge.fuse.implicit.generate import (
    GENERATION_BACKENDS,
    Generation,
    GenerationSettings,
    LoadSettings,
    derive_seed,
)
from fusemerge.fuse.implicit.prompts import PromptRecord, PromptSet
from fusemerge.fuse.implicit.spec import SamplingSpec
from fusemerge.fuse.implicit.turns import TurnEnd, strip_turn_end, turn_end
from fusemerge.progress import progress_bar

SHARD_PATTERN = "shard-*.jsonl"
# 2: a stopped response is stored without its template's plain-text turn end (fusemerge.fuse.implicit.turns),
# and a shard's seed comes from the model's name, not its path
FORMAT_VERSION = 2


# -- stage files shared by sample, score and pairs -------------------------------------------------------
def shard_name(index: int) -> str:
    return f"shard-{index:05d}.jsonl"


def write_jsonl(path: Path, lines: Sequence[dict[str, Any]]) -> None:
    """Write a whole JSONL file under a temporary name, sync it, then rename: readers never see half a file."""
    tmp = tmp_sibling(path)
    with open(tmp, "w", encoding="utf-8") as fh:
        for line in lines:
            fh.write(json.dumps(line, ensure_ascii=False) + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    publish(tmp, path)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def stage_lines(folder: Path) -> Iterator[dict[str, Any]]:
    """Every line of a complete stage folder, shard by shard; an incomplete folder is a FusemergeError."""
    state = read_state(folder)
    if not state.get("complete"):
        raise FusemergeError("this stage is not complete: run its step first", file=folder)
    for index in range(int(state["n_shards"])):
        yield from read_jsonl(folder / shard_name(index))


def check_identity(folder: Path, identity: dict[str, Any], *, what: str, rebuild: bool) -> None:
    """Refuse a folder made from different inputs (or start it over with `rebuild`), then record `identity`.

    Args:
        folder: the stage folder (locked by the caller).
        identity: what its files depend on.
        what: the step, for messages ("sample", "score").
        rebuild: delete the old shards instead of refusing.
    """
    for stale in stale_tmp_siblings(folder):
        remove_path(stale)
    state = read_state(folder)
    shards = sorted(folder.glob(SHARD_PATTERN))
    old = state.get("identity")
    if (old is not None and old != identity) or (old is None and shards):
        if not rebuild:
            changed = sorted(k for k in {*identity, *(old or {})} if (old or {}).get(k) != identity.get(k))
            raise FusemergeError(
                f"made by an earlier {what} with different {', '.join(changed) or 'inputs'}; delete the folder "
                f"(or rebuild) to {what} again",
                file=folder,
            )
        for shard in shards:
            shard.unlink()
        state = {}
    if state.get("identity") != identity:
        write_state(folder, {"identity": identity, "complete": False, "n_shards": identity["n_shards"]})


def finish_state(folder: Path, **stats: Any) -> None:
    state = read_state(folder)
    write_state(folder, {**state, "complete": True, "stats": {**state.get("stats", {}), **stats}})


# -- the step ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SampleModel:
    """One model that answers: its folder name under `samples/`, where it loads from, and how."""

    name: str
    model: str
    load: LoadSettings = LoadSettings()
    chat_template: str = "pivot"  # its own template; or a built-in name / .jinja file for one without


@dataclass
class SampleReport:
    """What one model's `sample` did: shards done now and in total, samples made, and their rate."""

    name: str
    folder: Path
    shards_total: int
    shards_done: int = 0
    samples: int = 0
    tokens: int = 0
    seconds: float = 0.0
    skipped: bool = False

    @property
    def samples_per_s(self) -> float:
        return self.samples / self.seconds if self.seconds > 0 else 0.0


def sample_counts(prompts: Sequence[PromptRecord], *, spec: SamplingSpec) -> list[int]:
    """Responses per prompt: the domain's own count, else `samples`; one when greedy (the rest would repeat)."""
    if spec.temperature == 0:
        return [1] * len(prompts)
    return [spec.samples_per_domain.get(p.domain, spec.samples) for p in prompts]


def generation_settings(spec: SamplingSpec, *, chat_template: str = "pivot") -> GenerationSettings:
    return GenerationSettings(
        max_new_tokens=spec.max_new_tokens,
        temperature=spec.temperature,
        top_p=spec.top_p,
        batch_size=spec.batch_size,
        chat_template=chat_template,
    )


def sample_identity(*, model: SampleModel, prompts: PromptSet, spec: SamplingSpec) -> dict[str, Any]:
    """What a model's samples depend on; computed without loading the weights (a skip costs a tokenizer load).

    The tokenizer and the resolved chat template are hashed too: the model fingerprint covers the config
    and weight files only, and a template given as a .jinja file can change under the same name.

    Args:
        model: the model that answers.
        prompts: the prompts.
        spec: the sampling section.
    """
    tokenizer, template = model_chat(model)
    return _identity(model=model, prompts=prompts, spec=spec, tokenizer=tokenizer, template=template)


def model_chat(model: SampleModel) -> tuple[Any, str]:
    """The answering model's tokenizer and the chat template it answers in."""
    from fusemerge.lm.loading import load_tokenizer
    from fusemerge.lm.templates import resolve_render_template

    tokenizer = load_tokenizer(model.model, trust_remote_code=model.load.trust_remote_code)
    return tokenizer, resolve_render_template(model.chat_template, tokenizer)


def _identity(
    *, model: SampleModel, prompts: PromptSet, spec: SamplingSpec, tokenizer: Any, template: str
) -> dict[str, Any]:
    from fusemerge.fuse.teacher import model_fingerprint, tokenizer_hash
    from fusemerge.lm.loading import resolve_device, resolve_dtype

    device = resolve_device(model.load.device)
    n = len(prompts.prompts)
    return {
        "kind": "samples",
        "format": FORMAT_VERSION,
        "model": model.model,
        "model_fingerprint": model_fingerprint(model.model),
        "tokenizer_hash": tokenizer_hash(tokenizer),
        "chat_template_hash": hashlib.sha256(template.encode("utf-8")).hexdigest(),
        "backend": spec.backend,
        "generation": generation_settings(spec, chat_template=model.chat_template).as_dict(),
        "samples": spec.samples,
        "samples_per_domain": dict(sorted(spec.samples_per_domain.items())),
        "seed": spec.seed,
        "dtype": resolve_dtype(model.load.dtype, device),
        "device_type": device.split(":")[0],
        "load_in_4bit": model.load.load_in_4bit,
        "prompts_hash": prompts.fingerprint(),
        "n_prompts": n,
        "shard_size": spec.shard_size,
        "n_shards": max(1, -(-n // spec.shard_size)),
    }


def run_sample(
    *,
    model: SampleModel,
    prompts: PromptSet,
    spec: SamplingSpec,
    folder: str | Path,
    progress: bool = True,
    echo: Callable[[str], None] = print,
    rebuild: bool = False,
) -> SampleReport:
    """Generate (or finish) one model's samples of every prompt; a complete matching folder is skipped.

    Under a launcher every process calls this: the shards to do are split between them (module
    docstring); the main process checks the folder, reports, and marks it complete. The report is
    this process's share; `SampleReport.seconds` and the manifest's rate are the whole step's.

    Args:
        model: the model that answers, and how to load it.
        prompts: the prompt records (`read_prompts`).
        spec: the recipe's `implicit.sampling` section.
        folder: `<work_dir>/implicit/samples/<model>`.
        progress: a bar with samples/s and tokens/s (the main process's share).
        echo: where one-line status messages go (the main process's).
        rebuild: start over when the folder was made from different inputs (else that is an error).
    """
    folder = Path(folder)
    state = launched_state()
    main, processes = state.is_main_process, state.num_processes
    if not main:
        progress, echo = False, _quiet
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer, template = model_chat(model)
    identity = _identity(model=model, prompts=prompts, spec=spec, tokenizer=tokenizer, template=template)
    end = turn_end(tokenizer, template)
    n_shards = identity["n_shards"]
    report = SampleReport(model.name, folder, n_shards)
    backend = GENERATION_BACKENDS.get(spec.backend, key="implicit.sampling.backend")
    # one writer per folder: the main process holds the lock for the processes of its run
    lock: AbstractContextManager[None] = exclusive_lock(folder, what="sample") if main else nullcontext()
    with lock:
        if main:
            check_identity(folder, identity, what="sample", rebuild=rebuild)
        wait_for_everyone(state)
        if read_state(folder).get("identity") != identity:  # another process's inputs differ from main's
            raise FusemergeError(
                "this process's prompts or model differ from the main process's", file=folder
            )
        pending = [j for j in range(n_shards) if not (folder / shard_name(j)).is_file()]
        wait_for_everyone(state)  # every process has listed the same shards before any writes one
        if not pending:
            if main:
                finish_state(folder)
            report.skipped = True
            echo(f"sample {model.name}: {n_shards} shards complete, skipped ({folder})")
            return report
        counts = sample_counts(prompts.prompts, spec=spec)
        size = spec.shard_size
        total = sum(sum(counts[j * size : (j + 1) * size]) for j in pending)
        with state.split_between_processes(pending) as share:
            mine = list(share)
        on = f" on {processes} processes" if processes > 1 else ""
        echo(f"sample {model.name}: {len(pending)} of {n_shards} shards, {total} samples to generate{on}")
        # the step's time from this process's first sample (its model loaded) to the last process's end
        start, generated = time.perf_counter(), dict[str, Any]()
        if mine:
            start, generated = _generate(
                model=model,
                prompts=prompts,
                spec=spec,
                shards=mine,
                counts=counts,
                backend=backend,
                end=end,
                report=report,
                progress=progress,
            )
        wait_for_everyone(state)  # every shard is written
        report.seconds = time.perf_counter() - start
        if main:
            missing = [shard_name(j) for j in pending if not (folder / shard_name(j)).is_file()]
            if missing:
                raise FusemergeError(f"shards missing after sampling: {', '.join(missing)}", file=folder)
            rate = total / report.seconds if report.seconds > 0 else 0.0
            finish_state(folder, samples_per_s=round(rate, 3), processes=processes, **generated)
            echo(f"sample {model.name}: {total} samples in {report.seconds:.1f}s ({rate:.2f}/s{on})")
    return report


def _quiet(_: str) -> None:
    """The status lines of a process other than the main one (the main process reports the step)."""


def _generate(
    *,
    model: SampleModel,
    prompts: PromptSet,
    spec: SamplingSpec,
    shards: Sequence[int],
    counts: Sequence[int],
    backend: Any,
    end: TurnEnd,
    report: SampleReport,
    progress: bool,
) -> tuple[float, dict[str, Any]]:
    """This process's shards, each generated from its own seed and written whole.

    Returns when generation started (`time.perf_counter()`, the model loaded: a rate is of sampling, not
    of loading) and the manifest's `generator` entry (what the backend says it ran on).
    """
    size = spec.shard_size
    total = sum(sum(counts[j * size : (j + 1) * size]) for j in shards)
    generator = backend.fn(
        model=model.model,
        settings=generation_settings(spec, chat_template=model.chat_template),
        load=model.load,
        progress=progress,
    )
    start = time.perf_counter()
    with progress_bar(total, f"sample {model.name}", enabled=progress, unit="sample") as pbar:

        def advance(batch: list[Generation]) -> None:
            report.tokens += sum(g.tokens for g in batch)
            elapsed = max(time.perf_counter() - start, 1e-9)
            pbar.set_postfix_str(f"{report.tokens / elapsed:,.0f} tok/s", refresh=False)
            pbar.update(len(batch))

        for j in shards:
            shard = prompts.prompts[j * size : (j + 1) * size]
            # seeded by the model's name, not its path: the same model in another folder (a demo run
            # in another --out) draws the same samples; and by the shard alone, not by which process
            # makes it: any number of processes gives the same files
            answers = generator.generate(
                [p.messages for p in shard],
                counts[j * size : (j + 1) * size],
                seed=derive_seed(spec.seed, model.name, "shard", j),
                on_batch=advance,
            )
            lines = [
                {
                    **prompt.as_json(),
                    "model": model.name,
                    "sample_index": k,
                    "response": strip_turn_end(g.text, end) if g.finish_reason == "stop" else g.text,
                    "finish_reason": g.finish_reason,
                    "tokens": g.tokens,
                }
                for prompt, generations in zip(shard, answers, strict=True)
                for k, g in enumerate(generations)
            ]
            write_jsonl(report.folder / shard_name(j), lines)
            report.shards_done += 1
            report.samples += len(lines)
    return start, {"generator": generator.describe()}
