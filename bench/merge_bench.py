"""fusemerge vs mergekit on the same recipes, as child processes of this one, side by side.

    python bench/merge_bench.py                       # three ~1.1B-parameter bf16 Llama models
    python bench/merge_bench.py --hidden 512 --layers 4 --methods linear,ties   # a quick run

Builds a base and two fine-tuned variants (random weights; a variant is base + small noise) once in
--workdir, warms the page cache, then for each method runs `fusemerge merge` and `mergekit-yaml` on the
same recipe and prints one JSON line: wall seconds, peak RSS of each child, and the fusemerge/mergekit
ratios. Absolute times depend on the machine; the ratios are the point. `floor_s` is the I/O floor of the
same bytes (bench/io_floor.py: read the recipe's input files once from the warm page cache, write the
output's shard sizes with the merge's own durability: flushed while written, fsynced), `x_floor`
fusemerge's time as a multiple of it; `floor_nofsync_s` / `x_floor_nofsync` the same against writes left
in the page cache (mergekit's durability: none when it returns).
Each fusemerge run alternates with a floor run, `--repeats` times (each after `sync`, so no run pays for
the writeback of the one before): the best of each side is reported, with every run's time beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from io_floor import measure_floor

RECIPES = {
    "linear": """merge_method: linear
models:
  - model: {base}
    parameters: {{weight: 0.4}}
  - model: {ft1}
    parameters: {{weight: 0.3}}
  - model: {ft2}
    parameters: {{weight: 0.3}}
dtype: bfloat16
""",
    "task_arithmetic": """merge_method: task_arithmetic
base_model: {base}
models:
  - model: {ft1}
    parameters: {{weight: 0.5}}
  - model: {ft2}
    parameters: {{weight: 0.5}}
dtype: bfloat16
""",
    "ties": """merge_method: ties
base_model: {base}
models:
  - model: {ft1}
    parameters: {{weight: 0.5, density: 0.5}}
  - model: {ft2}
    parameters: {{weight: 0.5, density: 0.5}}
dtype: bfloat16
""",
    "slerp": """merge_method: slerp
base_model: {base}
models:
  - model: {base}
  - model: {ft1}
parameters:
  t: [0, 0.5, 1]
dtype: bfloat16
""",
    "dare_ties": """merge_method: dare_ties
base_model: {base}
models:
  - model: {ft1}
    parameters: {{weight: 0.5, density: 0.5}}
  - model: {ft2}
    parameters: {{weight: 0.5, density: 0.5}}
dtype: bfloat16
""",
    "sce": """merge_method: sce
base_model: {base}
models:
  - model: {ft1}
  - model: {ft2}
parameters: {{select_topk: 0.5}}
dtype: bfloat16
""",
    "variation_ratio": """merge_method: variation_ratio
base_model: {base}
models:
  - model: {ft1}
  - model: {ft2}
