"""Generation backends for `sample`: a model answers prompts, several times each, with recorded settings.

A backend is registered in `GENERATION_BACKENDS` as a factory `(model=..., settings=..., load=...,
progress=...) -> Generator`; the generator's `generate(prompts, counts, seed=...)` returns, per prompt,
`counts[i]` `Generation`s. `transformers` (here) is the reference; a fast engine (vLLM, llama.cpp) is one
more registered factory with the same contract (see the inference issue).

Reproducibility: the `transformers` backend draws every batch from its own seed (derived from the
shard's seed and the batch's index), and the batches of a shard are always the same prompts in the same
order, so regenerating a shard (a rerun, or a resume after kill -9) gives the same samples on the CPU.
The generation config is built from our settings alone, not merged with the model's
`generation_config.json` (which may carry a repetition penalty or top-k the manifest would not show):
only its end-of-turn ids are taken from it, and it is replaced on the loaded model before generating.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

from fusemerge.registry import Registry

Message = dict[str, str]


@dataclass(frozen=True)
class GenerationSettings:
    """How a model samples; recorded in the sample manifest (a change is a different sample set)."""

    max_new_tokens: int = 2048
    temperature: float = 0.8  # 0: greedy
    top_p: float = 0.95
    batch_size: int = 8  # prompts per generation batch (each with all its samples)
    chat_template: str = "pivot"  # the model's own template ("pivot" in resolve_render_template's terms)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class LoadSettings:
    """How to load the model (a recipe's per-model keys); dtype/device decide the numbers, so recorded."""

    dtype: str = "auto"
    device: str = "auto"
    load_in_4bit: bool = False
    allow_pickle: bool = False
    trust_remote_code: bool = False


@dataclass(frozen=True)
class Generation:
    """One response: its text (special tokens removed), why it ended, and its length in tokens."""

    text: str
    finish_reason: Literal["stop", "length"]
    tokens: int


class Generator(Protocol):
    """A loaded model that answers prompts; `describe()` goes into the manifest (dtype, device)."""

    def generate(
        self,
        prompts: Sequence[Sequence[Message]],
        counts: Sequence[int],
        *,
        seed: int,
        on_batch: Callable[[list[Generation]], None] | None = None,
    ) -> list[list[Generation]]: ...

    def describe(self) -> dict[str, Any]: ...


GENERATION_BACKENDS: Registry[Callable[..., Generator]] = Registry("generation backend")


def derive_seed(seed: int, *parts: object) -> int:
    """A 63-bit seed from a base seed and names (model, shard, batch): stable across runs and machines."""
    text = ":".join(str(p) for p in (seed, *parts))
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") >> 1


class TransformersGenerator:
    """`model.generate` on left-padded, length-sorted batches of prompts rendered with the model's template."""

    def __init__(
        self, *, model: str, settings: GenerationSettings, load: LoadSettings, progress: bool
    ) -> None:
        import torch

        from fusemerge.fuse.teacher import TeacherSettings, load_teacher_model
        from fusemerge.lm.loading import load_tokenizer, resolve_device, resolve_dtype
        from fusemerge.lm.templates import resolve_render_template
        from fusemerge.lm.tokens import ChatTokenizer

        self.settings = settings
        self.device = resolve_device(load.device)
        self.dtype = resolve_dtype(load.dtype, self.device)
        self.tokenizer = load_tokenizer(model, trust_remote_code=load.trust_remote_code)
        self.template = resolve_render_template(settings.chat_template, self.tokenizer)
        self.chat_tokenizer = ChatTokenizer(self.tokenizer)
        teacher = TeacherSettings(
            dtype=load.dtype,
            device=load.device,
            load_in_4bit=load.load_in_4bit,
            allow_pickle=load.allow_pickle,
            trust_remote_code=load.trust_remote_code,
        )
        self.lm = load_teacher_model(model, teacher, self.device, progress=progress)
        self.eos = sorted(self._eos_ids())
        pad = self.tokenizer.pad_token_id
        self.pad = pad if pad is not None else self.eos[0] if self.eos else 0
        # generate() fills what our config leaves unset from the model's own generation config (a top-k, a
        # repetition penalty): replace that with one that holds only the special ids.
        from transformers import GenerationConfig

        self.lm.generation_config = GenerationConfig(
            bos_token_id=getattr(self.lm.config, "bos_token_id", None),
            eos_token_id=self.eos or None,
            pad_token_id=self.pad,
        )
        self.torch = torch
        self.name = Path(model.rstrip("/")).name or model

    def _eos_ids(self) -> set[int]:
        ids: set[int] = set()
        if self.tokenizer.eos_token_id is not None:
            ids.add(int(self.tokenizer.eos_token_id))
        configured = getattr(getattr(self.lm, "generation_config", None), "eos_token_id", None)
        if isinstance(configured, int):
            ids.add(configured)
        elif isinstance(configured, list | tuple):
            ids.update(int(i) for i in configured)
        return ids

    def describe(self) -> dict[str, Any]:
        return {
            "backend": "transformers",
            "dtype": self.dtype,
            "device": self.device,
            "eos_token_ids": self.eos,
        }

    def prompt_ids(self, messages: Sequence[Message]) -> list[int]:
        """The prompt as this model's token ids: its own template, with the generation prompt."""
        from fusemerge.lm.chat import ChatSequence

        text = self.tokenizer.apply_chat_template(
            list(messages), chat_template=self.template, add_generation_prompt=True, tokenize=False
        )
        ids, _ = self.chat_tokenizer(ChatSequence(record=0, text=text, spans=()))
        return [int(i) for i in ids]

    def _config(self) -> Any:
        from transformers import GenerationConfig

        s = self.settings
        sampling = s.temperature > 0
        return GenerationConfig(
            max_new_tokens=s.max_new_tokens,
            do_sample=sampling,
            temperature=s.temperature if sampling else None,
            top_p=s.top_p if sampling else None,
            top_k=None,
            pad_token_id=self.pad,
            eos_token_id=self.eos or None,
        )

    def generate(
        self,
        prompts: Sequence[Sequence[Message]],
        counts: Sequence[int],
        *,
        seed: int,
        on_batch: Callable[[list[Generation]], None] | None = None,
    ) -> list[list[Generation]]:
        """Per prompt, `counts[i]` responses; batches of `batch_size` prompts, each drawn from its own seed.

        Args:
            prompts: the conversations to answer (each ends with a user turn).
            counts: responses per prompt.
            seed: the seed of this call (a shard's); batch b samples from `derive_seed(seed, b)`.
            on_batch: called with each finished batch's generations (a progress bar's update).
        """
        torch = self.torch
        ids = [self.prompt_ids(m) for m in prompts]
        order = sorted(range(len(prompts)), key=lambda i: (len(ids[i]), i))
        out: list[list[Generation]] = [[] for _ in prompts]
        config = self._config()
        size = self.settings.batch_size
        for b, start in enumerate(range(0, len(order), size)):
            chunk = order[start : start + size]
            rows = [i for i in chunk for _ in range(counts[i])]
            if not rows:
                continue
            width = max(len(ids[i]) for i in rows)
            input_ids = torch.full((len(rows), width), self.pad, dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for r, i in enumerate(rows):
                input_ids[r, width - len(ids[i]) :] = torch.tensor(ids[i])
                mask[r, width - len(ids[i]) :] = 1
            torch.manual_seed(derive_seed(seed, "batch", b))
            with torch.inference_mode():
                result = self.lm.generate(
                    input_ids=input_ids.to(self.device),
                    attention_mask=mask.to(self.device),
                    generation_config=config,
                )
            new = result[:, width:].tolist()
            done = [self._decode(tokens) for tokens in new]
            for i, generation in zip(rows, done, strict=True):
                out[i].append(generation)
            if on_batch is not None:
                on_batch(done)
        return out

    def _decode(self, tokens: list[int]) -> Generation:
        eos = set(self.eos)
        cut = next((t for t, tok in enumerate(tokens) if tok in eos), None)
        kept = tokens if cut is None else tokens[:cut]
        text = self.tokenizer.decode(kept, skip_special_tokens=True)
        return Generation(text=text, finish_reason="length" if cut is None else "stop", tokens=len(kept))


@GENERATION_BACKENDS.register(
    "transformers",
    pretty_name="Hugging Face transformers generate",
    reference_url="https://huggingface.co/docs/transformers",
)
def transformers_backend(
    *, model: str, settings: GenerationSettings, load: LoadSettings, progress: bool = True
) -> Generator:
    """Load `model` for batched sampling with transformers.

    Args:
        model: local folder or Hub id of a causal LM with a chat template (or `settings.chat_template`).
        settings: sampling settings.
        load: dtype, device, 4-bit, pickle and remote-code permissions.
        progress: show the weight-loading bar.
    """
    return TransformersGenerator(model=model, settings=settings, load=load, progress=progress)
