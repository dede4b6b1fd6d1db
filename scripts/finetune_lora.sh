#!/usr/bin/env bash
# LoRA finetuning on the captcha split (the upstream recipe), shared by finetune_224_lora.sh and
# finetune_490_lora.sh. With CUDA GPUs: every visible GPU through the deepspeed launcher, ZeRO-2 bf16;
# without: one CPU process, fp32, gloo. Extra arguments are passed on to finetune_demo.py.
# Environment: MODEL_TYPE, MAX_LENGTH, MP_SIZE (model parallel), NUM_GPUS, TRAIN_DATA, VALID_DATA, SAVE,
# TOKENIZER (default: finetune_demo.py's, the released models' tokenizer).
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL_TYPE=${MODEL_TYPE:-cogvlm-base-490}
MAX_LENGTH=${MAX_LENGTH:-1288}
MP_SIZE=${MP_SIZE:-1}
TRAIN_DATA=${TRAIN_DATA:-./archive_split/train}
VALID_DATA=${VALID_DATA:-./archive_split/valid}
SAVE=${SAVE:-./checkpoints}

if python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    NUM_GPUS=${NUM_GPUS:-$(python -c "import torch; print(torch.cuda.device_count())")}
    LAUNCH=(deepspeed --master_port "${MASTER_PORT:-16666}" --num_gpus "$NUM_GPUS")
    DEVICE_ARGS=(--distributed-backend nccl --deepspeed_config scripts/ds_config_bf16.json --checkpoint-activations)
    echo "training on $NUM_GPUS GPU(s), model parallel $MP_SIZE"
else
    LAUNCH=()
    DEVICE_ARGS=(--distributed-backend gloo --deepspeed_config scripts/ds_config_cpu.json --batch-size 4)
    echo "no CUDA GPU: training on CPU (fp32, gloo); a 17B model needs ~200 GB RAM and is slow there"
fi

"${LAUNCH[@]:-python}" finetune_demo.py \
    --experiment-name "finetune-$(basename "$MODEL_TYPE")" --model-parallel-size "$MP_SIZE" --mode finetune \
    --from_pretrained "$MODEL_TYPE" --max_length "$MAX_LENGTH" --use_lora --lora_rank 10 \
    ${TOKENIZER:+--local_tokenizer "$TOKENIZER"} --version base \
    --train-data "$TRAIN_DATA" --valid-data "$VALID_DATA" --split 1. \
    --train-iters 800 --lr-decay-style cosine --warmup .02 --resume-dataloader \
    --save "$SAVE" --save-interval 200 --eval-interval 200 --eval-iters 10 --eval-batch-size 1 \
    --skip-init --seed 2023 "${DEVICE_ARGS[@]}" "$@"
