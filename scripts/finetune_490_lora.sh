#!/usr/bin/env bash
# LoRA on cogvlm-base-490 (see finetune_lora.sh); the merged model goes to checkpoints/merged_lora_490.
MODEL_TYPE=${MODEL_TYPE:-cogvlm-base-490} MAX_LENGTH=${MAX_LENGTH:-1288} exec bash "$(dirname "$0")/finetune_lora.sh" "$@"
