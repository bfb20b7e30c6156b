"""The fuse recipe: pydantic models of the YAML that drives `fusemerge fuse` (teach -> align -> train).

    pivot: openchat/openchat_3.5
    sources:
      - model: NousResearch/Nous-Hermes-2-SOLAR-10.7B
      - {model: NousResearch/Nous-Hermes-2-Mixtral-8x7B-DPO, load_in_4bit: true}
    dataset: {path: data/fusechat_mixture.jsonl, format: sharegpt, max_length: 2048, split_long: true}
    chat_template: pivot
    teacher: {top_k: 10, batch_size: 8, dtype: bfloat16}
    alignment: {tokens: dtw, vocab: stats}
    fusion: {function: mince, metric: ce_per_byte, loss: ce, lambda: 0.9, temperature: 1.0}
    training: {mode: lora, learning_rate: 5e-6, epochs: 3, batch_size: 4, gradient_accumulation: 4}
    output: fused/

Models are frozen and forbid unknown keys, so a typo is an error rather than a silently ignored setting.
Errors name the file, the line (from the YAML node marks) and the key. Relative paths (dataset, output,
work_dir, local model folders) are taken relative to the current directory, as mergekit does.
The raw YAML text is kept on the recipe so later stages can copy it verbatim into model cards.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PositiveInt,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from fusemerge.errors import FusemergeError
from fusemerge.fuse.implicit.spec import ImplicitSpec
from fusemerge.yaml_recipes import line_of, parse_mapping, read_recipe_text, validate

Dtype = Literal["auto", "float32", "bfloat16", "float16"]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)


class ModelSpec(_Frozen):
    """One model of the fusion (the pivot or a source); unset fields fall back to the `teacher` section."""

    model: str = Field(min_length=1)
    load_in_4bit: bool = False
    dtype: Dtype | None = None
    batch_size: PositiveInt | None = None
    device: str | None = None
    allow_pickle: bool = False
    trust_remote_code: bool = False

    @property
    def name(self) -> str:
        """A short name for folders and messages: the last component of a path or Hub id."""
        return Path(self.model.rstrip("/")).name or self.model


class DatasetSpec(_Frozen):
    """Chat data: a JSONL file or a `datasets.save_to_disk` folder, in OpenAI or ShareGPT form."""

    path: str = Field(min_length=1)
    format: Literal["auto", "openai", "sharegpt"] = "auto"
    split: str | None = None  # which split of a saved DatasetDict (default: "train" or the only one)
    max_length: PositiveInt = 2048  # in pivot tokens
    split_long: bool = True  # FuseChat: split long conversations at turn boundaries instead of truncating
    on_bad_record: Literal["skip", "error"] = "skip"
    limit: PositiveInt | None = None  # use only the first N records (smoke runs)


class TeacherSpec(_Frozen):
    """Defaults for the teacher pass of every model; a model's own keys override them."""

    top_k: PositiveInt = 10
    batch_size: PositiveInt = 8
    dtype: Dtype = "auto"  # auto: bfloat16 on a GPU, float32 on the CPU
    device: str = "auto"  # auto: the accelerate process's device (cuda if present, else cpu)
    shard_size: PositiveInt = 1024  # sequences per store shard: the unit of resumption


class AlignmentSpec(_Frozen):
    tokens: Literal["dtw", "offsets"] = "dtw"
    vocab: Literal["exact", "mined", "stats", "prefix"] = "stats"
    # worker processes of the align step; unset: every core the process may use (its CPU affinity)
    workers: PositiveInt | None = None
    # span rules (fusemerge.fuse.align.transfer.SPAN_RULES): chain covers what exact leaves one-hot
    spans: Literal["exact", "chain"] = "chain"

    @model_validator(mode="after")
    def _prefix_needs_spans(self) -> AlignmentSpec:
        if self.vocab == "prefix" and self.tokens != "offsets":
            raise ValueError("vocab 'prefix' needs character spans: set tokens: offsets")
        return self


NO_FUSION = "none"  # fusion.function of a plain fine-tune: the CLM loss alone, no teachers


class FusionSpec(_Frozen):
    """How teachers become a target (fusemerge.fuse.fusion) and how the student learns it (loss).

    `kind` picks the method: explicit (FuseChat 1.0/2.0, the keys below) or implicit (FuseChat-3.0, the
    recipe's `implicit:` section; the other keys here are explicit-only). `function: none` (or
    `lambda: 1`) is a plain fine-tune of the pivot on the same data: the paper's CLM-only baseline, which
    needs no sources and no teacher pass.
    """

    kind: Literal["explicit", "implicit"] = "explicit"
    # the registered fusion functions (fusion.FUSION_FUNCTIONS, tested) and `none`
    function: Literal["mince", "mince_token", "avgce", "none"] = "mince"
    sources: Literal["pairwise", "all"] = "pairwise"  # pairwise: one target per source (FuseChat)
    # what MinCE and avgce compare per sequence (fusion.METRICS): the CE per UTF-8 byte of the assistant
    # text, fair across tokenizers; ce_per_token is the paper's (a finer tokenizer wins it)
    metric: Literal["ce_per_byte", "ce_per_token"] = "ce_per_byte"
    loss: Literal["ce", "kl"] = "ce"
    lambda_: float = Field(0.9, alias="lambda", ge=0.0, le=1.0)
    temperature: float = Field(1.0, gt=0.0)

    @model_validator(mode="after")
    def _none_is_clm_alone(self) -> FusionSpec:
        if self.function == NO_FUSION and "lambda_" in self.model_fields_set and self.lambda_ != 1.0:
            raise ValueError("function 'none' trains on the gold tokens alone: leave lambda unset or 1")
        return self

    @property
    def fine_tune(self) -> bool:
        """No fusion term: `function: none`, or `lambda: 1` (the fusion term has weight 0)."""
        return self.function == NO_FUSION or self.lambda_ == 1.0

    @property
    def clm_weight(self) -> float:
        """lambda as training uses it: 1 for a fine-tune."""
        return 1.0 if self.fine_tune else self.lambda_


