#!/usr/bin/env bash
# Loss parity on GPUs: tiny models trained on the synthetic copy task in bf16 for a few hundred steps.
#
#   1 GPU : our modeling files (fused kernels) vs the stock transformers class with eager attention, same
#           initial weights and data, for LLaMA (GQA, RoPE) and BLOOM (ALiBi); plus the stock classes routed
#           through our kernels by the registry (--attn_implementation mea) and by the patch (--use_flash_attn).
#           Qwen (first generation) has no stock class: our modeling file on its auto backends vs the same file
#           on its eager attention backend (--attn_implementation eager), same weights and data.
#   2 GPUs: the same LLaMA run under torchrun with DDP and with FSDP2 (half the per-device batch, same global
#           batch and data) against the 1-GPU run. Skipped when fewer than 2 GPUs are visible.
#
# Usage (from the repository root):  OUT=docs/loss_parity bash scripts/loss_parity.sh
# Environment: OUT (results: loss logs, run.json, PNGs, summary JSON; default docs/loss_parity),
#              RUNS (scratch for checkpoints; default /tmp/mea-loss-parity), STEPS (default 300),
#              MAX_DIFF (smoothed-loss tolerance reported as pass/fail; default 0.05),
#              PARTS ("single multi" by default; "single" = the 1-GPU comparisons, "multi" = DDP/FSDP2),
#              PARALLEL (1: the 1-GPU runs start together, the tiny models sharing the GPU; default 0).
set -uo pipefail

OUT=${OUT:-docs/loss_parity}
RUNS=${RUNS:-/tmp/mea-loss-parity}
STEPS=${STEPS:-300}
MAX_DIFF=${MAX_DIFF:-0.05}
PARTS=${PARTS:-single multi}
PARALLEL=${PARALLEL:-0}
GPUS=$(python -c "import torch; print(torch.cuda.device_count())")
mkdir -p "$OUT" "$RUNS"
rm -f "$OUT/status.txt"

COMMON=(--synthetic --steps "$STEPS" --seq-len 512 --lr 1e-3 --warmup 20 --bf16 --seed 0 --no-progress
        --tiny-hidden 256 --tiny-layers 4 --tiny-heads 4 --tiny-vocab 512)

run() {  # run NAME [torchrun N] -- train.py arguments...
    local name=$1; shift
    local launcher=(python)
    if [[ $1 == torchrun ]]; then launcher=(torchrun --nproc_per_node="$2" --master_port=$((29500 + RANDOM % 1000))); shift 2; fi
    shift  # the "--"
    rm -rf "${RUNS:?}/$name"
    echo "== $name: ${launcher[*]} scripts/train.py $*"
    local start=$SECONDS
    if "${launcher[@]}" scripts/train.py "$@" --output-dir "$RUNS/$name" > "$RUNS/$name.log" 2>&1; then
        echo "$name ok $((SECONDS - start))s" | tee -a "$OUT/status.txt"
    else
        echo "$name FAILED (exit $?), last lines of $RUNS/$name.log:" | tee -a "$OUT/status.txt"
        tail -n 20 "$RUNS/$name.log" | tee -a "$OUT/status.txt"
    fi
    mkdir -p "$OUT/$name"
    cp "$RUNS/$name/loss.jsonl" "$RUNS/$name/run.json" "$OUT/$name/" 2>/dev/null
    cp "$RUNS/$name.log" "$OUT/$name/train.log"
}

compare() {  # compare PNG TITLE NAME:LABEL...
    local png=$1 title=$2; shift 2
    local logs=() labels=()
    for entry in "$@"; do logs+=("$OUT/${entry%%:*}/loss.jsonl"); labels+=("${entry#*:}"); done
    if python scripts/plot_loss.py "${logs[@]}" --labels "${labels[@]}" --title "$title" --out "$OUT/$png" \
        --max-diff "$MAX_DIFF" > "$OUT/${png%.png}.json"; then
        echo "$png parity ok (max smoothed diff <= $MAX_DIFF)" | tee -a "$OUT/status.txt"
    else
        echo "$png parity NOT within $MAX_DIFF (or a run failed): see ${png%.png}.json" | tee -a "$OUT/status.txt"
    fi
    cat "$OUT/${png%.png}.json"
}

