#!/usr/bin/env bash
# LoRA on cogvlm-base-224 (see finetune_lora.sh); the merged model goes to checkpoints/merged_lora_224.
MODEL_TYPE=${MODEL_TYPE:-cogvlm-base-224} MAX_LENGTH=${MAX_LENGTH:-400} exec bash "$(dirname "$0")/finetune_lora.sh" "$@"