class TrainingSpec(_Frozen):
    """The paper's setup for FuseChat-7B, except `mode` (lora by default on hobbyist hardware)."""

    mode: Literal["full", "lora", "qlora"] = "lora"
    learning_rate: float = Field(5e-6, gt=0.0)
    lr_scheduler: str = "cosine"
    warmup_ratio: float = Field(0.03, ge=0.0, lt=1.0)
    weight_decay: float = Field(0.0, ge=0.0)
    epochs: float = Field(3, gt=0.0)
    batch_size: PositiveInt = 4
    gradient_accumulation: PositiveInt = 4
    dtype: Dtype = "auto"  # auto: bf16 mixed precision where the device has it, else float32
    lora_r: PositiveInt = 16
    lora_alpha: PositiveInt = 32
    lora_dropout: float = Field(0.05, ge=0.0, lt=1.0)
    lora_target_modules: str | list[str] = "all-linear"
    gradient_checkpointing: bool = False
    # the saved target's dtype (fusemerge.fuse.save_dtype): auto keeps float32 where rounding to the
    # pivot's dtype would erase more than 1% of the update; pivot, float32, bfloat16, float16 as named
    save_dtype: Literal["auto", "pivot", "float32", "bfloat16", "float16"] = "auto"
    keep_checkpoints: bool = False  # false: a target's Trainer checkpoints are removed once it is saved
    max_grad_norm: float = Field(1.0, ge=0.0)
    max_steps: PositiveInt | None = None  # stop after this many optimizer steps (smoke runs); else epochs
    save_steps: PositiveInt = 500  # checkpoint every N optimizer steps: the unit of resumption
    logging_steps: PositiveInt = 10
    dataloader_workers: int = Field(0, ge=0)
    group_by_length: bool = True  # batches of similar lengths (less padding); else uniformly random batches
    seed: int = 42


# Keys that only explicit fusion reads: in an implicit recipe they would be silently ignored, so an error.
EXPLICIT_ONLY: tuple[tuple[str, ...], ...] = (
    ("teacher",),
    ("alignment",),
    *(("fusion", key) for key in ("function", "sources", "metric", "loss", "lambda", "temperature")),
)
IMPLICIT_ONLY: tuple[tuple[str, ...], ...] = (("implicit",),)


def kind_of(data: Any) -> str:
    """The fusion kind a raw recipe mapping asks for (explicit unless `fusion.kind` says otherwise)."""
    fusion = data.get("fusion") if isinstance(data, dict) else None
    return str(fusion.get("kind", "explicit")) if isinstance(fusion, dict) else "explicit"


def misplaced_keys(data: Any) -> list[tuple[str, ...]]:
    """The keys of a raw recipe mapping that belong to the other fusion kind, in recipe order."""
    if not isinstance(data, dict):
        return []
    kind = kind_of(data)
    if kind not in ("explicit", "implicit"):
        return []  # the kind itself is wrong: pydantic says so
    found = []
    for loc in EXPLICIT_ONLY if kind == "implicit" else IMPLICIT_ONLY:
        node: Any = data
        for part in loc:
            node = node.get(part, _ABSENT) if isinstance(node, dict) else _ABSENT
        if node is not _ABSENT:
            found.append(loc)
    return found


def misplaced_message(data: Any, found: list[tuple[str, ...]]) -> str:
    names = ", ".join(".".join(loc) for loc in found)
    if kind_of(data) == "implicit":
        return f"explicit-fusion keys in an implicit recipe (fusion.kind: implicit): {names}; remove them"
    return f"{names}: only for implicit fusion; set fusion: {{kind: implicit}} or remove it"


_ABSENT = object()