VISIBLE=${CUDA_VISIBLE_DEVICES:-0}
ONE_GPU=${VISIBLE%%,*}

one_gpu_run() {  # one_gpu_run NAME -- train.py arguments...: on the first visible GPU, in the background with PARALLEL=1
    if [[ $PARALLEL == 1 ]]; then CUDA_VISIBLE_DEVICES=$ONE_GPU run "$@" & else CUDA_VISIBLE_DEVICES=$ONE_GPU run "$@"; fi
}

single_gpu() {
    for family in llama bloom; do
        one_gpu_run "$family-stock-eager" -- --tiny-config "$family" --attn_implementation eager --batch-size 16 "${COMMON[@]}"
        one_gpu_run "$family-ours" -- --tiny-config "$family" --trust_remote_code --batch-size 16 "${COMMON[@]}"
    done
    one_gpu_run llama-stock-registry -- --tiny-config llama --attn_implementation mea --batch-size 16 "${COMMON[@]}"
    one_gpu_run bloom-stock-patched -- --tiny-config bloom --use_flash_attn true --batch-size 16 "${COMMON[@]}"
    one_gpu_run qwen-ours-eager -- --tiny-config qwen --trust_remote_code --attn_implementation eager \
        --batch-size 16 "${COMMON[@]}"
    one_gpu_run qwen-ours -- --tiny-config qwen --trust_remote_code --batch-size 16 "${COMMON[@]}"
    wait
    compare llama_loss_parity.png "LLaMA (tiny, bf16): fused kernels vs stock eager" llama-stock-eager:"stock eager" \
        llama-ours:"ours (modeling file, fused)" llama-stock-registry:"stock + attn_implementation=mea"
    compare bloom_loss_parity.png "BLOOM (tiny, bf16, ALiBi): fused kernels vs stock eager" bloom-stock-eager:"stock eager" \
        bloom-ours:"ours (modeling file, fused)" bloom-stock-patched:"stock + apply_attention_patch"
    compare qwen_loss_parity.png "Qwen (tiny, bf16): fused kernels vs its eager attention backend (no stock class)" \
        qwen-ours-eager:"ours, eager attention backend" qwen-ours:"ours (modeling file, fused)"
}

multi_gpu() {
    if (( GPUS < 2 )); then
        echo "fewer than 2 GPUs visible ($GPUS): DDP/FSDP2 runs skipped" | tee -a "$OUT/status.txt"
        return
    fi
    [[ -f "$OUT/llama-ours/loss.jsonl" ]] || CUDA_VISIBLE_DEVICES=$ONE_GPU run llama-ours -- --tiny-config llama \
        --trust_remote_code --batch-size 16 "${COMMON[@]}"
    run llama-ours-ddp2 torchrun 2 -- --tiny-config llama --trust_remote_code --batch-size 8 "${COMMON[@]}"
    run llama-ours-fsdp2 torchrun 2 -- --tiny-config llama --trust_remote_code --batch-size 8 --fsdp "${COMMON[@]}"
    compare llama_multi_gpu.png "LLaMA (tiny, bf16): 1 GPU vs 2 GPUs (DDP, FSDP2), same global batch" \
        llama-ours:"1 GPU" llama-ours-ddp2:"2 GPUs DDP" llama-ours-fsdp2:"2 GPUs FSDP2"
}

[[ " $PARTS " == *" single "* ]] && single_gpu
[[ " $PARTS " == *" multi "* ]] && multi_gpu
echo "== status"; cat "$OUT/status.txt"
