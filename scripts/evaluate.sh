#!/usr/bin/env bash
# Captcha accuracy of a finetuned checkpoint on the test split, shared by evaluate_224.sh and
# evaluate_490.sh. With CUDA GPUs: bf16, split over MP_SIZE GPUs with torchrun; without: CPU fp32.
# Environment: CHECKPOINT, MP_SIZE, TEST_DATA, OUTPUT, TOKENIZER (default: the checkpoint's tokenizer/ folder,
# else the released models' tokenizer). Extra arguments go to evaluate_demo.py.
set -euo pipefail
cd "$(dirname "$0")/.."
CHECKPOINT=${CHECKPOINT:?set CHECKPOINT}
TEST_DATA=${TEST_DATA:-./archive_split/test}
OUTPUT=${OUTPUT:-$CHECKPOINT/eval_test.json}
if python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    LAUNCH=(torchrun --standalone --nnodes=1 --nproc-per-node="${MP_SIZE:-1}")
    PRECISION=(--bf16)
else
    LAUNCH=(python)
    PRECISION=()
fi
"${LAUNCH[@]}" evaluate_demo.py --from_pretrained "$CHECKPOINT" --version base --english "${PRECISION[@]:+${PRECISION[@]}}" \
    ${TOKENIZER:+--local_tokenizer "$TOKENIZER"} --data "$TEST_DATA" --output "$OUTPUT" "$@"