class FuseRecipe(_Frozen):
    pivot: ModelSpec
    sources: list[ModelSpec] = []  # at least one, unless the recipe is a fine-tune (fusion.function none)
    # explicit: the chat data; implicit: the prompts (absent when prepared data covers every stage)
    dataset: DatasetSpec | None = None
    chat_template: str = "pivot"  # "pivot", a built-in name (see fusemerge.lm.templates), or a .jinja file
    teacher: TeacherSpec = TeacherSpec()
    alignment: AlignmentSpec = AlignmentSpec()
    fusion: FusionSpec = FusionSpec()
    training: TrainingSpec = TrainingSpec()
    implicit: ImplicitSpec | None = None  # implicit fusion's steps (fusion.kind: implicit); see spec.py
    output: str = Field(min_length=1)
    work_dir: str | None = None  # stores and intermediate files; default <output>/work
    raw_yaml: str = Field("", exclude=True, repr=False)

    @field_validator("pivot", mode="before")
    @classmethod
    def _pivot_as_string(cls, value: Any) -> Any:
        return {"model": value} if isinstance(value, str) else value

    @field_validator("sources", mode="before")
    @classmethod
    def _sources_as_strings(cls, value: Any) -> Any:
        if isinstance(value, list):
            return [{"model": v} if isinstance(v, str) else v for v in value]
        return value

    @model_validator(mode="before")
    @classmethod
    def _keys_of_one_kind(cls, data: Any) -> Any:
        found = misplaced_keys(data)
        if found:
            raise ValueError(misplaced_message(data, found))
        return data

    @model_validator(mode="after")
    def _kind_needs(self) -> FuseRecipe:
        if self.fusion.kind == "explicit":
            if self.dataset is None:
                raise ValueError("dataset: required key is missing (the chat data the teachers read)")
            return self
        if self.implicit is None:
            raise ValueError("implicit: required section is missing (fusion.kind: implicit)")
        if self.dataset is None and self.implicit.generates():
            raise ValueError(
                "dataset: required key is missing (the prompts; or give implicit.sft_data and "
                "implicit.preference_data for every stage)"
            )
        return self

    @field_validator("sources", mode="after")
    @classmethod
    def _distinct_models(cls, sources: list[ModelSpec], info: ValidationInfo) -> list[ModelSpec]:
        # a field check (not a whole-recipe one), so that its error names `sources`, not the recipe dict;
        # the same folder under two spellings (pivot/ and ./pivot) is fusemerge.fuse.inputs' check
        pivot = info.data.get("pivot")
        seen = [pivot.model.rstrip("/")] if pivot is not None else []
        for src in sources:
            if src.model.rstrip("/") in seen:
                what = "the pivot" if seen and src.model.rstrip("/") == seen[0] else "another source"
                raise PydanticCustomError(
                    "duplicate_model",
                    "model '{model}' is also {what}: pivot and sources must differ",
                    {"model": src.model, "what": what},
                )
            seen.append(src.model.rstrip("/"))
        return sources

    @model_validator(mode="after")
    def _sources_to_fuse(self) -> FuseRecipe:
        if not self.sources and not self.fusion.fine_tune:
            raise ValueError(
                "sources: fusion needs at least one source (a plain fine-tune: fusion.function none)"
            )
        return self

    @property
    def fine_tune(self) -> bool:
        """A plain fine-tune of the pivot (`fusion.function: none` or `lambda: 1`): no teachers, no stores."""
        return self.fusion.fine_tune

    def baseline(self) -> FuseRecipe:
        """This recipe's CLM-only twin (`fuse --baseline`): the same pivot, data, training and output,
        `fusion.function: none`. Its YAML, for the card, is this recipe's with a first line saying so."""
        note = "# fusemerge fuse --baseline: this recipe with fusion.function none (the CLM-only baseline)\n"
        return self.model_copy(
            update={
                "fusion": FusionSpec(function=NO_FUSION, **{"lambda": 1.0}),
                "raw_yaml": note + self.raw_yaml if self.raw_yaml else "",
            }
        )

    @property
    def models(self) -> list[tuple[str, ModelSpec]]:
        """(role, spec) for the pivot then every source: the teacher pass runs over all of them."""
        return [("pivot", self.pivot)] + [(f"source{i}", s) for i, s in enumerate(self.sources, start=1)]

    @property
    def work_path(self) -> Path:
        return Path(self.work_dir) if self.work_dir else Path(self.output) / "work"

    def teacher_settings(self, spec: ModelSpec) -> dict[str, Any]:
        """The effective teacher settings of one model: its own keys over the `teacher` section."""
        return {
            "top_k": self.teacher.top_k,
            "batch_size": spec.batch_size or self.teacher.batch_size,
            "dtype": spec.dtype or self.teacher.dtype,
            "device": spec.device or self.teacher.device,
            "load_in_4bit": spec.load_in_4bit,
            "allow_pickle": spec.allow_pickle,
            "trust_remote_code": spec.trust_remote_code,
            "shard_size": self.teacher.shard_size,
        }


def load_fuse_recipe(path: str | Path) -> FuseRecipe:
    """Read and validate a fuse recipe; every problem is a FusemergeError naming file, line and key."""
    path = Path(path)
    text = read_recipe_text(path)
    data, node = parse_mapping(text, path, what="pivot:, sources:, dataset:, output:")
    found = misplaced_keys(data)
    if found:  # checked here too for the line of the first one (pydantic's error has no location)
        lines = [n for n in (line_of(node, loc) for loc in found) if n is not None]
        raise FusemergeError(misplaced_message(data, found), file=path, line=min(lines, default=None))
    return validate(FuseRecipe, {**data, "raw_yaml": text}, path, node)