dtype: bfloat16
""",
}
MERGEKIT_ONLY_UNSUPPORTED = {"variation_ratio"}


def build_models(workdir: Path, args: argparse.Namespace) -> dict[str, Path]:
    """Random bf16 Llama checkpoints written tensor by tensor (no model object: fast and lean)."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    from fusemerge.offline.assets import load_shipped_tokenizer

    config = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads,
        tie_word_embeddings=False,
        dtype="bfloat16",
    )
    config.architectures = ["LlamaForCausalLM"]
    tokenizer = load_shipped_tokenizer("mistral")
    h, i, v = args.hidden, args.intermediate, args.vocab
    shapes = {"model.embed_tokens.weight": (v, h)}
    for layer in range(args.layers):
        p = f"model.layers.{layer}."
        shapes.update(
            {
                p + "input_layernorm.weight": (h,),
                p + "post_attention_layernorm.weight": (h,),
                p + "self_attn.q_proj.weight": (h, h),
                p + "self_attn.k_proj.weight": (h, h),
                p + "self_attn.v_proj.weight": (h, h),
                p + "self_attn.o_proj.weight": (h, h),
                p + "mlp.gate_proj.weight": (i, h),
                p + "mlp.up_proj.weight": (i, h),
                p + "mlp.down_proj.weight": (h, i),
            }
        )
    shapes["model.norm.weight"] = (h,)
    shapes["lm_head.weight"] = (v, h)
    paths = {name: workdir / name for name in ("base", "ft1", "ft2")}
    if all((p / "model.safetensors.index.json").is_file() for p in paths.values()):
        return paths
    gen = torch.Generator().manual_seed(0)
    shard_bytes = 2 * 10**9
    for p in paths.values():
        shutil.rmtree(p, ignore_errors=True)
        p.mkdir(parents=True)
        config.save_pretrained(p)
        tokenizer.save_pretrained(p)
    names = list(shapes)
    groups: list[list[str]] = [[]]
    used = 0
    for name in names:
        n = 2 * int(torch.Size(shapes[name]).numel())
        if groups[-1] and used + n > shard_bytes:
            groups.append([])
            used = 0
        groups[-1].append(name)
        used += n
    weight_maps: dict[str, dict[str, str]] = {k: {} for k in paths}
    for g, group in enumerate(groups, start=1):
        shard = f"model-{g:05d}-of-{len(groups):05d}.safetensors"
        base = {}
        for name in group:
            shape = shapes[name]
            base[name] = (
                torch.ones(shape) if len(shape) == 1 else torch.randn(shape, generator=gen) * 0.02
            ).to(torch.bfloat16)
        save_file(base, paths["base"] / shard, metadata={"format": "pt"})
        for k, scale in (("ft1", 0.002), ("ft2", 0.003)):
            variant = {
                n: (t.float() + torch.randn(t.shape, generator=gen) * scale).to(torch.bfloat16)
                for n, t in base.items()
            }
            save_file(variant, paths[k] / shard, metadata={"format": "pt"})
            del variant
        for k in paths:
            weight_maps[k].update({n: shard for n in group})
        del base
    total = sum(2 * int(torch.Size(s).numel()) for s in shapes.values())
    for k, p in paths.items():
        index = {"metadata": {"total_size": total}, "weight_map": weight_maps[k]}
        (p / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return paths


def warm(paths: dict[str, Path]) -> None:
    for p in paths.values():
        for f in p.glob("*.safetensors"):
            with open(f, "rb") as fh:
                while fh.read(1 << 24):
                    pass


def settle(paths: dict[str, Path]) -> None:
    """Before each timed run: every earlier write on disk (`sync`: the last run's output, deleted or not,
    and, on a filesystem mounted with `discard`, the trims of deleting it), then the inputs in the page
    cache. Without it a run paid for the one before it: the floor's write took 1.3 to 8 s on this machine."""
    os.sync()
    warm(paths)


# Each tool runs inside a small wrapper that writes the child's own VmHWM (peak resident set of its
# address space) at exit: ru_maxrss of a forked child would include this process's size at fork time.
_MEASURE = """
import atexit, runpy, sys
path = sys.argv[1]
def report():
    with open(path, "w") as f:
        f.write(next(line for line in open("/proc/self/status") if line.startswith("VmHWM")))
atexit.register(report)
target, sys.argv = sys.argv[2], sys.argv[2:]
if target.endswith(".py") or "/" in target:
    runpy.run_path(target, run_name="__main__")
else:
    runpy.run_module(target, run_name="__main__")
"""


def run_child(target: str, args: list[str], workdir: Path) -> tuple[float, float, int]:
    """(wall seconds, peak RSS in MB, exit code) of one tool run in a child process.

    `target` is a module name (fusemerge.cli) or a console-script path (mergekit-yaml).
    """
    report = workdir / "peak.txt"
    report.unlink(missing_ok=True)
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", _MEASURE, str(report), target, *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        print(
            f"# {target} failed ({proc.returncode}): {proc.stderr.decode(errors='replace')[-2000:]}",
            file=sys.stderr,
        )
    peak = int(report.read_text().split()[1]) / 1024 if report.is_file() else float("nan")
    return wall, peak, proc.returncode


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=Path("bench-out"))
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=22)
    ap.add_argument("--intermediate", type=int, default=5632)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--methods", default="linear,task_arithmetic,ties,dare_ties,sce")
    ap.add_argument("--skip-mergekit", action="store_true", help="time fusemerge alone")
    ap.add_argument(
        "--repeats", type=int, default=3, help="fusemerge and floor runs per method (the best is reported)"
    )
    ap.add_argument("--mergekit-repeats", type=int, default=1, help="mergekit runs per method")
    ap.add_argument("--help-timing", action="store_true", help="also time `fusemerge --help`")
    args = ap.parse_args()

    args.workdir.mkdir(parents=True, exist_ok=True)
    paths = build_models(args.workdir / "models", args)
    params = (
        json.loads((paths["base"] / "model.safetensors.index.json").read_text())["metadata"]["total_size"]
        // 2
    )
    mergekit_script = str(Path(sys.executable).parent / "mergekit-yaml")
    for method in args.methods.split(","):
        recipe = args.workdir / f"{method}.yml"
        recipe.write_text(RECIPES[method].format(**{k: str(v) for k, v in paths.items()}))
        used = [p for p in paths.values() if str(p) in recipe.read_text()]
        inputs = [f for p in used for f in sorted(p.glob("*.safetensors"))]
        fusemerge_runs: list[float] = []
        floors: list[dict] = []
        cache_floors: list[dict] = []
        f_rss, f_ok = 0.0, True
        for _ in range(args.repeats):  # alternated, so a slow spell of the disk hits both sides
            out_f = args.workdir / f"out-fusemerge-{method}"
            settle(paths)
            f_wall, rss, f_code = run_child(
                "fusemerge.cli", ["merge", str(recipe), str(out_f), "--overwrite", "-q"], args.workdir
            )
            fusemerge_runs.append(f_wall)
            f_rss, f_ok = max(f_rss, rss), f_ok and f_code == 0
            out_sizes = [f.stat().st_size for f in sorted(out_f.glob("*.safetensors"))]
            shutil.rmtree(out_f, ignore_errors=True)
            settle(paths)
            floors.append(measure_floor(inputs, out_sizes, args.workdir / "floor"))
            settle(paths)
            cache_floors.append(measure_floor(inputs, out_sizes, args.workdir / "floor", fsync=False))
        floor = min(floors, key=lambda f: f["floor_s"])
        f_best = min(fusemerge_runs)
        tick = 1e-4  # the floors' resolution: a tiny test model's floor rounds to 0
        line: dict[str, object] = {
            "bench": "merge",
            "method": method,
            "params": params,
            "repeats": args.repeats,
            "fusemerge_s": round(f_best, 2),
            "fusemerge_median_s": round(statistics.median(fusemerge_runs), 2),
            "fusemerge_runs_s": [round(t, 2) for t in fusemerge_runs],
            "fusemerge_peak_rss_mb": round(f_rss),
            "fusemerge_ok": f_ok,
            **floor,
            "floor_runs_s": [f["floor_s"] for f in floors],
            "x_floor": round(f_best / max(floor["floor_s"], tick), 3),
            "x_floor_median": round(
                statistics.median(fusemerge_runs)
                / max(statistics.median(f["floor_s"] for f in floors), tick),
                3,
            ),
            "floor_nofsync_s": min(f["floor_s"] for f in cache_floors),
            "x_floor_nofsync": round(f_best / max(min(f["floor_s"] for f in cache_floors), tick), 3),
        }
        if not args.skip_mergekit and method not in MERGEKIT_ONLY_UNSUPPORTED:
            mergekit_runs: list[float] = []
            m_rss, m_ok = 0.0, True
            for _ in range(args.mergekit_repeats):
                out_m = args.workdir / f"out-mergekit-{method}"
                shutil.rmtree(out_m, ignore_errors=True)
                settle(paths)
                m_wall, rss, m_code = run_child(
                    mergekit_script, [str(recipe), str(out_m), "--quiet"], args.workdir
                )
                shutil.rmtree(out_m, ignore_errors=True)
                mergekit_runs.append(m_wall)
                m_rss, m_ok = max(m_rss, rss), m_ok and m_code == 0
            line.update(
                {
                    "mergekit_s": round(min(mergekit_runs), 2),
                    "mergekit_runs_s": [round(t, 2) for t in mergekit_runs],
                    "mergekit_peak_rss_mb": round(m_rss),
                    "mergekit_ok": m_ok,
                    "wall_ratio": round(f_best / min(mergekit_runs), 3),
                    "rss_ratio": round(f_rss / m_rss, 3),
                }
            )
        print(json.dumps(line), flush=True)
    if args.help_timing:
        wall, _, _ = run_child("fusemerge.cli", ["--help"], args.workdir)
        print(json.dumps({"bench": "cli_help", "fusemerge_help_s": round(wall, 3)}), flush=True)


if __name__ == "__main__":
    main()
