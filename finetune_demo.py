"""Finetune CogVLM on captcha images (file name = label) with SAT's training_main and DeepSpeed.

    bash scripts/finetune_224_lora.sh          # the upstream recipe (LoRA on cogvlm-base-224)
    bash scripts/train_tiny_captcha.sh         # a tiny CogVLM from scratch on CPU (see README)

What trains: `--use_lora` (SAT lora2 on the LLM attention and on the ViT), `--use_ptuning`
(prefix tuning), `--use_qlora` (4-bit base weights, CUDA only), plus the ViT MLPs of the layers in
`--vit_mlp_layers` (upstream's choice); `--full_finetune` trains everything (used with
`--from_scratch` for the tiny model). Loss: next-token cross-entropy over the answer tokens.
Validation: greedy generation through the chat core, exact-match accuracy (with and without case).

Checkpoints go to `--save/<experiment-name>-<date>/<iteration>` every `--save-interval` steps.
Starting the same command again resumes from the newest checkpoint of that experiment (model,
optimizer state and step count); `--no_resume` starts over. At the end LoRA is merged into the
base weights and a plain SAT checkpoint is written to `--final_save`.
"""
import argparse
import glob
import logging
import math
import os
import sys
import time
from functools import partial

import torch

from sat import get_args
from sat.helpers import print_rank0
from sat.training import deepspeed_training as sat_training
from sat.training.model_io import save_checkpoint

from models.cogvlm_model import FineTuneTrainCogVLMModel
from utils.dataset import (CaptchaDataset, IGNORE_INDEX, collate_captchas, exact_match, llama2_text_processor,
                           read_captcha)
from models.errors import CogVLMError
from utils.language import llama2_text_processor_inference, llama2_tokenizer
from utils.vision import get_image_processor

logger = logging.getLogger(__name__)

FINETUNE_FLAGS = ("use_lora", "use_ptuning", "use_qlora", "lora_rank", "layer_range", "pre_seq_len")


# Arguments --------------------------------------------------------------------------------

class _SATParser(argparse.ArgumentParser):
    """SAT's parser, made usable on a machine without CUDA.

    SAT 0.4.12 refuses to train when `args.device` ('cpu') differs from `args.local_rank` (0), and
    defaults to the nccl backend, which has no CPU support. On CPU we align the two and default the
    backend to gloo, so the same command runs on GPUs and on CPU.
    """

    def parse_args(self, args=None, namespace=None):
        parsed = super().parse_args(args, namespace)
        if not torch.cuda.is_available():
            parsed.device = parsed.local_rank = "cpu"
            if parsed.distributed_backend == "nccl":
                parsed.distributed_backend = "gloo"
        return parsed


def parse_args(argv=None) -> argparse.Namespace:
    py_parser = argparse.ArgumentParser(add_help=False)
    py_parser.add_argument("--max_length", type=int, default=2048, help="max tokens of a sample (image included)")
    py_parser.add_argument("--version", type=str, default="chat", help="prompt template: base, chat or vqa")
    py_parser.add_argument("--from_pretrained", type=str, default="cogvlm-base-490",
                           help="checkpoint directory or name under $SAT_HOME")
    py_parser.add_argument("--local_tokenizer", type=str, default="lmsys/vicuna-7b-v1.5", help="tokenizer path")
    py_parser.add_argument("--from_scratch", action="store_true",
                           help="only read model_config.json from --from_pretrained and initialise the weights")
    py_parser.add_argument("--full_finetune", action="store_true", help="train every parameter")
    py_parser.add_argument("--vit_mlp_layers", nargs=2, type=int, default=[46, 54], metavar=("FIRST", "LAST"),
                           help="ViT layers whose MLP trains too (inclusive; upstream: 46..54 of 63)")
    py_parser.add_argument("--no_resume", action="store_true", help="start over even if checkpoints exist")
    py_parser.add_argument("--final_save", type=str, default=None,
                           help="where the final (LoRA-merged) checkpoint goes; default <save>/merged_lora_<size>")
    py_parser.add_argument("--final_fp16", action="store_true", help="store the final weights in fp16")
    py_parser.add_argument("--eval_max_new_tokens", type=int, default=16)
    py_parser.add_argument("--cache_images", action="store_true",
                           help="decode each image once and keep it in memory (3*S*S bytes each); for tiny models, "
                                "with --num-workers 0")
    py_parser = FineTuneTrainCogVLMModel.add_model_specific_args(py_parser)
    known, sat_argv = py_parser.parse_known_args(argv)
    if not torch.cuda.is_available():
        if known.use_qlora:
            raise CogVLMError("--use_qlora needs a CUDA GPU (bitsandbytes 4-bit layers); on CPU use --use_lora")
        # DeepSpeed compiles a shared-memory all-reduce op (minutes) the first time it starts on CPU;
        # gloo does the same job without it, so we tell DeepSpeed the op is unavailable.
        import deepspeed.ops
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    os.environ.setdefault("LOCAL_RANK", "0")  # plain `python finetune_demo.py`: one process (DeepSpeed asks for it)
    sat_args = get_args(sat_argv, parser=_SATParser(description="sat"))
    if not torch.cuda.is_available():
        sat_args.local_rank = int(os.environ.get("LOCAL_RANK", 0))
    return argparse.Namespace(**vars(sat_args), **vars(known))


