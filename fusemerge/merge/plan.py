"""The merge plan: every output tensor with its inputs, dtype, shape and resolved parameters.

The whole recipe is checked here, from headers and configs alone, before a single tensor is read: a typo
or a shape mismatch must surface in a second, not after twenty minutes of reading.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fusemerge.checkpoint.dtypes import FLOAT_CODES, ITEM_SIZE, code_for_name
from fusemerge.checkpoint.reader import ModelFolder, TensorInfo
from fusemerge.checkpoint.writer import PlannedTensor, Shard, plan_shards
from fusemerge.errors import FusemergeError
from fusemerge.merge.kernels.chunks import CHUNK_ELEMENTS
from fusemerge.merge.methods import MergeMethod, get_method
from fusemerge.merge.models import check_same_architecture, num_layers, open_models
from fusemerge.merge.parameters import check_parameter_names, layer_t, resolve
from fusemerge.merge.recipe import LoadedRecipe
from fusemerge.merge.routing import mergekit_reason
from fusemerge.merge.vocabulary import vocabulary_reason

# Read-ahead bound: a few tensors hide read latency; more would only raise the memory peak.
DEFAULT_PREFETCH_BYTES = 256 * 1024 * 1024
PREFETCH_TENSORS = 3
DEFAULT_RANDOM_SEED = 0
# Whole-tensor temporaries beyond the chunked ones, in bytes per element (per model where noted): the
# torch k-th value selections hold |delta| and a copy; DELLA holds one byte of mask per model; the
# spherical means and Arcee Fusion hold a few float32 copies of the tensor.
_EXTRA_BYTES_PER_ELEMENT = {
    "ties": 8,
    "breadcrumbs": 8,
    "breadcrumbs_ties": 8,
    "sce": 8,
    "della": 12,
    "della_linear": 12,
    "multislerp": 4,
    "karcher": 16,
    "arcee_fusion": 24,
    "nuslerp": 4,
    "model_stock": 4,
}
# On the CPU (float32 work) the numba kernels replace the torch selections: TIES' and SCE's top-k is a
# radix select over histograms (SCE recomputes each variance in every pass), so they hold no whole-tensor
# temporary; DARE's kernels hold each model's drawn mask as packed bits (1/8 byte per element per model).
_CPU_EXTRA_BYTES_PER_ELEMENT = {**_EXTRA_BYTES_PER_ELEMENT, "ties": 0, "sce": 0}
_CPU_MASK_BITS_PER_MODEL = {"dare_ties", "dare_linear"}


@dataclass
class TensorTask:
    """One output tensor. `inputs` are in the method's order; `copy_from` marks non-float passthrough."""

    name: str
    shape: tuple[int, ...]
    out_dtype: str
    work_dtype: str | None
    inputs: list[TensorInfo]
    base: TensorInfo | None
    shared: dict[str, Any] = field(default_factory=dict)
    per_model: dict[str, list[Any]] = field(default_factory=dict)
    group: str | None = None
    copy_from: TensorInfo | None = None

    @property
    def read_bytes(self) -> int:
        if self.copy_from is not None:
            return self.copy_from.nbytes
        return sum(i.nbytes for i in self.inputs) + (self.base.nbytes if self.base else 0)

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def write_bytes(self) -> int:
        return self.numel * ITEM_SIZE[self.out_dtype]


