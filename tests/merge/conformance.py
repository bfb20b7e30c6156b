"""The conformance suite's machinery: tiny models, both CLIs on every recipe, and a verdict per recipe.

    python -m tests.merge.conformance [WORKDIR]     # the table and the count line, without pytest

Verdicts (one per recipe):
  equal       every tensor equal to mergekit's to the output dtype's rounding: float32 outputs within
              2e-7 + 2e-6·|x| (float32 rounding); bf16/fp16 outputs no element more than one step apart.
  rounding    a bf16/fp16 recipe whose outputs differ by more, and whose difference is mergekit's
              low-precision arithmetic: rerun mergekit with `dtype: float32` (and `out_dtype` the recipe's
              output dtype) and every tensor is `equal` to fusemerge's, except for at most
              TIE_FRACTION[method] of a tensor's elements in the selection methods (magnitude ties at the
              threshold, which mergekit's unstable sort breaks arbitrarily and fusemerge by index).
  mergekit    fusemerge ran the recipe through its mergekit engine (said so on its first line), and the
              outputs are `equal`.
  random      a random method (DARE, DELLA): fusemerge cannot reproduce mergekit's draws; both ran, the
              outputs have the same tensors, shapes and dtypes.
  both-refuse mergekit refuses the recipe (its own test expects that), and fusemerge refuses it too.
  fails:...   anything else: fusemerge refuses what mergekit runs, or accepts what it refuses, or the
              tensors differ beyond the bounds above (the reason follows the colon).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from string import Template

import torch
import yaml
from safetensors import safe_open

from tests.merge.conformance_cases import CASES, Case

RANDOM_METHODS = {"dare_ties", "dare_linear", "della", "della_linear"}
# Selection methods: the fraction of a tensor's elements that may differ at magnitude ties against
# mergekit run in float32 (measured on these models: see the README's numerics section).
TIE_FRACTION = {
    "ties": 0.02,
    "breadcrumbs": 0.02,
    "breadcrumbs_ties": 0.02,
    "sce": 0.01,
    "arcee_fusion": 0.01,
}
LOW = {"bfloat16": (torch.bfloat16, 8, -133), "float16": (torch.float16, 11, -24)}
CHAT_SAMPLE = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hello?"},
    {"role": "assistant", "content": "Hi."},
    {"role": "user", "content": "Bye."},
]


# -- tiny models ------------------------------------------------------------------------------------
def bpe_tokenizer(vocab: int, added: list[str]):
    """A BPE tokenizer of `vocab` plain tokens (<unk>, <s>, </s>, _tok_3...) plus `added` ones."""
    from tokenizers import Tokenizer
    from transformers import LlamaTokenizerFast

    tokens = (["<unk>", "<s>", "</s>"] + [f"_tok_{i}" for i in range(3, vocab)])[:vocab]
    spec = {
        "version": "1.0",
        "model": {"type": "BPE", "vocab": {t: i for i, t in enumerate(tokens)}, "merges": []},
    }
    tok = LlamaTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)))
    tok.add_tokens(added)
    return tok


def picollama(folder: Path, seed: int, vocab: int = 64) -> Path:
    """mergekit's tests' `make_picollama`: Llama, hidden 32, intermediate 48, 16 heads, 2 layers, HF init."""
    from fusemerge.offline.assets import build_random_model

    return build_random_model(
        folder,
        architecture="llama",
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=48,
        num_heads=16,
        num_kv_heads=16,
        num_layers=2,
        seed=seed,
    )


def _save_random(config, folder: Path, seed: int) -> Path:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder, safe_serialization=True)
    return folder


def build_models(root: Path) -> dict[str, Path]:
    from transformers import GPT2Config, GraniteConfig

    root.mkdir(parents=True, exist_ok=True)
    models = {name: picollama(root / name, seed) for seed, name in enumerate(("a", "b", "c"), start=1)}
    for seed, (name, vocab, added) in enumerate(
        (
            ("tbase", 64, []),
            ("tchatml", 66, ["<|im_start|>", "<|im_end|>"]),
            ("tpadded", 64, [f"<UNUSED_{i}>" for i in range(4)]),
            ("teot", 66, ["<|eot_id|>", "<|pad|>"]),
        ),
        start=10,
    ):
        models[name] = picollama(root / name, seed, vocab)
        bpe_tokenizer(64, added).save_pretrained(models[name])
    from tokenizers import AddedToken

    models["tspecial"] = picollama(root / "tspecial", 20, 65)
    special = bpe_tokenizer(64, [])
    special.add_special_tokens(
        {
            "additional_special_tokens": [
                AddedToken(
                    "<|existing_special|>",
                    single_word=True,
                    lstrip=True,
                    rstrip=True,
                    normalized=False,
                    special=True,
                )
            ]
        }
    )
    special.save_pretrained(models["tspecial"])
    gpt2 = GPT2Config(vocab_size=64, n_positions=64, n_embd=32, n_layer=2, n_head=4)
    models["gpt2"] = _save_random(gpt2, root / "gpt2", 30)
    granite = GraniteConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
    )
    models["granite_a"] = _save_random(granite, root / "granite_a", 31)
    models["granite_b"] = _save_random(granite, root / "granite_b", 32)
    return models


def rounded_copies(models: dict[str, Path], root: Path, dtype: str) -> dict[str, Path]:
    """The models with their float tensors rounded to `dtype`: what a `dtype: <dtype>` recipe reads.

    mergekit rounds every input to the recipe's dtype first; fed these copies with `dtype: float32`, it
    reads the same rounded numbers and then computes in float32, as fusemerge does.
    """
    import shutil

    from safetensors.torch import load_file, save_file

    out = {}
    for name, folder in models.items():
        target = root / dtype / name
        if not target.is_dir():
            target.mkdir(parents=True)
            for item in folder.iterdir():
                if item.suffix == ".safetensors":
                    tensors = {
                        k: t.to(LOW[dtype][0]) if t.is_floating_point() else t
                        for k, t in load_file(item).items()
                    }
                    save_file(tensors, target / item.name, metadata={"format": "pt"})
                elif item.is_file():
                    shutil.copy(item, target / item.name)
        out[name] = target
    return out


# -- running both tools -----------------------------------------------------------------------------
@dataclass
class Run:
    ok: bool
    message: str
    out: Path


def run_fusemerge(recipe: Path, out: Path, seed: int | None, extra: tuple[str, ...] = ()) -> Run:
    """`fusemerge merge RECIPE OUT` through its click command, in this process."""
    from click.testing import CliRunner

    from fusemerge.cli import main

    args = ["merge", str(recipe), str(out), "--overwrite", "-q", *extra]
    if seed is not None:
        args += ["--random-seed", str(seed)]
    result = CliRunner().invoke(main, args, catch_exceptions=True)
    message = (result.output or "") + (getattr(result, "stderr", "") or "")
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        message += f"{type(result.exception).__name__}: {result.exception}"
    return Run(result.exit_code == 0, message.strip(), out)


def run_mergekit(jobs: list[tuple[str, list[str]]], workdir: Path) -> list[dict]:
    """Every (tool, args) of `jobs` through the mergekit CLIs, in one child process."""
    jobs_file, results_file = workdir / "mergekit-jobs.json", workdir / "mergekit-results.json"
    jobs_file.write_text(json.dumps([{"tool": t, "args": a} for t, a in jobs]))
    repo = Path(__file__).resolve().parents[2]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(repo), os.environ.get("PYTHONPATH")])),
    }
    subprocess.run(
        [sys.executable, "-m", "tests.merge.mergekit_cli_batch", str(jobs_file), str(results_file)],
        check=True,
        cwd=repo,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    return json.loads(results_file.read_text())


def _mergekit_args(case: Case, recipe: Path, out: Path) -> list[str]:
    args = [str(recipe), str(out)]
    if case.tool == "mergekit-moe":
        args += ["--device", "cpu"]
    if case.seed is not None:
        args += ["--random-seed", str(case.seed)]
    return args


# -- comparing outputs ------------------------------------------------------------------------------
def load_tensors(folder: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(file, framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                tensors[name] = f.get_tensor(name)
    return tensors


def steps_apart(
    ours: torch.Tensor, theirs: torch.Tensor, dtype: str, inputs: torch.Tensor | None = None
) -> torch.Tensor:
    """|ours - theirs| in steps of the low-precision `dtype` at the scale of the larger operand.

    The operands include the inputs (`inputs`: their largest magnitude per element) where given: where
    the inputs nearly cancel, their own rounding to `dtype`, not the tiny result's, bounds what either
    tool can get right (0 against 3e-10 from inputs of 0.02 is no difference).
    """
    _, bits, min_exp = LOW[dtype]
    a, b = ours.float(), theirs.float()
    scale = torch.maximum(a.abs(), b.abs())
    if inputs is not None and inputs.shape == scale.shape:
        scale = torch.maximum(scale, inputs)
    _, exponent = torch.frexp(scale)
    spacing = torch.ldexp(torch.ones_like(a), torch.clamp(exponent - bits, min=min_exp))
    return (a - b).abs() / spacing


@dataclass
class Comparison:
    problem: str = ""  # names/shapes differ
    beyond: dict[str, float] = field(default_factory=dict)  # tensor -> fraction beyond the bound

    @property
    def equal(self) -> bool:
        return not self.problem and not self.beyond


def input_scale(models: list[Path]) -> dict[str, torch.Tensor]:
    """Per tensor name, the largest magnitude over the recipe's input models, element by element."""
    scale: dict[str, torch.Tensor] = {}
    for folder in models:
        for name, t in load_tensors(folder).items():
            t = t.float().abs()
            if name in scale and scale[name].shape == t.shape:
                scale[name] = torch.maximum(scale[name], t)
            elif name not in scale:
                scale[name] = t
    return scale


