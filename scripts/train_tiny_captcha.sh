#!/usr/bin/env bash
# Reproduce the tiny CogVLM shipped in checkpoints/cogvlm-tiny-captcha (and its LoRA demo) on CPU:
#   1. render clean captchas, split them 80/5/15
#   2. train the tiny CogVLM of scripts/tiny_captcha/model_config.json from scratch (all weights)
#   3. LoRA on top of it on the "shifted" style (serif fonts, colours, mild rotation); LoRA plus the ViT
#      MLPs train. `--mode pretrain` because SAT's finetune mode runs its first 100 steps at 5% of the lr,
#      half of this short run.
# Usage: bash scripts/train_tiny_captcha.sh [pretrain|lora|all]   (WORK=/tmp/... for the data)
set -euo pipefail
cd "$(dirname "$0")/.."
STAGE=${1:-all}
WORK=${WORK:-/tmp/cogvlm-tiny-captcha}   # data, training runs
OUT=${OUT:-checkpoints}                   # where the final models go
TOKENIZER=scripts/tiny_captcha/tokenizer  # one token per character (scripts/make_char_tokenizer.py)
COMMON="--local_tokenizer $TOKENIZER --version base --max_length 96 --split 1. --log-interval 100 \
        --lr-decay-style cosine --eval-batch-size 96 --eval-iters 1 --seed 2023 --summary-dir $WORK/summary"

if [[ $STAGE == pretrain || $STAGE == all ]]; then
    [[ -d $WORK/clean_split ]] || {
        python scripts/make_captcha_dataset.py --out "$WORK/clean" --count 24000 --style clean --seed 0
        python scripts/split_dataset.py --src "$WORK/clean" --dst "$WORK/clean_split" --link
    }
    # Batch 64 (scripts/tiny_captcha/ds_config.json) on 2 threads, images decoded once and kept in
    # memory (--cache_images, no loader worker competing for the 2 cores). --epochs 7 (= 2100 steps of
    # 19200 images) rather than --train-iters: SAT then shuffles with one permutation instead of
    # seeding an RNG per sample, which cost ~50 ms of each ~0.45 s step.
    OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} python finetune_demo.py --from_pretrained scripts/tiny_captcha \
        --from_scratch --full_finetune --mode pretrain $COMMON --deepspeed_config scripts/tiny_captcha/ds_config.json \
        --num-workers 0 --cache_images --epochs 7 --lr 1e-3 --warmup 0.05 \
        --train-data "$WORK/clean_split/train" --valid-data "$WORK/clean_split/valid" \
        --save "$WORK/runs" --experiment-name tiny-clean --save-interval 500 --eval-interval 500 \
        --final_save $OUT/cogvlm-tiny-captcha
    mkdir -p "$OUT/cogvlm-tiny-captcha/tokenizer" && cp "$TOKENIZER"/* "$OUT/cogvlm-tiny-captcha/tokenizer/"
fi

if [[ $STAGE == lora || $STAGE == all ]]; then
    [[ -d $WORK/shifted_split ]] || {
        python scripts/make_captcha_dataset.py --out "$WORK/shifted" --count 4000 --style shifted --seed 0
        python scripts/split_dataset.py --src "$WORK/shifted" --dst "$WORK/shifted_split" --link
    }
    OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} python finetune_demo.py --from_pretrained $OUT/cogvlm-tiny-captcha \
        --use_lora --lora_rank 8 --vit_mlp_layers 0 1 --mode pretrain $COMMON --deepspeed_config scripts/ds_config_cpu.json \
        --num-workers 0 --cache_images --train-iters 600 --lr 3e-3 --warmup 0.05 \
        --train-data "$WORK/shifted_split/train" --valid-data "$WORK/shifted_split/valid" \
        --save "$WORK/runs" --experiment-name tiny-shifted-lora --save-interval 200 --eval-interval 200 \
        --final_save $OUT/cogvlm-tiny-captcha-shifted-lora --final_fp16
fi