# Model ------------------------------------------------------------------------------------

def init_from_scratch_(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Initialise every weight with std 1/sqrt(fan_in), norms with 1, biases with 0, and the ViT's
    position embeddings with std 1.

    SAT's default std 0.02 leaves a small model on the "ignore the image" plateau for thousands of
    steps; fan-in scaling shortens it. The position embeddings get std 1 because all patches share
    one rotary position in the LLM (DESIGN.md 3): where a patch is reaches the LLM only through
    them, and at fan-in scale they are a few percent of the patch embedding's magnitude.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("vit_model.transformer.position_embeddings.weight"):
                param.copy_(torch.randn(param.shape, generator=generator))
            elif param.dim() >= 2:
                param.copy_(torch.randn(param.shape, generator=generator) / math.sqrt(param[0].numel()))
            elif name.endswith("bias"):
                param.zero_()
            else:  # LayerNorm / RMSNorm scales
                param.fill_(1.0)
    return model


def build_model(args):
    finetune_flags = {name: getattr(args, name) for name in FINETUNE_FLAGS}
    if args.model_parallel_size != 1:
        finetune_flags["model_parallel_size"] = args.model_parallel_size
    model, args = FineTuneTrainCogVLMModel.from_pretrained(args.from_pretrained, args, build_only=args.from_scratch,
                                                           overwrite_args=finetune_flags)
    if args.from_scratch:
        init_from_scratch_(model, args.seed)
    return model, args


def select_trainable_parameters(model, args) -> int:
    """Freeze everything except what the flags train; print and return the trainable count."""
    first, last = args.vit_mlp_layers
    total = 0
    for name, param in model.named_parameters():
        trainable = args.full_finetune or "matrix_A" in name or "matrix_B" in name or "ptuning" in name
        if ".vit_model." in name and ".mlp." in name:
            layer = int(name.split(".layers.")[1].split(".")[0])
            trainable = trainable or first <= layer <= last
        param.requires_grad_(trainable)
        if trainable:
            total += param.numel()
            logger.debug("trainable: %s %s", name, tuple(param.shape))
    print_rank0(f"***** Total trainable parameters: {total} of {sum(p.numel() for p in model.parameters())} *****")
    if total == 0:
        raise CogVLMError("no parameter trains: pass --use_lora, --use_ptuning, --use_qlora or --full_finetune")
    return total


# Steps ------------------------------------------------------------------------------------

def get_batch(data_iterator, args):
    batch = next(data_iterator)
    for key, value in batch.items():
        value = value.to(args.device)
        if value.is_floating_point():
            value = value.half() if args.fp16 else value.bfloat16() if args.bf16 else value
        batch[key] = value
    return batch


def next_token_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of logits (B, L, V) at position t against labels (B, L) at t+1 (-100 ignored)."""
    return torch.nn.functional.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                                             labels[:, 1:].reshape(-1), ignore_index=IGNORE_INDEX)


def forward_step(data_iterator, model, args, timers):
    timers("batch generator").start()
    batch = get_batch(data_iterator, args)
    timers("batch generator").stop()
    labels = batch.pop("labels")
    batch.pop("context_length")
    logits = model(**batch)[0]
    loss = next_token_loss(logits, labels)
    return loss, {"loss": loss.detach()}


def forward_step_eval(data_iterator, model, args, timers, *, eval_processor):
    """Teacher-forced loss plus greedy reading of every image; exact-match accuracy of the batch."""
    batch = get_batch(data_iterator, args)
    labels = batch.pop("labels")
    batch.pop("context_length")
    loss = next_token_loss(model(**batch)[0], labels)
    module = getattr(model, "module", model)
    tokenizer = eval_processor.tokenizer
    mixins_before = set(module.mixins)
    try:
        predictions = [read_captcha(module, eval_processor, image, max_new_tokens=args.eval_max_new_tokens)
                       for image in batch["vision_image"]]
    finally:
        for name in set(module.mixins) - mixins_before:  # the chat core's KV-cache mixin: not for training
            module.del_mixin(name)
    targets = [tokenizer.decode([t for t in row.tolist() if t not in (IGNORE_INDEX, tokenizer.eos_token_id)],
                                skip_special_tokens=True).strip() for row in labels]
    for prediction, target in zip(predictions, targets):
        logger.debug("pred %r label %r", prediction, target)
    scores = exact_match(predictions, targets)
    return loss, {name: torch.tensor(value, device=loss.device) for name, value in scores.items()}


# CPU --------------------------------------------------------------------------------------

class _CPUTimers(sat_training.Timers):
    """SAT's step timers without `torch.cuda.synchronize()`, which fails on a machine without CUDA."""

    class Timer(sat_training.Timers.Timer):
        def start(self):
            assert not self.started_, "timer has already been started"
            self.start_time = time.time()
            self.started_ = True

        def stop(self):
            assert self.started_, "timer is not started"
            self.elapsed_ += time.time() - self.start_time
            self.started_ = False


def make_sat_training_cpu_safe(args):
    """SAT 0.4.12's training loop calls CUDA-only functions unconditionally (timer syncs, memory
    reports, saving the CUDA RNG state). Without CUDA we swap in CPU-safe equivalents; the
    training itself (DeepSpeed engine, gloo) is unchanged."""
    if torch.cuda.is_available():
        return
    sat_training.Timers = _CPUTimers
    sat_training.report_memory = lambda name: None
    args.no_save_rng = True


# Checkpoints and resume -------------------------------------------------------------------

def save_optimizer_state_too():
    """Make SAT's periodic checkpoints hold the optimizer state, so that a run can resume exactly.

    SAT saves through the DeepSpeed engine's model-states file, which carries the optimizer state
    without ZeRO, but it never writes ZeRO's partitioned optimizer files; and its EMA check reads
    `optimizer.optimizer`, which a plain (ZeRO-0, fp32) torch optimizer lacks. We add the ZeRO files
    and hand SAT the optimizer only when it is a DeepSpeed wrapper.
    """
    sat_save = sat_training.save_checkpoint

    def save(iteration, model, optimizer, lr_scheduler, args):
        sat_save(iteration, model, optimizer if hasattr(optimizer, "optimizer") else None, lr_scheduler, args)
        if hasattr(model, "zero_optimization") and model.zero_optimization():
            model._save_zero_checkpoint(args.save, str(iteration))
            torch.distributed.barrier()

    sat_training.save_checkpoint = save


def find_resume_dir(save_root: str, experiment_name: str):
    """The newest `<save_root>/<experiment_name>-<date>` run that holds a checkpoint, or None."""
    runs = [d for d in glob.glob(os.path.join(save_root, glob.escape(experiment_name) + "-*"))
            if os.path.isfile(os.path.join(d, "latest"))]
    return max(runs, key=lambda d: os.path.getmtime(os.path.join(d, "latest"))) if runs else None


def enable_resume(resume_dir: str):
    """Make SAT's training_main continue the run in `resume_dir`: weights, optimizer state, step, lr.

    SAT's own `--load` restores model weights only (and restarts its lr schedule with a re-warmup),
    and training_main has no hook after the DeepSpeed engine exists, so we wrap the two functions
    it calls there: the engine loads its full checkpoint, and the lr schedule is rebuilt as the
    interrupted run had it and advanced to the restored step.
    """
    setup = sat_training.setup_model_untrainable_params_and_optimizer
    make_scheduler = sat_training.get_learning_rate_scheduler

    def setup_and_load(args, model, config_params=None):
        engine, optimizer = setup(args, model, config_params)
        with open(os.path.join(resume_dir, "latest")) as f:
            tag = f.read().strip()
        # SAT's param groups hold lr *scales* (1.0) that its scheduler multiplies; the saved optimizer
        # state holds the absolute lr of the last step, which must not become the new scale
        lr_scales = [group["lr"] for group in optimizer.param_groups]
        _, client_state = engine.load_checkpoint(resume_dir, tag=tag, load_lr_scheduler_states=False)
        for group, scale in zip(optimizer.param_groups, lr_scales):
            group["lr"] = scale
        args.iteration = int(client_state["iteration"])
        args.save = resume_dir  # keep writing into the interrupted run
        print_rank0(f"resumed {resume_dir} at iteration {args.iteration} (model and optimizer state)")
        return engine, optimizer

    def scheduler_at_restored_step(optimizer, iteration, args, **kwargs):
        scheduler = make_scheduler(optimizer, 0, args, **kwargs)
        scheduler.step(iteration + 1)
        return scheduler

    sat_training.setup_model_untrainable_params_and_optimizer = setup_and_load
    sat_training.get_learning_rate_scheduler = scheduler_at_restored_step


# Final checkpoint -------------------------------------------------------------------------

def save_final(model, args, save_root: str) -> str:
    """Merge LoRA into the base weights and write a plain SAT checkpoint (weights only).

    Default place: `<save_root>/merged_lora_<image size>` (upstream's name, also for P-tuning/full runs).
    """
    module = getattr(model, "module", model)
    if args.use_lora:
        module.merge_lora()
    image_size = args.eva_args["image_size"][0]
    path = args.final_save or os.path.join(save_root, f"merged_lora_{image_size}")
    if args.final_fp16:  # parameters only: buffers (the rotary inv_freq) keep fp32 precision
        for param in module.parameters():
            param.data = param.data.half()
    final_args = argparse.Namespace(**{**vars(args), "save": path, "mode": "inference", "deepspeed": False,
                                       "use_lora": False, "use_qlora": False})
    save_checkpoint(1, module, None, None, final_args)
    print_rank0(f"saved the final model to {path}")
    return path


# Main -------------------------------------------------------------------------------------

def run(args):
    model, args = build_model(args)
    tokenizer = llama2_tokenizer(args.local_tokenizer, signal_type=args.version)
    if len(tokenizer) > args.vocab_size:
        raise CogVLMError(f"tokenizer {args.local_tokenizer} has {len(tokenizer)} tokens but the model's vocabulary "
                          f"is {args.vocab_size}; pass the tokenizer that belongs to this checkpoint")
    image_processor = get_image_processor(args.eva_args["image_size"][0])
    train_processor = llama2_text_processor(tokenizer, args.max_length, args.image_length)
    eval_processor = llama2_text_processor_inference(tokenizer, args.max_length, args.image_length)
    select_trainable_parameters(model, args)

    save_root = args.save or "checkpoints"  # training_main appends the run folder to args.save
    make_sat_training_cpu_safe(args)
    save_optimizer_state_too()
    resume_dir = None if args.no_resume or not args.save else find_resume_dir(args.save, args.experiment_name)
    if resume_dir:
        enable_resume(resume_dir)

    def create_dataset(path, args):
        return CaptchaDataset(path, image_processor, train_processor, cache=args.cache_images)

    model = sat_training.training_main(
        args, model_cls=model, forward_step_function=forward_step, create_dataset_function=create_dataset,
        collate_fn=partial(collate_captchas, pad_token_id=tokenizer.pad_token_id),
        forward_step_eval=partial(forward_step_eval, eval_processor=eval_processor))
    if args.train_iters > 0:
        save_final(model, args, save_root)
    return model


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not torch.cuda.is_available():
        # Late in training many gradients and activations are denormal floats, which x86 CPUs
        # process slowly (measured on the tiny captcha model, 1 thread: 0.64 s vs 0.49 s per step).
        # Set before torch starts its OpenMP threads, which inherit the flag from this thread.
        torch.set_flush_denormal(True)
    logging.getLogger("sat").propagate = False  # SAT logs through its own handler already
    try:
        run(parse_args(argv))
    except CogVLMError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
