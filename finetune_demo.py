"""Finetune CogVLM on your own data with SAT's training_main and DeepSpeed.

    bash scripts/finetune_224_lora.sh          # the upstream recipe (LoRA on cogvlm-base-224, captchas)
    bash scripts/train_tiny_captcha.sh         # a tiny CogVLM from scratch on CPU, captchas (docs/finetuning.md)
    bash scripts/train_tiny_scenes.sh          # a tiny CogVLM from scratch on CPU, JSONL scene conversations

Data (`--train_data` / `--valid_data`, or SAT's `--train-data` / `--valid-data`): a JSONL file of
conversations about images (utils/dataset.py: every assistant turn trains, earlier turns as history
in the `--version` template, loss on assistant tokens only), or a folder of captcha images whose file
name is the label (prompt `CAPTCHA:`).

What trains: `--use_lora` (SAT lora2 on the LLM attention of `--lora_experts`: the language expert,
the visual expert or both; and on the ViT attention), `--use_ptuning` (prefix tuning), `--use_qlora`
(4-bit base weights, CUDA only), plus the ViT MLPs of the layers in `--vit_mlp_layers` (upstream's
choice); `--full_finetune` trains everything (with `--from_scratch` for the tiny models);
`--freeze_vit` keeps the ViT frozen. SAT's `--checkpoint-activations` recomputes activations in the
backward pass instead of storing them. The trainable count and, at the end, the peak memory are printed.
Validation: greedy answers through the chat core; `acc` / `acc_w/o_case` (exact match) and `score`
(exact match ignoring case, or IoU >= 0.5 for answers with boxes) in SAT's log.

Checkpoints go to `--save/<experiment-name>-<date>/<iteration>` every `--save-interval` steps.
Starting the same command again resumes from the newest checkpoint of that experiment (model,
optimizer state and step count); `--no_resume` starts over. At the end LoRA is merged into the
base weights and a plain SAT checkpoint is written to `--final_save`; its model_config.json names
the template it was trained with (`template_version`) and, when the answers had boxes, `grounding`.

The flags it shares with the inference scripts (--from_pretrained, --local_tokenizer, --version,
--max_length, --fp16 / --bf16) are utils/cli.py's; the others are SAT's and FineTuneTrainCogVLMModel's.
"""
import argparse
import json
import logging
import os
import sys
from functools import partial

import torch

import models  # noqa: F401  (sets the environment SAT and DeepSpeed read at import, before they are imported)
from sat import get_args
from sat.helpers import print_rank0
from sat.training import deepspeed_training as sat_training

from models import sat_compat
from models.cogvlm_model import FineTuneTrainCogVLMModel
from models.errors import CogVLMError
from models.releases import DEFAULT_FINETUNE_CHECKPOINT
from models.templates import DEFAULT_TEMPLATE, TEMPLATE_KEY, get_template
from utils.cli import (add_checkpoint_arg, add_max_length_arg, add_precision_args, add_template_arg, add_tokenizer_arg,
                       resolve_max_length, run_main, setup_logging)
from utils.dataset import CaptchaDataset, ConversationDataset, TrainingSampleBuilder, collate_samples, load_records
from utils.grounding import parse_boxes
from utils.language import DEFAULT_TOKENIZER, llama2_text_processor_inference, llama2_tokenizer
from utils.pipeline import dtype_from_args
from utils.training import (FINETUNE_FLAGS, ensure_answer_logits, find_resume_dir, forward_step, forward_step_eval,
                            init_from_scratch_, peak_memory, resume_iteration, save_final,
                            select_trainable_parameters)
from utils.vision import get_image_processor

logger = logging.getLogger(__name__)

# our spelling -> SAT's (both are accepted)
FLAG_ALIASES = {"--train_data": "--train-data", "--valid_data": "--valid-data"}
# SAT's own parser declares these too (they set DeepSpeed's precision): parsed here, then handed on to it
SAT_PRECISION_FLAGS = ("fp16", "bf16")


def _sat_spelling(argv):
    out = []
    for arg in argv:
        name, sep, value = arg.partition("=")
        out.append(FLAG_ALIASES.get(name, name) + sep + value if name in FLAG_ALIASES else arg)
    return out


