#!/usr/bin/env bash
# Test-split accuracy of checkpoints/merged_lora_490 (see evaluate.sh).
CHECKPOINT=${CHECKPOINT:-./checkpoints/merged_lora_490} exec bash "$(dirname "$0")/evaluate.sh" "$@"
