"""The recipe sections of implicit fusion (FuseChat-3.0): sample -> score -> pairs -> sft -> preference.

    fusion: {kind: implicit}
    pivot: meta-llama/Llama-3.1-8B-Instruct
    sources: [google/gemma-2-27b-it, Qwen/Qwen2.5-72B-Instruct]
    dataset: {path: data/prompts.jsonl}          # prompts: chat records, the last user turn is the prompt
    implicit:
      sampling: {samples: 5, samples_per_domain: {code: 8}, max_new_tokens: 2048, temperature: 0.8}
      scoring: {default: reward_model, domains: {math: math_answer, code: code_tests},
                reward_model: {model: RLHFlow/ArmoRM-Llama3-8B-v0.1}}
      pairs: {sft_fraction: 0.4}
      preference: {loss: dpo, beta: 0.01}
    training: {mode: full, learning_rate: 5.0e-6, epochs: 3}      # the SFT stage
    output: fused/

Bring your own data: `implicit.sft_data` (chat `messages` records) and/or `implicit.preference_data`
(`prompt`, `chosen`, `rejected`, in TRL's formats) skip the steps that would have produced them.

One target per domain: `implicit: {targets: per_domain, domains: [math, code]}` trains the stages once
per domain on its own records of the same pairs, then writes `<output>/merge.yml` over them (VaRM, the
pivot as base), as explicit fusion does for its pairwise targets.
These models are the contract between the data half (sample, score, pairs) and the training half
(sft, preference) of `fusemerge/fuse/implicit/`; the stage files they exchange are described in
`fusemerge/fuse/implicit/__init__.py`.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PositiveInt,
    ValidationInfo,
    field_validator,
    model_validator,
)


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)


class SamplingSpec(_Frozen):
    """How every source answers every prompt (FuseChat-3.0: 5 samples for instruction following, 8 for code)."""

    samples: PositiveInt = 5  # responses per prompt and source
    samples_per_domain: dict[str, PositiveInt] = {}  # a domain's own count overrides `samples`
    max_new_tokens: PositiveInt = 2048
    temperature: float = Field(0.8, ge=0.0)  # 0: greedy (then one sample per prompt is enough)
    top_p: float = Field(0.95, gt=0.0, le=1.0)
    batch_size: PositiveInt = 8  # prompts per generation batch
    backend: str = "transformers"  # a registered generation backend
    seed: int = 42
    shard_size: PositiveInt = 256  # prompts per shard: the unit of resumption and of the data-parallel split
    include_pivot: bool = True  # the pivot answers too (WRPO's on-policy target responses)


class RewardModelSpec(_Frozen):
    model: str = Field(min_length=1)  # any Hugging Face sequence-classification reward model
    batch_size: PositiveInt = 8
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    device: str = "auto"
    max_length: PositiveInt = 4096
    trust_remote_code: bool = False


class CodeTestsSpec(_Frozen):
    """The response's code run against the record's tests in a subprocess: never in our own process."""

    timeout_s: float = Field(10.0, gt=0.0)
    memory_mb: PositiveInt = 1024
    workers: PositiveInt | None = None  # parallel test processes; default: the usable cores


class ScoringSpec(_Frozen):
    default: str = "reward_model"  # the scorer for domains not listed in `domains`
    domains: dict[str, str] = {}  # domain -> scorer (reward_model, math_answer, code_tests, ...)
    # among equally correct answers of a verifier scorer; default: reward_model when one is configured
    tie_break: str | None = None
    reward_model: RewardModelSpec | None = None
    code_tests: CodeTestsSpec = CodeTestsSpec()


class PairsSpec(_Frozen):
    """SFT examples (the best response per prompt) and preference pairs (chosen/rejected, one source)."""

    sft_fraction: float = Field(0.4, ge=0.0, le=1.0)  # FuseChat-3.0 splits prompts about 4:6
    min_reward_gap: float = Field(0.0, ge=0.0)  # a pair needs chosen - rejected above this
    # ... and at most this (FuseChat-3.0: reward gaps from 0.01 to 0.1 on ArmoRM's scale); None: no bound
    max_reward_gap: float | None = Field(None, gt=0.0)
    same_source: bool = True  # chosen and rejected from the same source (FuseChat-3.0)
    seed: int = 42  # the SFT/preference split of the prompts

    @model_validator(mode="after")
    def _gap_range(self) -> PairsSpec:
        if self.max_reward_gap is not None and self.max_reward_gap <= self.min_reward_gap:
            raise ValueError("max_reward_gap must be above min_reward_gap")
        return self


class PreferenceSpec(_Frozen):
    """The preference stage after SFT: DPO, length-normalised DPO, or WRPO (annealed fusion coefficient)."""

    loss: Literal["dpo", "ln_dpo", "wrpo"] = "dpo"
    beta: float = Field(0.01, gt=0.0)  # FuseChat-3.0: 0.01 plain DPO (Qwen, Gemma), 10 length-normalised
    alpha: float = Field(0.1, ge=0.0, le=1.0)  # WRPO: final weight of the source-chosen response
    alpha_schedule: Literal["linear", "constant"] = "linear"  # WRPO: 0 -> alpha over training
    learning_rate: float = Field(1e-6, gt=0.0)
    epochs: float = Field(1, gt=0.0)
    batch_size: PositiveInt | None = None  # default: training.batch_size
    gradient_accumulation: PositiveInt | None = None  # default: training.gradient_accumulation
    max_steps: PositiveInt | None = None
    max_length: PositiveInt = 2048


class DataFileSpec(_Frozen):
    """Prepared data: a JSONL file or a `datasets.save_to_disk` folder."""

    path: str = Field(min_length=1)
    split: str | None = None
    limit: PositiveInt | None = None


class ImplicitSpec(_Frozen):
    sampling: SamplingSpec = SamplingSpec()
    scoring: ScoringSpec = ScoringSpec()
    pairs: PairsSpec = PairsSpec()
    preference: PreferenceSpec = PreferenceSpec()
    sft_data: DataFileSpec | None = None  # prepared SFT data: skip sample/score/pairs for the SFT stage
    preference_data: DataFileSpec | None = None  # prepared preference pairs: skip them for preference
    stages: list[Literal["sft", "preference"]] = ["sft", "preference"]
    # one: a target that learns every domain; per_domain: one target per domain of `domains`, each trained
    # on that domain's pairs alone, and <output>/merge.yml merging them (as explicit fusion's pairwise
    # targets are merged)
    targets: Literal["one", "per_domain"] = "one"
    domains: list[str] = Field([], validate_default=True)  # per_domain: the prompts' `domain` values

    @field_validator("domains")
    @classmethod
    def _domains_for_targets(cls, domains: list[str], info: ValidationInfo) -> list[str]:
        # a field check, so that the error names implicit.domains at its line (the section's when absent)
        per_domain = info.data.get("targets") == "per_domain"
        if not per_domain:
            if domains:
                raise ValueError("only for implicit.targets: per_domain (set it, or remove domains)")
            return domains
        if len(set(domains)) < 2:
            got = f"got {len(set(domains))}: {', '.join(sorted(set(domains)))}" if domains else "got none"
            raise ValueError(
                "implicit.targets: per_domain trains one target per domain and merges them: name two or "
                f"more domains here ({got}); one domain is implicit.targets: one"
            )
        slugs = [domain_slug(d) for d in domains]
        for i, slug in enumerate(slugs):
            if not domains[i].strip():
                raise ValueError("a domain name is empty")
            if slugs.index(slug) != i:
                raise ValueError(
                    f"{domains[slugs.index(slug)]!r} and {domains[i]!r} are one domain, or name the same "
                    "target folder: list each domain once"
                )
        return domains

    @model_validator(mode="after")
    def _reward_model_where_used(self) -> ImplicitSpec:
        used = {self.scoring.default, *self.scoring.domains.values(), self.scoring.tie_break}
        if "reward_model" in used and self.scoring.reward_model is None and self.generates():
            raise ValueError("scoring uses reward_model: give scoring.reward_model.model")
        return self

    def generates(self) -> bool:
        """Whether any stage needs sample/score/pairs (not all of it comes from prepared data)."""
        needs_sft = "sft" in self.stages and self.sft_data is None
        needs_pref = "preference" in self.stages and self.preference_data is None
        return needs_sft or needs_pref


def domain_slug(domain: str) -> str:
    """A domain as part of a target's folder name (`fusemerge.fuse.workdir.FuseWorkDir.implicit_targets`)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", domain.strip()).strip("-") or "domain"