@dataclass
class MergePlan:
    loaded: LoadedRecipe
    method: MergeMethod
    folders: dict[str, ModelFolder]
    base_ref: str | None
    input_refs: list[str]
    tasks: list[TensorTask]
    shards: list[Shard]
    random_seed: int = DEFAULT_RANDOM_SEED

    @property
    def bytes_read(self) -> int:
        return sum(t.read_bytes for t in self.tasks)

    @property
    def bytes_written(self) -> int:
        return sum(t.write_bytes for t in self.tasks)

    @property
    def needs_group_pass(self) -> bool:
        return self.method.stats is not None and any(t.group not in (None, t.name) for t in self.tasks)

    def peak_memory_estimate(self, prefetch_bytes: int = DEFAULT_PREFETCH_BYTES, device: str = "cpu") -> int:
        """Largest tensor's raw inputs + its float32 result + cast + chunk temporaries, plus the prefetch.

        `device` is where the arithmetic runs: the CPU kernels need fewer whole-tensor temporaries than
        the torch paths (see `_CPU_EXTRA_BYTES_PER_ELEMENT`)."""
        from fusemerge.merge.elementwise import stream_bytes, streamable

        if not self.needs_group_pass and streamable(self, self.tasks, device):
            return stream_bytes(self.tasks)
        cpu = device == "cpu"
        extra = (_CPU_EXTRA_BYTES_PER_ELEMENT if cpu else _EXTRA_BYTES_PER_ELEMENT).get(self.method.name, 0)
        worst = 0
        for t in self.tasks:
            n_inputs = len(t.inputs) + (1 if t.base else 0)
            temps = 4 * min(t.numel, CHUNK_ELEMENTS) * (n_inputs + 4)
            selection = extra * t.numel
            if cpu and self.method.name in _CPU_MASK_BITS_PER_MODEL:
                selection += len(t.inputs) * ((t.numel + 7) // 8)
            worst = max(worst, t.read_bytes + 4 * t.numel + t.write_bytes + temps + selection)
        biggest_read = max((t.read_bytes for t in self.tasks), default=0)
        return (
            worst
            + min(prefetch_bytes, biggest_read)
            + 2 * max((t.write_bytes for t in self.tasks), default=0)
        )

    def folder_of(self, info: TensorInfo) -> ModelFolder:
        """The model folder whose catalog entry `info` is. By identity, not by file: `base+lora` reads the
        base's files through another folder object that folds the adapter in."""
        if not hasattr(self, "_by_entry"):
            self._by_entry = {id(t): f for f in self.folders.values() for t in f.tensors.values()}
        return self._by_entry[id(info)]

    def fingerprint(self) -> str:
        """Identifies recipe + inputs + layout: a resume only continues a merge with the same fingerprint."""
        inputs = []
        for ref, folder in sorted(self.folders.items()):
            files = sorted({info.file for info in folder.tensors.values()} | set(folder_extra_files(folder)))
            inputs.append([ref, [[f.name, (s := f.stat()).st_size, s.st_mtime_ns] for f in files]])
        layout = [[s.filename, [[t.name, t.dtype, list(t.shape)] for t in s.tensors]] for s in self.shards]
        seed = self.random_seed if self.method.random else None
        blob = json.dumps(
            {"recipe": self.loaded.text, "inputs": inputs, "layout": layout, "seed": seed}, sort_keys=True
        )
        return hashlib.sha256(blob.encode()).hexdigest()


def folder_extra_files(folder: ModelFolder) -> list[Path]:
    """Files besides the tensor shards that change a folder's tensors (a LoRA adapter's weights)."""
    return list(getattr(folder, "extra_files", ()))


def build_plan(
    loaded: LoadedRecipe,
    *,
    out_shard_size: int,
    allow_pickle: bool = False,
    random_seed: int | None = None,
    strict: bool = False,
    warn: Callable[[FusemergeError], None] | None = None,
) -> MergePlan:
    """The whole merge, checked and planned before any tensor is read. A parameter the method does not
    use goes to `warn` (ignored, as mergekit ignores it), or is an error with `strict`."""
    recipe = loaded.recipe
    check_streaming_features(loaded)
    try:
        method = get_method(recipe.merge_method)
    except FusemergeError as exc:
        raise FusemergeError(exc.message, file=loaded.path, key="merge_method") from None
    base_ref, input_refs = _arrange_inputs(loaded, method)
    work_dtype = code_for_name(recipe.dtype, key="dtype") if recipe.dtype else None
    out_dtype = code_for_name(recipe.out_dtype, key="out_dtype") if recipe.out_dtype else None
    _check_parameter_names(loaded, method, strict=strict, warn=warn)

    folders = open_models(
        recipe.referenced_models(), recipe_dir=loaded.path.parent, allow_pickle=allow_pickle
    )
    for folder in folders.values():
        _ = folder.config  # every config.json must parse, not only the reference's
    reference = folders[base_ref] if base_ref else folders[input_refs[0]]
    check_same_architecture(
        {ref: f.config for ref, f in folders.items()},
        base_ref or input_refs[0],
        label=str(reference.path),
        file=loaded.path,
    )
    layers = num_layers(reference)
    model_params = {m.model: m.parameters for m in recipe.models or []}
    model_keys = {m.model: f"models[{i}]" for i, m in enumerate(recipe.models or [])}

    tasks: list[TensorTask] = []
    ordered = sorted(reference.tensors.values(), key=lambda i: (str(i.file), i.start))
    for info in ordered:
        _check_same_tensor(info, reference, folders, [*([base_ref] if base_ref else []), *input_refs])
        t = layer_t(info.name, layers)
        task_out = out_dtype or work_dtype or info.dtype
        if info.dtype not in FLOAT_CODES:
            tasks.append(TensorTask(info.name, info.shape, info.dtype, None, [], None, copy_from=info))
            continue
        shared = {
            name: resolve(name, p, [recipe.parameters], tensor_name=info.name, t=t, wheres=["parameters"])
            for name, p in method.shared.items()
        }
        per_model = {
            name: [
                resolve(
                    name,
                    p,
                    [model_params.get(ref), recipe.parameters],
                    tensor_name=info.name,
                    t=t,
                    model=ref,
                    wheres=[f"{model_keys.get(ref, 'base_model')}.parameters", "parameters"],
                    missing_key=f"{model_keys.get(ref, 'base_model')}.parameters.{name}",
                )
                for ref in input_refs
            ]
            for name, p in method.per_model.items()
        }
        task = TensorTask(
            name=info.name,
            shape=info.shape,
            out_dtype=task_out,
            work_dtype=work_dtype,
            inputs=[folders[ref].tensors[info.name] for ref in input_refs],
            base=folders[base_ref].tensors[info.name] if base_ref else None,
            shared=shared,
            per_model=per_model,
        )
        if method.check is not None:
            try:
                method.check(shared, per_model)
            except FusemergeError as exc:
                raise FusemergeError(exc.message, file=loaded.path, key=exc.key, tensor=info.name) from None
        if method.group_key is not None:
            task.group = method.group_key(info.name, shared)
        tasks.append(task)
    if not tasks:
        raise FusemergeError("the models hold no tensors", file=reference.path)
    planned = [PlannedTensor(t.name, t.out_dtype, t.shape) for t in tasks]
    shards = plan_shards(planned, out_shard_size)
    seed = DEFAULT_RANDOM_SEED if random_seed is None else random_seed
    return MergePlan(loaded, method, folders, base_ref, input_refs, tasks, shards, random_seed=seed)


def check_streaming_features(loaded: LoadedRecipe) -> None:
    """Refuse, by name, what only the mergekit fallback engine does (see `fusemerge.merge.routing`).

    That the recipe lists models at all is checked once, when it is parsed (`fusemerge.merge.recipe`).
    """
    reason = mergekit_reason(loaded.recipe) or vocabulary_reason(loaded)
    if reason is not None:
        key, what = reason
        raise FusemergeError(
            f"{what} is not supported by the streaming engine; use --engine mergekit (or auto)",
            file=loaded.path,
            key=key,
        )


def _arrange_inputs(loaded: LoadedRecipe, method: MergeMethod) -> tuple[str | None, list[str]]:
    """(base, non-base inputs in recipe order), following the method's base policy as mergekit does."""
    recipe = loaded.recipe
    refs = [m.model for m in recipe.models or []]
    if len(set(refs)) != len(refs):
        dup = next(r for r in refs if refs.count(r) > 1)
        raise FusemergeError(f"model '{dup}' is listed twice", file=loaded.path, key="models")
    base = recipe.base_model
    if method.base == "required" and base is None:
        raise FusemergeError(
            f"merge method '{method.name}' needs a base_model", file=loaded.path, key="base_model"
        )
    if method.base == "ignored":
        inputs = refs + ([base] if base is not None and base not in refs else [])
        base = None
    else:
        inputs = [r for r in refs if r != base]
    if len(inputs) < method.min_models:
        raise FusemergeError(
            f"merge method '{method.name}' needs at least {method.min_models} model(s) besides the base, "
            f"got {len(inputs)}",
            file=loaded.path,
            key="models",
        )
    if method.max_models is not None and len(inputs) > method.max_models:
        raise FusemergeError(
            f"merge method '{method.name}' takes at most {method.max_models} model(s) besides the base, got {len(inputs)}",
            file=loaded.path,
            key="models",
        )
    return base, inputs


def _check_parameter_names(
    loaded: LoadedRecipe,
    method: MergeMethod,
    *,
    strict: bool,
    warn: Callable[[FusemergeError], None] | None,
) -> None:
    known = set(method.shared) | set(method.per_model)
    recipe = loaded.recipe
    scopes = [("parameters", recipe.parameters)] + [
        (f"models[{i}].parameters", m.parameters) for i, m in enumerate(recipe.models or [])
    ]
    for where, scope in scopes:
        check_parameter_names(method.name, known, where, scope, file=loaded.path, strict=strict, warn=warn)
        if where != "parameters":
            for name in scope or {}:
                if name in method.shared and name not in method.per_model:
                    raise FusemergeError(
                        f"'{name}' is a recipe-wide parameter of '{method.name}'; set it under the top-level parameters",
                        file=loaded.path,
                        key=f"{where}.{name}",
                    )


def _check_same_tensor(
    info: TensorInfo, reference: ModelFolder, folders: dict[str, ModelFolder], refs: list[str]
) -> None:
    for ref in refs:
        other = folders[ref].tensors.get(info.name)
        if other is None:
            raise FusemergeError(
                f"tensor missing in model '{ref}' (present in {reference.path})", tensor=info.name
            )
        if other.shape != info.shape:
            raise FusemergeError(
                f"shapes differ: {list(info.shape)} in {reference.path} but {list(other.shape)} in '{ref}'",
                tensor=info.name,
            )
        if (other.dtype in FLOAT_CODES) != (info.dtype in FLOAT_CODES):
            raise FusemergeError(
                f"cannot merge a {info.dtype} tensor ({reference.path}) with a {other.dtype} one ('{ref}')",
                tensor=info.name,
            )


def describe(plan: MergePlan, out: Path | None = None, device: str = "cpu") -> str:
    """The --dry-run report (`device`: where the arithmetic would run, which changes the memory peak)."""
    gib = 1024**3
    lines = [
        f"recipe:         {plan.loaded.path}",
        f"method:         {plan.method.name} ({plan.method.pretty_name})",
        f"base model:     {plan.base_ref or '-'}",
        f"models:         {', '.join(plan.input_refs)}",
        *([f"random seed:    {plan.random_seed}"] if plan.method.random else []),
        f"tensors:        {len(plan.tasks)}",
        f"bytes to read:  {plan.bytes_read / gib:.3f} GiB",
        f"bytes to write: {plan.bytes_written / gib:.3f} GiB in {len(plan.shards)} shard(s)",
        f"peak memory:    about {plan.peak_memory_estimate(device=device) / gib:.2f} GiB (estimate)",
    ]
    if plan.needs_group_pass:
        lines.append("statistics:     a first pass reads every input once to pool variation statistics")
    if out is not None:
        lines.append(f"output:         {out}")
    return "\n".join(lines)
