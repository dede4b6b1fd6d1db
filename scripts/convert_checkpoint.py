"""Convert a CogVLM checkpoint between SAT and Hugging Face (`cogvlm-chat-hf`) format, losslessly.

    python scripts/convert_checkpoint.py cogvlm-chat-v1.1 ./cogvlm-chat-hf-from-sat           # SAT -> HF
    python scripts/convert_checkpoint.py ./cogvlm-chat-hf ./cogvlm-chat-sat                   # HF -> SAT

The direction follows from the source: a SAT directory (model_config.json; a name under $SAT_HOME
works too) becomes an HF directory (config.json + safetensors, sharded above --max_shard_size with
model.safetensors.index.json); an HF directory becomes a SAT one (model_config.json, latest,
1/mp_rank_00_model_states.pt). Model-parallel SAT shards are merged; LoRA must be merged first.
Tensors keep their dtype and values bit for bit. An HF output also gets our transformers modeling code
(models/hf_cogvlm, with `auto_map`) and a generation_config.json, and the tokenizer of --tokenizer (default:
the checkpoint's own `tokenizer/` folder), so `AutoModelForCausalLM.from_pretrained(out,
trust_remote_code=True)` works with transformers alone.
"""
import argparse
import os
import sys

# run as `python scripts/convert_checkpoint.py` from anywhere: the library lives one level up
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from models.checkpoint import convert_hf_to_sat, convert_sat_to_hf, open_checkpoint, parse_size  # noqa: E402
from models.config import TEMPLATE_VERSIONS  # noqa: E402
from models.errors import CogVLMError  # noqa: E402
from models.hf_cogvlm import add_remote_code, tokenizer_files_of  # noqa: E402
from utils.pipeline import setup_logging  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Convert a CogVLM checkpoint between SAT and HF format")
    parser.add_argument("source", help="SAT checkpoint directory or name under $SAT_HOME (a released one is downloaded "
                                       "when missing), or an HF-format directory or hub repo id")
    parser.add_argument("output", help="new (or empty) directory to write the converted checkpoint to")
    parser.add_argument("--local_files_only", action="store_true",
                        help="never download the checkpoint: use only what is on disk and in the HF cache")
    parser.add_argument("--max_shard_size", default="5GB",
                        help="SAT -> HF: largest safetensors file (e.g. 5GB, 500MB); larger models are sharded")
    parser.add_argument("--template_version", default=None, choices=TEMPLATE_VERSIONS,
                        help="SAT -> HF: config.json's template_version (chat for chat/vqa models, base for "
                             "base and grounding models; default: the checkpoint's own, else chat)")
    parser.add_argument("--tokenizer", default=None,
                        help="SAT -> HF: tokenizer directory to copy into the output (default: the checkpoint's "
                             "own tokenizer/ folder, if any)")
    args = parser.parse_args(argv)
    setup_logging()
    try:
        source = open_checkpoint(args.source, local_files_only=args.local_files_only)
        if source.format == "hf":
            path = convert_hf_to_sat(source, args.output)
            print(f"wrote SAT checkpoint {args.output} ({os.path.relpath(path, args.output)})")
        else:
            tokenizer = args.tokenizer or source.tokenizer_dir
            if tokenizer:
                tokenizer_files_of(tokenizer)  # a bad directory fails before the long conversion

            def remote_code(directory):
                add_remote_code(directory, template_version=args.template_version, tokenizer_dir=tokenizer)

            files = convert_sat_to_hf(source, args.output, parse_size(args.max_shard_size), args.template_version,
                                      extra_files=remote_code)
            print(f"wrote HF checkpoint {args.output} ({len(files)} safetensors file(s))")
    except CogVLMError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