def compare(
    ours: dict[str, torch.Tensor],
    theirs: dict[str, torch.Tensor],
    out_dtype: str,
    inputs: dict[str, torch.Tensor] | None = None,
) -> Comparison:
    if set(ours) != set(theirs):
        return Comparison(problem=f"tensor names differ: {sorted(set(ours) ^ set(theirs))[:4]}")
    result = Comparison()
    for name, expected in theirs.items():
        got = ours[name]
        if got.shape != expected.shape:
            return Comparison(problem=f"'{name}' shape {list(got.shape)} vs mergekit {list(expected.shape)}")
        if out_dtype in LOW:
            bad = steps_apart(got, expected.to(LOW[out_dtype][0]), out_dtype, (inputs or {}).get(name)) > 1
        else:
            bad = ~torch.isclose(got.float(), expected.float(), rtol=2e-6, atol=2e-7)
        if bool(bad.any()):
            result.beyond[name] = float(bad.float().mean())
    return result


def _dtypes(text: str) -> tuple[str | None, str]:
    data = yaml.safe_load(text)
    work = data.get("dtype")
    return work, data.get("out_dtype") or work or "float32"


def _float32_work(text: str, out_dtype: str) -> str:
    """The recipe with mergekit's arithmetic in float32 (its inputs are then the rounded copies)."""
    data = yaml.safe_load(text)
    data["dtype"], data["out_dtype"] = "float32", out_dtype
    return yaml.safe_dump(data, sort_keys=False)


