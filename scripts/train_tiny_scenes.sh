#!/usr/bin/env bash
# Reproduce the tiny CogVLM shipped in checkpoints/cogvlm-tiny-scenes on CPU, from nothing:
#   1. render synthetic scenes with conversations about them (scripts/make_scene_dataset.py, seed 0:
#      1-4 shapes on a 3 x 3 grid of 37 px cells, each cell one ViT patch of the model), each training
#      record filled with questions up to 200 characters (similar lengths: little padding)
#   2. train the tiny CogVLM of scripts/tiny_scenes/model_config.json from scratch (all weights) on
#      them with finetune_demo.py, the chat template and the word/two-digit tokenizer of
#      scripts/tiny_scenes/tokenizer (scripts/make_scene_tokenizer.py)
#   3. copy the tokenizer into the checkpoint (its model_config.json names its template and grounding)
# Usage: bash scripts/train_tiny_scenes.sh   (WORK=/tmp/... for the data and runs, OUT=... for the model)
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${WORK:-/tmp/cogvlm-tiny-scenes}
OUT=${OUT:-checkpoints}
CONFIG=scripts/tiny_scenes
SCENES=${SCENES:-32000}
EPOCHS=${EPOCHS:-3}

[[ -f $WORK/train/data.jsonl ]] || python scripts/make_scene_dataset.py --out "$WORK/train" --count "$SCENES" \
    --seed 0 --min_turns 10 --max_turns 10 --max_chars 200
[[ -f $WORK/valid/data.jsonl ]] || python scripts/make_scene_dataset.py --out "$WORK/valid" --count 96 --seed 1

# Batch 64 (ds_config.json) on 2 threads, images decoded once and kept in memory (--cache_images, no
# loader worker competing for the 2 cores), --epochs rather than --train-iters (one permutation
# instead of an RNG per sample), ViT positions as 2D sine-cosine codes (bench/RESULTS.md: what was tried).
OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} python finetune_demo.py --from_pretrained $CONFIG --from_scratch \
    --vit_positions sincos --full_finetune --mode pretrain --local_tokenizer $CONFIG/tokenizer --version chat \
    --max_length 320 --deepspeed_config $CONFIG/ds_config.json --num-workers 0 --cache_images \
    --epochs "$EPOCHS" --lr 1e-3 --warmup 0.05 --lr-decay-style cosine --split 1. --seed 2023 \
    --train_data "$WORK/train/data.jsonl" --valid_data "$WORK/valid/data.jsonl" \
    --eval-interval 1000 --eval-iters 1 --eval-batch-size 96 --eval_max_new_tokens 96 --log-interval 100 \
    --save "$WORK/runs" --experiment-name tiny-scenes --save-interval 1000 --summary-dir "$WORK/summary" \
    --final_save "$OUT/cogvlm-tiny-scenes"
mkdir -p "$OUT/cogvlm-tiny-scenes/tokenizer" && cp $CONFIG/tokenizer/* "$OUT/cogvlm-tiny-scenes/tokenizer/"
