"""`fusemerge merge --device cuda` against `--device cpu` on the same recipes and machine, side by side.

    python bench/gpu_merge_bench.py                           # three ~300M-parameter bf16 Llama models
    python bench/gpu_merge_bench.py --layers 2 --methods linear   # a quick run

Builds a base and two fine-tuned variants with bench/merge_bench.py's builder (random bf16 weights written
tensor by tensor) in --workdir, warms the page cache, then for each method runs `fusemerge merge` on the
CPU and on the GPU as child processes (wall seconds and peak RSS of each, as bench/merge_bench.py does),
compares the two outputs (largest difference in bf16 steps) and prints one JSON line. The line names the
machine it was measured on: CPU timings use that machine's cores, not those of a developer box.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import shutil
import sys
from pathlib import Path


def compare(a: Path, b: Path) -> dict[str, float]:
    """Largest |a - b| over one bf16 step of the larger value (<= 1: within one step), and the fraction
    of elements that differ at all."""
    import torch
    from safetensors.torch import load_file

    worst, differing, total = 0.0, 0, 0
    for file in sorted(a.glob("*.safetensors")):
        x_all, y_all = load_file(file), load_file(b / file.name)
        for name, x in x_all.items():
            x, y = x.float(), y_all[name].float()
            step = torch.maximum(x.abs(), y.abs()) * 2.0**-7
            diff = (x - y).abs()
            ratio = torch.where(diff > 0, diff / step.clamp_min(1e-30), torch.zeros_like(diff))
            worst = max(worst, float(ratio.max()))
            differing += int((diff > 0).sum())
            total += x.numel()
    return {"max_diff_in_bf16_steps": round(worst, 3), "differing_fraction": differing / max(total, 1)}


def machine(device: str) -> str:
    import torch

    gpu = torch.cuda.get_device_name(torch.device(device)) if torch.cuda.is_available() else "no GPU"
    return f"{gpu}; {os.cpu_count()} CPU cores ({platform.machine()})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/fusemerge-gpu-bench"))
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=18)
    ap.add_argument("--intermediate", type=int, default=2816)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--methods", default="linear,ties")
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args()

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    merge_bench = importlib.import_module("merge_bench")

    args.workdir.mkdir(parents=True, exist_ok=True)
    paths = merge_bench.build_models(args.workdir / "models", args)
    index = json.loads((paths["base"] / "model.safetensors.index.json").read_text())
    params = index["metadata"]["total_size"] // 2
    where = machine(args.device)
    for method in args.methods.split(","):
        recipe = args.workdir / f"{method}.yml"
        recipe.write_text(merge_bench.RECIPES[method].format(**{k: str(v) for k, v in paths.items()}))
        line: dict[str, object] = {
            "bench": "merge_device",
            "measured_on": where,
            "method": method,
            "params": params,
        }
        outs = {}
        for label, device in (("cpu", "cpu"), ("gpu", args.device)):
            merge_bench.warm(paths)
            out = args.workdir / f"out-{label}-{method}"
            wall, rss, code = merge_bench.run_child(
                "fusemerge.cli",
                ["merge", str(recipe), str(out), "--device", device, "--overwrite", "-q"],
                args.workdir,
            )
            line.update(
                {f"{label}_s": round(wall, 2), f"{label}_peak_rss_mb": round(rss), f"{label}_ok": code == 0}
            )
            outs[label] = out
        if line["cpu_ok"] and line["gpu_ok"]:
            line["speedup"] = round(float(line["cpu_s"]) / float(line["gpu_s"]), 2)
            line.update(compare(outs["gpu"], outs["cpu"]))
        for out in outs.values():
            shutil.rmtree(out, ignore_errors=True)
        print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
