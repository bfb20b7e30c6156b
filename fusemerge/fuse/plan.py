"""`fusemerge fuse RECIPE --dry-run`: the recipe validated and the plan printed, nothing loaded or run.

    from fusemerge.fuse.plan import fuse_plan
    for line in fuse_plan(recipe, steps=["teach", "align", "train"]): print(line)

For both kinds (explicit teach -> align -> train, implicit sample -> score -> pairs -> sft -> preference):
the steps in order and what of each is already done on disk, every model and where it would come from,
the dataset's size, and where the outputs go. Why a separate pass: a recipe for a 70B source is hours of
downloads and GPU time away from its first real error, and a user wants to know before that what would
run, what is already finished and what still has to be fetched.

Nothing here loads a weight, and nothing touches the network: a model is a local folder, in the local
Hugging Face cache (`huggingface_hub.try_to_load_from_cache`, which only reads the disk), or "to
download", never an error. The dataset's records are counted without tokenizing. The on-disk status reads
only manifests and stamps, the same files the steps themselves check.

The time estimate (explicit recipes) is the one exception to "nothing loaded": where the pivot and the
data are on this disk, the pivot's tokenizer renders and counts the dataset exactly as the teach step
will, and each model's config.json (read as JSON) gives its FLOPs per token (`fusemerge.fuse.flops`);
per step it prints tokens, FLOPs and the time on the detected device at the MFU of
`fusemerge.fuse.flops.MFU_TABLE`, saying whether that MFU was measured or is an assumption. Where the
pivot or the data are not local it says it cannot count, and nothing is imported for it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from fusemerge.checkpoint.layout import TARGET_STAMP, read_state
from fusemerge.errors import FusemergeError
from fusemerge.fuse.flops import (
    ALIGN_TOKENS_PER_S_PER_WORKER,
    Kind,
    ModelShape,
    estimate_seconds,
    step_flops,
)
from fusemerge.fuse.implicit.pipeline import DATA_STEPS
from fusemerge.fuse.implicit.spec import DataFileSpec, ImplicitSpec
from fusemerge.fuse.recipe import FuseRecipe, ModelSpec
from fusemerge.fuse.store import MANIFEST
from fusemerge.fuse.workdir import FuseWorkDir

DONE, TODO = "done", "to do"
COUNTED = "estimate: "  # the first line of an estimate that tokenized the data


def model_location(model: str) -> str:
    """Where a model would be read from: a local folder, the local HF cache, or the Hub ("to download").

    Reads only the disk (no request, whatever HF_HUB_OFFLINE says).
    """
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.utils import HFValidationError

    if Path(model).is_dir():
        return "local folder"
    try:
        cached = try_to_load_from_cache(model, "config.json")
    except HFValidationError:
        return "not found (neither a local folder nor a valid Hub id)"
    return "in the local HF cache" if isinstance(cached, str) else "to download"


def count_records(path: str, split: str | None = None, limit: int | None = None) -> str:
    """The number of records of a JSONL file (non-empty lines) or a saved datasets folder (its rows).

    A missing file is said, not raised: a fresh clone has the recipe but not yet the data.
    """
    p = Path(path)
    if p.is_file():
        with open(p, "rb") as fh:
            n = sum(1 for line in fh if line.strip())
    elif p.is_dir():
        from fusemerge.lm.chat import read_records

        n = sum(1 for _ in read_records(p, split))
    else:
        return "not found"
    if limit is not None and limit < n:
        return f"{n:,} records, the first {limit:,} used (limit)"
    return f"{n:,} records"


def fuse_plan(
    recipe: FuseRecipe, *, steps: Sequence[str], push_to_hub: str | None = None, estimate: bool = True
) -> list[str]:
    """The plan as lines of text (see the module docstring).

    Args:
        recipe: a validated fuse recipe.
        steps: the steps that would run (`fusemerge.fuse.checked_steps`).
        push_to_hub: the `--push-to-hub` repo id, if any.
        estimate: the time estimate of an explicit recipe (`estimate_lines`).
    """
    layout = FuseWorkDir(recipe)
    kind = recipe.fusion.kind
    lines = [f"fusion: {kind}"]
    lines += ["models:"] + [
        f"  {role}: {spec.model} ({model_location(spec.model)})" for role, spec in _models(recipe)
    ]
    if recipe.dataset is not None:
        what = "prompts" if kind == "implicit" else "dataset"
        ds = recipe.dataset
        lines.append(f"{what}: {ds.path} ({count_records(ds.path, ds.split, ds.limit)})")
    if kind == "implicit":
        lines += _implicit_steps(recipe, layout, steps)
    else:
        lines += _explicit_steps(recipe, layout, steps)
        if estimate:
            lines += estimate_lines(recipe, steps)
    lines.append(f"work dir: {layout.root}")
    if push_to_hub:
        lines.append(f"push to the Hub: {push_to_hub}")
    if any(line.startswith(COUNTED) and "cannot count" not in line for line in lines):
        lines.append(
            "dry run: no weights were loaded, nothing was run (the pivot's tokenizer counted the data)"
        )
    else:
        lines.append("dry run: nothing was loaded or run")
    return lines


def print_plan(
    recipe: FuseRecipe,
    *,
    recipe_path: Path,
    steps: Sequence[str],
    push_to_hub: str | None = None,
    echo: Callable[[str], None] = print,
) -> None:
    """Print `fuse_plan` under a header naming the recipe (it has been validated by then)."""
    echo(f"recipe: {recipe_path} (valid)")
    for line in fuse_plan(recipe, steps=steps, push_to_hub=push_to_hub):
        echo(line)


def _models(recipe: FuseRecipe) -> list[tuple[str, ModelSpec]]:
    models = list(recipe.models)
    spec = recipe.implicit
    if recipe.fusion.kind == "implicit" and spec is not None and spec.scoring.reward_model is not None:
        models.append(("reward model", ModelSpec(model=spec.scoring.reward_model.model)))
    return models


def _step(name: str, steps: Sequence[str], status: str) -> str:
    return f"  {name}: {status}" + ("" if name in steps else " [not requested]")


def _all(flags: Sequence[bool]) -> str:
    done = sum(flags)
    if done == len(flags):
        return DONE
    return TODO if not done else f"{done} of {len(flags)} done"


def _alignment(recipe: FuseRecipe) -> str:
    """The alignment settings that change what the train step sees, so a dry run shows which rule applies."""
    spec = recipe.alignment
    workers = spec.workers if spec.workers else "auto"
    return f"{spec.tokens} / {spec.vocab}, spans {spec.spans}, workers {workers}"


def _explicit_steps(recipe: FuseRecipe, layout: FuseWorkDir, steps: Sequence[str]) -> list[str]:
    stores = [(f / MANIFEST).is_file() for f in layout.teacher_stores]
    aligned = [(f / MANIFEST).is_file() for f in layout.aligned_stores]
    targets = layout.targets
    trained = [(layout.target_folder(t) / TARGET_STAMP).is_file() for t in targets]
    lines = [
        "steps:",
        _step("teach", steps, f"{_all(stores)} (top-{recipe.teacher.top_k} of {len(stores)} models)"),
        _step("align", steps, f"{_all(aligned)} ({_alignment(recipe)})"),
        _step(
            "train",
            steps,
            f"{_all(trained)} ({recipe.training.mode}, {recipe.fusion.function} by {recipe.fusion.metric}, "
            f"lambda {recipe.fusion.lambda_})",
        ),
        "outputs:",
    ]
    lines += [f"  {layout.target_folder(t)}" for t in targets]
    if len(targets) > 1:
        lines.append(f"  {layout.merge_recipe} (the VaRM merge of the targets)")
    return lines


def _implicit_steps(recipe: FuseRecipe, layout: FuseWorkDir, steps: Sequence[str]) -> list[str]:
    spec = recipe.implicit
    assert spec is not None  # FuseRecipe requires it for this kind
    generated = [s for s in spec.stages if _prepared(spec, s) is None]
    names = [name for name, _ in layout.answering]
    if generated:
        sampled = [read_state(layout.samples_folder(n)).get("complete") is True for n in names]
        scored = [read_state(layout.scores_folder(n)).get("complete") is True for n in names]
        paired = layout.sft_pairs.is_file() and layout.preference_pairs.is_file()
        samples = spec.sampling
        per_domain = "".join(f", {d}: {n}" for d, n in sorted(samples.samples_per_domain.items()))
        scorers = ", ".join(
            [f"default: {spec.scoring.default}"]
            + [f"{d}: {s}" for d, s in sorted(spec.scoring.domains.items())]
        )
        data = [
            _step(
                "sample",
                steps,
                f"{_all(sampled)} ({len(names)} models: {', '.join(names)}; {samples.samples} per prompt"
                f"{per_domain}; {samples.max_new_tokens} new tokens, temperature {samples.temperature})",
            ),
            _step("score", steps, f"{_all(scored)} ({scorers})"),
            _step("pairs", steps, f"{DONE if paired else TODO} (sft fraction {spec.pairs.sft_fraction})"),
        ]
    else:
        data = [_step(s, steps, "nothing to do (prepared data covers every stage)") for s in DATA_STEPS]
    domains = layout.implicit_domains
    plans = {domain: layout.implicit_targets(domain) for domain in domains}
    training = []
    for stage in ("sft", "preference"):
        if stage not in spec.stages:
            training.append(_step(stage, steps, "not among implicit.stages"))
            continue
        prepared = _prepared(spec, stage)
        source = (
            f"prepared {prepared.path} ({count_records(prepared.path, prepared.split, prepared.limit)})"
            if prepared is not None
            else f"{layout.sft_pairs if stage == 'sft' else layout.preference_pairs} (the pairs step)"
        )
        done = _all([(layout.target_folder(t[stage]) / TARGET_STAMP).is_file() for t in plans.values()])
        how = (
            f"{recipe.training.mode}, {recipe.training.epochs:g} epochs, lr {recipe.training.learning_rate:g}"
            if stage == "sft"
            else f"{spec.preference.loss}, beta {spec.preference.beta:g}, lr {spec.preference.learning_rate:g}"
        )
        per = f"; one target per domain: {', '.join(map(str, domains))}" if len(domains) > 1 else ""
        training.append(_step(stage, steps, f"{done} ({how}; data: {source}{per})"))
    lines = ["steps:", *data, *training, "outputs:"]
    for domain, targets in plans.items():
        of = "" if domain is None else f", domain {domain}"
        lines += [f"  {layout.target_folder(t)} ({stage}{of})" for stage, t in targets.items()]
    if len(domains) > 1:
        lines.append(f"  {layout.merge_recipe} (the VaRM merge of the domains' targets)")
    return lines


def _prepared(spec: ImplicitSpec, stage: str) -> DataFileSpec | None:
    return spec.sft_data if stage == "sft" else spec.preference_data


# ---------------------------------------------------------------- the time estimate (explicit recipes)


def local_folder(model: str) -> Path | None:
    """The model's files on this disk: its folder, or its snapshot in the local HF cache; else None."""
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.utils import HFValidationError

    if Path(model).is_dir():
        return Path(model)
    try:
        cached = try_to_load_from_cache(model, "config.json")
    except HFValidationError:
        return None
    return Path(cached).parent if isinstance(cached, str) else None


