"""Convert a CogVLM checkpoint between SAT and Hugging Face (`cogvlm-chat-hf`) format, losslessly, or to GGUF
for llama.cpp.

    python scripts/convert_checkpoint.py cogvlm-chat-v1.1 ./cogvlm-chat-hf-from-sat           # SAT -> HF
    python scripts/convert_checkpoint.py ./cogvlm-chat-hf ./cogvlm-chat-sat                   # HF -> SAT
    python scripts/convert_checkpoint.py ./my-cogvlm ./my-cogvlm.gguf --to gguf --outtype q8_0  # -> llama.cpp

Without --to the direction follows from the source: a SAT directory (model_config.json; a name under
$SAT_HOME works too) becomes an HF directory (config.json + safetensors, sharded above --max_shard_size with
model.safetensors.index.json); an HF directory becomes a SAT one (model_config.json, latest,
1/mp_rank_00_model_states.pt). Model-parallel SAT shards are merged; LoRA must be merged first.
Tensors keep their dtype and values bit for bit. An HF output also gets our transformers modeling code
(models/hf_cogvlm, with `auto_map`) and a generation_config.json, and the tokenizer of --tokenizer (default:
the checkpoint's own `tokenizer/` folder), so `AutoModelForCausalLM.from_pretrained(out,
trust_remote_code=True)` works with transformers alone.

--to gguf (SAT or HF source) writes llama.cpp's CogVLM: OUT.gguf (language model, visual expert, tokenizer of
--tokenizer, and a chat template of --version) and mmproj-OUT.gguf (ViT + adapter) beside it.
--outtype: f32, f16, bf16, q8_0, or q4_0 / q4_k (Q4_K_M) through llama.cpp's quantizer (llama-cpp-python).
"""
import argparse
import os

from models.errors import CogVLMError
from models.templates import DEFAULT_TEMPLATE, TEMPLATE_NAMES, get_template
from utils.cli import add_verbose_arg, run_main, setup_logging

DEFAULT_MAX_SHARD_SIZE = "5GB"


def to_gguf(source, args) -> str:
    from models.checkpoint.convert import GGUF_OUTTYPES, convert_to_gguf
    from models.checkpoint.gguf_format import chat_template
    from utils.vision import CLIP_MEAN, CLIP_STD

    if args.outtype is not None and args.outtype not in GGUF_OUTTYPES:
        raise CogVLMError(f"--outtype {args.outtype} is not one of {', '.join(GGUF_OUTTYPES)}")
    template = get_template(args.version or source.template or DEFAULT_TEMPLATE)
    model_path, mmproj_path = convert_to_gguf(source, args.output, args.outtype or "f32", image_mean=CLIP_MEAN,
                                              image_std=CLIP_STD, tokenizer_dir=args.tokenizer,
                                              chat_template=chat_template(template.query, template.turn))
    return f"wrote GGUF {model_path} and {mmproj_path}"


def between_sat_and_hf(source, args) -> str:
    from models.checkpoint import convert_hf_to_sat, convert_sat_to_hf, parse_size
    from models.hf_cogvlm import add_remote_code, tokenizer_files_of

    if args.version is not None:
        get_template(args.version)
    if args.outtype is not None:
        raise CogVLMError("--outtype applies to --to gguf only")
    if source.format == "hf":
        if args.to == "hf":
            raise CogVLMError(f"{source.path} is already in HF format")
        path = convert_hf_to_sat(source, args.output)
        return f"wrote SAT checkpoint {args.output} ({os.path.relpath(path, args.output)})"
    if args.to == "sat":
        raise CogVLMError(f"{source.path} is already in SAT format")
    tokenizer = args.tokenizer or source.tokenizer_dir
    if tokenizer:
        tokenizer_files_of(tokenizer)  # a bad directory fails before the long conversion

    def remote_code(directory):
        add_remote_code(directory, template=args.version, tokenizer_dir=tokenizer)

    files = convert_sat_to_hf(source, args.output, parse_size(args.max_shard_size or DEFAULT_MAX_SHARD_SIZE),
                              args.version, extra_files=remote_code)
    return f"wrote HF checkpoint {args.output} ({len(files)} safetensors file(s))"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Convert a CogVLM checkpoint between SAT and HF format, or to GGUF")
    parser.add_argument("source", help="SAT checkpoint directory or name under $SAT_HOME (a released one is downloaded "
                                       "when missing), or an HF-format directory or hub repo id")
    parser.add_argument("output", help="new (or empty) directory to write the converted checkpoint to; with --to gguf "
                                       "the language model's .gguf file (its mmproj-*.gguf goes beside it)")
    parser.add_argument("--to", choices=("sat", "hf", "gguf"), default=None,
                        help="target format (default: HF for a SAT source, SAT for an HF one)")
    parser.add_argument("--outtype", default=None,
                        help="--to gguf: type of the weight matrices: f32 (default), f16, bf16, q8_0, or q4_0 / q4_k "
                             "(Q4_K_M), which use llama.cpp's quantizer and a q8_0 mmproj")
    parser.add_argument("--local_files_only", action="store_true",
                        help="never download the checkpoint: use only what is on disk and in the HF cache")
    parser.add_argument("--max_shard_size", default=None,
                        help=f"SAT -> HF: largest safetensors file (e.g. 5GB, 500MB; default "
                             f"{DEFAULT_MAX_SHARD_SIZE}); larger models are sharded")
    parser.add_argument("--version", "--template_version", dest="version", default=None,
                        metavar="{" + ",".join(TEMPLATE_NAMES) + "}",
                        help="the prompt template. SAT -> HF: config.json's template_version; --to gguf: the template "
                             "of the chat template (chat for chat/vqa models, base for base and grounding models); "
                             f"default: the checkpoint's own, else {DEFAULT_TEMPLATE}")
    parser.add_argument("--tokenizer", default=None,
                        help="tokenizer directory to copy into an HF output or a GGUF (default: the checkpoint's own "
                             "tokenizer/ folder, if any; a GGUF needs its tokenizer.model)")
    add_verbose_arg(parser)
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    return run_main(lambda: convert(args))


def convert(args) -> int:
    # the checkpoint layer loads here, after the flags: it imports SAT, which takes seconds (utils/cli.py)
    from models.checkpoint import open_checkpoint

    if args.to == "gguf" and args.max_shard_size is not None:
        raise CogVLMError("--max_shard_size applies to SAT -> HF only, not to --to gguf")
    source = open_checkpoint(args.source, local_files_only=args.local_files_only)
    print(to_gguf(source, args) if args.to == "gguf" else between_sat_and_hf(source, args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