def parse_args(argv=None) -> argparse.Namespace:
    py_parser = argparse.ArgumentParser(add_help=False)
    add_max_length_arg(py_parser, "max length of a training sample")
    add_template_arg(py_parser, "prompt template of the training samples", default=DEFAULT_TEMPLATE)
    add_checkpoint_arg(py_parser, default=DEFAULT_FINETUNE_CHECKPOINT)
    add_tokenizer_arg(py_parser, default=DEFAULT_TOKENIZER)
    add_precision_args(py_parser)
    py_parser.add_argument("--from_scratch", action="store_true",
                           help="only read model_config.json from --from_pretrained and initialise the weights")
    py_parser.add_argument("--vit_positions", choices=("random", "sincos"), default="random",
                           help="--from_scratch: ViT position embeddings start random (std 1) or as 2D sine-cosine "
                                "codes of the patch grid")
    py_parser.add_argument("--full_finetune", action="store_true", help="train every parameter")
    py_parser.add_argument("--freeze_vit", action="store_true", help="train no ViT parameter (its LoRA included)")
    py_parser.add_argument("--vit_mlp_layers", nargs=2, type=int, default=[46, 54], metavar=("FIRST", "LAST"),
                           help="ViT layers whose MLP trains too (inclusive; upstream: 46..54 of 63)")
    py_parser.add_argument("--no_resume", action="store_true", help="start over even if checkpoints exist")
    py_parser.add_argument("--final_save", type=str, default=None,
                           help="where the final (LoRA-merged) checkpoint goes; default <save>/merged_lora_<size>")
    py_parser.add_argument("--final_fp16", action="store_true", help="store the final weights in fp16")
    py_parser.add_argument("--eval_max_new_tokens", type=int, default=16, help="answer length cap in validation")
    py_parser.add_argument("--cache_images", action="store_true",
                           help="decode each image once and keep it in memory (3*S*S bytes each); for tiny models, "
                                "with --num-workers 0")
    py_parser = FineTuneTrainCogVLMModel.add_model_specific_args(py_parser)
    argv = _sat_spelling(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:  # SAT's parser answers it with its own flags alone: ours come first
        print(f"finetune_demo.py's own flags (SAT's training flags follow)\n\n{py_parser.format_help()}")
    known, sat_argv = py_parser.parse_known_args(argv)
    get_template(known.version)
    dtype_from_args(known)  # refuses --fp16 with --bf16
    sat_argv += [f"--{name}" for name in SAT_PRECISION_FLAGS if vars(known).pop(name)]
    if known.use_qlora and not torch.cuda.is_available():
        raise CogVLMError("--use_qlora needs a CUDA GPU (bitsandbytes 4-bit layers); on CPU use --use_lora")
    sat_compat.skip_deepspeed_shm_op()
    os.environ.setdefault("LOCAL_RANK", "0")  # plain `python finetune_demo.py`: one process (DeepSpeed asks for it)
    sat_args = get_args(sat_argv, parser=sat_compat.SATArgumentParser(description="sat"))
    if not torch.cuda.is_available():
        sat_args.local_rank = int(os.environ.get("LOCAL_RANK", 0))
    return argparse.Namespace(**vars(sat_args), **vars(known))


def build_model(args):
    finetune_flags = {name: getattr(args, name) for name in FINETUNE_FLAGS}
    if args.model_parallel_size != 1:
        finetune_flags["model_parallel_size"] = args.model_parallel_size
    model, args = FineTuneTrainCogVLMModel.from_pretrained(args.from_pretrained, args, build_only=args.from_scratch,
                                                           overwrite_args=finetune_flags)
    if args.from_scratch:
        init_from_scratch_(model, args.seed, args.vit_positions)
    ensure_answer_logits(model)
    return model, args


def describe_final_checkpoint(path: str, template: str, grounding: bool) -> None:
    """Record in the saved model_config.json the template the model was trained with (the front ends'
    default for it) and whether it writes boxes (they then draw them)."""
    config_path = os.path.join(path, "model_config.json")
    with open(config_path) as f:
        config = json.load(f)
    config[TEMPLATE_KEY] = template
    if grounding:
        config["grounding"] = True
    with open(config_path, "w") as f:
        json.dump(config, f, indent=4)


def run(args):
    model, args = build_model(args)
    args.max_length = resolve_max_length(args.max_length, args.max_sequence_length)
    tokenizer = llama2_tokenizer(args.local_tokenizer, signal_type=args.version)
    if len(tokenizer) > args.vocab_size:
        raise CogVLMError(f"tokenizer {args.local_tokenizer} has {len(tokenizer)} tokens but the model's vocabulary "
                          f"is {args.vocab_size}; pass the tokenizer that belongs to this checkpoint")
    image_processor = get_image_processor(args.eva_args["image_size"][0])
    builder = TrainingSampleBuilder(llama2_text_processor_inference(tokenizer, args.max_length, args.image_length))
    select_trainable_parameters(model, args)

    save_root = args.save or "checkpoints"  # training_main appends the run folder to args.save
    sat_compat.make_sat_training_cpu_safe(args)
    sat_compat.save_optimizer_state_too()
    sat_compat.make_sat_load_weights_only()
    resume_dir = None if args.no_resume or not args.save else find_resume_dir(args.save, args.experiment_name)
    if resume_dir:
        sat_compat.enable_resume(resume_dir, resume_iteration(resume_dir))

    answers_have_boxes = []

    def create_dataset(path, args):
        if os.path.isdir(path):
            return CaptchaDataset(path, image_processor, builder, cache=args.cache_images)
        dataset = ConversationDataset(load_records(path), image_processor, builder, cache=args.cache_images, source=path)
        answers_have_boxes.append(any(parse_boxes(a) for r in dataset.records for _, a in r.turns))
        return dataset

    model = sat_training.training_main(
        args, model_cls=model, forward_step_function=forward_step, create_dataset_function=create_dataset,
        collate_fn=partial(collate_samples, pad_token_id=tokenizer.pad_token_id),
        forward_step_eval=partial(forward_step_eval, tokenizer=tokenizer))
    print_rank0(f"peak memory: {peak_memory()}")
    if args.train_iters > 0:
        path = save_final(model, args, save_root)
        if int(os.environ.get("RANK", 0)) == 0:
            describe_final_checkpoint(path, args.version, bool(answers_have_boxes and answers_have_boxes[0]))
    return model


def main(argv=None) -> int:
    setup_logging()
    if not torch.cuda.is_available():
        # Late in training many gradients and activations are denormal floats, which x86 CPUs
        # process slowly (docs/finetuning.md; bench/RESULTS.md). Set before torch starts its
        # OpenMP threads, which inherit the flag from this thread.
        torch.set_flush_denormal(True)

    def train() -> int:
        run(parse_args(argv))
        return 0

    return run_main(train, lambda stop: f"interrupted ({stop}): training resumes from its last saved checkpoint "
                                        "when the same command runs again")


if __name__ == "__main__":
    sys.exit(main())