def chat_template_text(folder: Path) -> str | None:
    """The output folder's chat template rendered on a sample conversation (None: it has none)."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    template = None
    if (folder / "chat_template.jinja").is_file():
        template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
    elif (folder / "tokenizer_config.json").is_file():
        template = json.loads((folder / "tokenizer_config.json").read_text()).get("chat_template")
    if template is None:
        return None
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    return env.from_string(template).render(
        messages=CHAT_SAMPLE, add_generation_prompt=True, bos_token="<s>", eos_token="</s>"
    )


# -- verdicts ---------------------------------------------------------------------------------------
@dataclass
class Verdict:
    name: str
    source: str
    verdict: str
    detail: str = ""
    # for `rounding`: the largest fraction of a tensor more than one step from mergekit's own output
    worst_fraction: float = 0.0
    overall_fraction: float = 0.0


def _overall(ours, theirs, out_dtype: str, inputs: dict[str, torch.Tensor]) -> float:
    total = sum(t.numel() for t in theirs.values())
    bad = sum(
        int((steps_apart(ours[n], t.to(LOW[out_dtype][0]), out_dtype, inputs.get(n)) > 1).sum())
        for n, t in theirs.items()
    )
    return bad / total


def _referenced(text: str, models: dict[str, Path]) -> list[Path]:
    """The model folders a recipe text names."""
    by_path = {str(p): p for p in models.values()}
    found: list[Path] = []

    def walk(node) -> None:
        if isinstance(node, dict):
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)
        elif isinstance(node, str) and node in by_path and by_path[node] not in found:
            found.append(by_path[node])

    walk(yaml.safe_load(text))
    return found


def run_suite(workdir: Path) -> list[Verdict]:
    models = build_models(workdir / "models")
    subst = {k: str(v) for k, v in models.items()}
    recipes = workdir / "recipes"
    recipes.mkdir(exist_ok=True)
    jobs: list[tuple[str, list[str]]] = []
    plan = []
    for case in CASES:
        text = Template(case.recipe).substitute(subst)
        recipe = recipes / f"{case.name}.yml"
        recipe.write_text(text)
        work, out_dtype = _dtypes(text)
        theirs = workdir / "mergekit" / case.name
        jobs.append((case.tool, _mergekit_args(case, recipe, theirs)))
        f32 = None
        if work in LOW and case.tool == "mergekit-yaml":
            rounded = {k: str(v) for k, v in rounded_copies(models, workdir / "rounded", work).items()}
            f32_recipe = recipes / f"{case.name}.float32-work.yml"
            f32_recipe.write_text(_float32_work(Template(case.recipe).substitute(rounded), out_dtype))
            f32 = workdir / "mergekit-f32" / case.name
            jobs.append((case.tool, _mergekit_args(case, f32_recipe, f32)))
        plan.append((case, text, recipe, out_dtype, theirs, f32))
    results = iter(run_mergekit(jobs, workdir))
    verdicts = []
    for case, text, recipe, out_dtype, theirs, f32 in plan:
        mk = next(results)
        mk32 = next(results) if f32 is not None else None
        ours = run_fusemerge(recipe, workdir / "fusemerge" / case.name, case.seed)
        inputs = input_scale(_referenced(text, models)) if out_dtype in LOW else {}
        verdicts.append(_judge(case, text, out_dtype, ours, mk, theirs, mk32, f32, inputs))
    return verdicts


def _judge(case, text, out_dtype, ours: Run, mk: dict, theirs: Path, mk32, f32, inputs) -> Verdict:
    v = Verdict(case.name, case.source, "")
    if not ours.ok and not mk["ok"]:
        return Verdict(
            case.name,
            case.source,
            "both-refuse",
            f"fusemerge: {_last(ours.message)} | mergekit: {mk['error']}",
        )
    if not ours.ok:
        return Verdict(case.name, case.source, "fails:fusemerge-refuses", _last(ours.message))
    if not mk["ok"]:
        return Verdict(case.name, case.source, "fails:mergekit-refuses", mk["error"])
    a, b = load_tensors(ours.out), load_tensors(theirs)
    method = (yaml.safe_load(text) or {}).get("merge_method", "")
    comparison = compare(a, b, out_dtype, inputs)
    if comparison.problem:
        return Verdict(case.name, case.source, "fails:differs", comparison.problem)
    if "chat_template" in text:
        ours_chat, theirs_chat = chat_template_text(ours.out), chat_template_text(theirs)
        if ours_chat != theirs_chat:
            return Verdict(
                case.name, case.source, "fails:chat-template", f"{ours_chat!r} vs {theirs_chat!r}"[:300]
            )
    if method in RANDOM_METHODS and "engine: mergekit" not in ours.message:
        if any(a[n].dtype != b[n].dtype for n in b):
            return Verdict(case.name, case.source, "fails:differs", "dtypes differ")
        return Verdict(case.name, case.source, "random")
    via_mergekit = "engine: mergekit" in ours.message
    if comparison.equal:
        return Verdict(case.name, case.source, "mergekit" if via_mergekit else "equal")
    worst = max(comparison.beyond.values())
    detail = f"{len(comparison.beyond)} tensors differ, worst {worst:.2%} of a tensor"
    if via_mergekit or out_dtype not in LOW or mk32 is None:
        return Verdict(case.name, case.source, "fails:differs", detail)
    if not mk32["ok"]:
        return Verdict(case.name, case.source, "fails:differs", detail + "; mergekit at float32 refused")
    again = compare(a, load_tensors(f32), out_dtype, inputs)
    allowed = TIE_FRACTION.get(method, 0.0)
    if again.problem or any(f > allowed for f in again.beyond.values()):
        worst32 = max(again.beyond.values(), default=0.0)
        return Verdict(
            case.name, case.source, "fails:differs", detail + f"; vs mergekit at float32 still {worst32:.2%}"
        )
    v.verdict, v.worst_fraction, v.overall_fraction = "rounding", worst, _overall(a, b, out_dtype, inputs)
    v.detail = detail
    return v


def _last(message: str) -> str:
    lines = [ln for ln in message.splitlines() if ln.strip()]
    return lines[-1][:300] if lines else ""


def summary(verdicts: list[Verdict]) -> str:
    counts = Counter(v.verdict.split(":")[0] for v in verdicts)
    return (
        f"{counts['equal']} of {len(verdicts)} recipes equal, {counts['rounding']} differ only by the documented "
        f"low-precision rounding, {counts['mergekit']} run through the mergekit engine, {counts['random']} random "
        f"(DARE/DELLA: same tensors, other draws), {counts['both-refuse']} refused by both, {counts['fails']} fail"
    )


def table(verdicts: list[Verdict]) -> str:
    rows = []
    for v in verdicts:
        extra = (
            f" (overall {v.overall_fraction:.2%}, worst tensor {v.worst_fraction:.2%})"
            if v.verdict == "rounding"
            else ""
        )
        detail = re.sub(r"\s+", " ", v.detail)[:160] if v.verdict.startswith("fails") else ""
        rows.append(f"{v.name:38} {v.verdict:24}{extra} {detail}")
    return "\n".join(rows)


def main(argv: list[str]) -> None:
    workdir = Path(argv[0]) if argv else Path(tempfile.mkdtemp(prefix="conformance-"))
    verdicts = run_suite(workdir)
    print(table(verdicts))
    print(summary(verdicts))


if __name__ == "__main__":
    main(sys.argv[1:])
