#!/usr/bin/env bash
# Issue 15's GPU measurements in one go, for a session lent a GPU (one H200: about 5 minutes, < 8):
#
#     bash bench/mfu_gpu.sh            # from the repository root, with the wheels of .whl/ beside it
#
# 1. installs the carried wheels (.whl/*.whl, as bench/gpu_check.sh does) into /tmp/site ($GPU_CHECK_SITE);
# 2. bench/mfu_bench.py --size 1b: teacher pass, full and LoRA training of a ~1.2B Llama (random weights,
#    bf16, chat-like lengths up to 2,048), one JSON line per stage: tokens/s, TFLOP/s, MFU, peak memory,
#    padding fraction (goals: teacher >= 0.45, full >= 0.35, LoRA >= 0.30);
# 3. the same, smaller, under torch.profiler: the top ops of each stage (what holds MFU back);
# 4. bench/align_bench.py --workers $(nproc): run_align with every host core against one worker.
#
# Output: $OUT/mfu.jsonl, $OUT/mfu_profile.jsonl, $OUT/align_workers.jsonl, the log $OUT/mfu_log.txt
# (else under /tmp). Put the MFU lines into fusemerge/fuse/flops.py's MFU_TABLE (with "measured" and
# the date and device in its source) so that `fuse --dry-run` estimates from them.

set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
SITE=${GPU_CHECK_SITE:-/tmp/site}
REPORT_DIR=${OUT:-/tmp}
mkdir -p "$REPORT_DIR"

main() {
    local start=$SECONDS status=0
    echo "== fusemerge MFU check, $(date -u +%FT%TZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
    if ls .whl/*.whl >/dev/null 2>&1; then
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target "$SITE" .whl/*.whl || return 3
    else
        echo "WARNING: no .whl/ folder here: pydantic, rapidfuzz and the tokenizer packages must be installed already"
    fi
    export PYTHONPATH=$SITE:$PWD
    export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
    export TOKENIZERS_PARALLELISM=false NUMBA_CACHE_DIR=/tmp/numba-cache
    nvidia-smi -L || echo "nvidia-smi failed"
    echo "CPU cores: $(nproc)"

    echo "== MFU, ~1.2B Llama ($((SECONDS - start)) s so far)"
    timeout 180 python3 bench/mfu_bench.py --size 1b --device cuda --sequences 512 --steps 48 \
        | tee "$REPORT_DIR/mfu.jsonl" || status=1
    echo "== the same under torch.profiler, smaller ($((SECONDS - start)) s so far)"
    timeout 120 python3 bench/mfu_bench.py --size 1b --device cuda --sequences 96 --steps 3 --profile \
        | tee "$REPORT_DIR/mfu_profile.jsonl" || status=1
    echo "== align on $(nproc) workers against 1 ($((SECONDS - start)) s so far)"
    timeout 150 python3 bench/align_bench.py --workers "$(nproc)" --conversations 30000 \
        | tee "$REPORT_DIR/align_workers.jsonl" || status=1
    echo "== done in $((SECONDS - start)) s; status $status"
    return "$status"
}

main 2>&1 | tee "$REPORT_DIR/mfu_log.txt"
exit "${PIPESTATUS[0]}"