def model_shape(model: str) -> ModelShape | None:
    """The model's shape from its config.json (read as JSON, nothing imported), or None."""
    import json
    from types import SimpleNamespace

    folder = local_folder(model)
    if folder is None or not (folder / "config.json").is_file():
        return None
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        config = config.get("text_config", config)
        return ModelShape.from_config(SimpleNamespace(**config))
    except (ValueError, TypeError, KeyError, ZeroDivisionError):
        return None


def detected_device() -> tuple[str, int]:
    """(device name, GPU count): the first CUDA device's name, or "cpu"."""
    try:
        import torch
    except ImportError:
        return "cpu", 0
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0), torch.cuda.device_count()
    return "cpu", 0


def _human(seconds: float | None) -> str:
    if seconds is None:
        return "time unknown"
    if seconds < 120:
        return f"~{seconds:.0f} s"
    if seconds < 7200:
        return f"~{seconds / 60:.0f} min"
    return f"~{seconds / 3600:.1f} h"


def estimate_lines(recipe: FuseRecipe, steps: Sequence[str]) -> list[str]:
    """Per step: tokens, FLOPs and the estimated time on the detected device (module docstring)."""
    ds = recipe.dataset
    pivot = local_folder(recipe.pivot.model)
    if ds is None:
        return []
    if pivot is None or not Path(ds.path).exists():
        what = "the pivot is not on this disk" if pivot is None else f"{ds.path} is not there"
        return [f"estimate: cannot count the dataset's tokens ({what}); the real run counts them"]
    from fusemerge.fuse.align.workers import default_workers
    from fusemerge.fuse.data import build_chat_data
    from fusemerge.lm.loading import load_tokenizer
    from fusemerge.lm.tokens import ChatTokenizer

    try:
        tokenizer = load_tokenizer(str(pivot), trust_remote_code=recipe.pivot.trust_remote_code)
        data = build_chat_data(ds, tokenizer, recipe.chat_template, warn=lambda _: None)
    except FusemergeError as exc:  # the real run stops there too; a plan says so and goes on
        return [f"estimate: cannot count the dataset's tokens: {exc.one_line()}"]
    chat = ChatTokenizer(tokenizer)
    lengths = [len(chat(seq)[0]) for seq in data.sequences]
    tokens = sum(lengths)
    device, gpus = detected_device()
    where = (
        device if device == "cpu" else f"{device}, 1 of {gpus} GPUs (accelerate launch divides the GPU steps)"
    )
    lines = [f"{COUNTED}{len(lengths):,} sequences, {tokens:,} pivot tokens; device: {where}"]
    total = 0.0
    known = True

    def step(label: str, name: str, flops: float | None, kind: Kind) -> None:
        nonlocal total, known
        if flops is None:
            lines.append(f"  {label}: FLOPs unknown (no local config.json)")
            known = False
            return
        guess = estimate_seconds(flops, kind, device)
        lines.append(f"  {label}: {flops:.2e} FLOPs, {_human(guess.seconds)} ({guess.basis})")
        if guess.seconds is None:
            known = False
        elif name in steps:
            total += guess.seconds

    if not recipe.fine_tune:
        for role, spec in recipe.models:
            shape = model_shape(spec.model)
            note = "" if role == "pivot" else " (its own tokenizer's count differs; the pivot's is used)"
            flops = None if shape is None else step_flops(shape, lengths, "teacher")
            step(f"teach {spec.name}: {tokens:,} tokens{note}", "teach", flops, "teacher")
        workers = recipe.alignment.workers or default_workers()
        rate = ALIGN_TOKENS_PER_S_PER_WORKER * workers
        for spec in recipe.sources:
            seconds = tokens / rate
            lines.append(
                f"  align {spec.name}: {tokens:,} pivot tokens on {workers} CPU workers, {_human(seconds)} "
                f"({ALIGN_TOKENS_PER_S_PER_WORKER:,.0f} tokens/s per worker, measured by bench/align_bench.py "
                "per CPU-second, dtw + stats; free cores assumed)"
            )
            if "align" in steps:
                total += seconds
    training = recipe.training
    shape = model_shape(recipe.pivot.model)
    epochs = training.epochs
    if training.max_steps:
        per_step = training.batch_size * training.gradient_accumulation
        epochs = min(epochs, training.max_steps * per_step / max(1, len(lengths)))
    kind: Kind = "full" if training.mode == "full" else "lora"
    for target in FuseWorkDir(recipe).targets:
        flops = None
        if shape is not None:
            once = step_flops(
                shape, lengths, kind, lora_r=training.lora_r, checkpointing=training.gradient_checkpointing
            )
            flops = once * epochs
        step(
            f"train {target.name}: {epochs:g} epochs of {tokens:,} tokens ({training.mode})",
            "train",
            flops,
            kind,
        )
    lines.append(
        f"  total of the requested steps: {_human(total)}" + ("" if known else " (without the unknown ones)")
    )
    return lines
