"""The pieces of finetune_demo.py that SAT's `training_main` calls or that run around it: weight
initialisation for training from scratch, which parameters train, the training and validation
steps, peak-memory reporting, the run folder to resume and the final (LoRA-merged) checkpoint.
"""
import argparse
import glob
import logging
import math
import os
from typing import Dict, List

import torch

from sat.helpers import print_rank0
from sat.model.base_model import BaseMixin, non_conflict
from sat.training.model_io import save_checkpoint

from models.checkpoint.layout import is_finetune_parameter
from models.checkpoint.sat_format import resumable_iteration
from models.errors import CogVLMError
from utils.dataset import IGNORE_INDEX
from utils.evaluation import exact_match, score_answer
from utils.generation import generate_batch
from utils.generation_config import GenerationConfig

logger = logging.getLogger(__name__)

# flags that shape the finetune mixins, so they must reach the model's args (and its saved config)
FINETUNE_FLAGS = ("use_lora", "use_ptuning", "use_qlora", "lora_rank", "layer_range", "pre_seq_len", "lora_experts")
VIT_POSITIONS = "vit_model.transformer.position_embeddings.weight"


def sincos_positions(grid: int, width: int) -> torch.Tensor:
    """(grid * grid, width) 2D sine-cosine position codes of a grid of patches, row-major: the first half
    of the channels encodes the row, the second the column, each as sin/cos pairs of periods from 2 * grid
    (monotonic across the grid) down to 2 patches."""
    quarter = width // 4
    periods = 2 * grid * grid ** (-torch.arange(quarter, dtype=torch.float64) / max(1, quarter - 1))
    angles = 2 * math.pi * torch.arange(grid, dtype=torch.float64)[:, None] / periods[None]  # (grid, quarter)
    axis = torch.cat([angles.sin(), angles.cos()], dim=1)  # (grid, 2 * quarter)
    rows, cols = axis[:, None].expand(grid, grid, -1), axis[None, :].expand(grid, grid, -1)
    codes = torch.cat([rows, cols], dim=-1).reshape(grid * grid, 4 * quarter)
    return torch.nn.functional.pad(codes, (0, width - 4 * quarter)).float() * math.sqrt(2)  # unit mean square


def init_from_scratch_(model: torch.nn.Module, seed: int, vit_positions: str = "random") -> torch.nn.Module:
    """Initialise every weight with std 1/sqrt(fan_in), norms with 1, biases with 0, and the ViT's
    position embeddings with std 1 (`vit_positions="random"`) or with 2D sine-cosine codes of the
    patch grid at the same scale (`"sincos"`; the class token's position stays random).

    SAT's default std 0.02 leaves a small model on the "ignore the image" plateau for thousands of
    steps; fan-in scaling shortens it. The position embeddings get std 1 because all patches share
    one rotary position in the LLM (utils.language.llama2_text_processor_inference: the image block's
    patches have one position id): where a patch is reaches the LLM only through them, and at fan-in scale
    they are a few percent of the patch embedding's magnitude. Sine-cosine codes make a patch's row
    and column linear functions of its embedding from the first step, which answers that name
    places (boxes, left/right) need; random codes must first be told apart one by one.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(VIT_POSITIONS):
                param.copy_(torch.randn(param.shape, generator=generator))
                if vit_positions == "sincos":
                    patches = param.shape[0] - 1  # after the class token
                    param[1:] = sincos_positions(math.isqrt(patches), param.shape[1])
            elif param.dim() >= 2:
                param.copy_(torch.randn(param.shape, generator=generator) / math.sqrt(param[0].numel()))
            elif name.endswith("bias"):
                param.zero_()
            else:  # LayerNorm / RMSNorm scales
                param.fill_(1.0)
    return model


def select_trainable_parameters(model, args) -> int:
    """Freeze everything except what the flags train; print and return the trainable count.

    Trains: every parameter with --full_finetune, else the LoRA / P-tuning parameters, plus the ViT
    MLPs of --vit_mlp_layers. --freeze_vit keeps the whole ViT (its LoRA included) frozen.
    """
    first, last = args.vit_mlp_layers
    freeze_vit = getattr(args, "freeze_vit", False)
    total = 0
    for name, param in model.named_parameters():
        trainable = args.full_finetune or is_finetune_parameter(name)
        if ".vit_model." in name and ".mlp." in name:
            layer = int(name.split(".layers.")[1].split(".")[0])
            trainable = trainable or first <= layer <= last
        if freeze_vit and ".vit_model." in name:
            trainable = False
        param.requires_grad_(trainable)
        if trainable:
            total += param.numel()
            logger.debug("trainable: %s %s", name, tuple(param.shape))
    print_rank0(f"***** Total trainable parameters: {total} of {sum(p.numel() for p in model.parameters())} *****")
    if total == 0:
        raise CogVLMError("no parameter trains: pass --use_lora, --use_ptuning, --use_qlora or --full_finetune "
                          "(and not only ViT parts with --freeze_vit)")
    return total


def peak_memory() -> str:
    """The process's peak memory so far: torch's max_memory_allocated on CUDA, else the peak RSS."""
    if torch.cuda.is_available():
        return f"{torch.cuda.max_memory_allocated() / 2**20:.0f} MiB (GPU, max_memory_allocated)"
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return f"{int(line.split()[1]) / 1024:.0f} MiB (peak RSS)"
    return "unknown"


# Steps ------------------------------------------------------------------------------------

def get_batch(data_iterator, args) -> Dict[str, torch.Tensor]:
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


class AnswerLogitsMixin(BaseMixin):
    """With `loss_positions` (B, L) bool, the LM head projects only those positions: (B, L, H) ->
    logits (1, N, vocab). Training needs logits only where a label follows (the answers), and the
    full (B, L, vocab) projection and its log-softmax are a large share of a small model's step."""

    forward_inputs = ("loss_positions",)

    @non_conflict
    def final_forward(self, logits, old_impl=None, **kw_args):
        positions = kw_args.get("loss_positions")
        if positions is not None:
            logits = logits[positions][None]
        return old_impl(logits, **kw_args)


def ensure_answer_logits(model) -> None:
    """Add AnswerLogitsMixin to `model` once (no parameters: checkpoints are unchanged)."""
    if "answer_logits" not in model.mixins:
        model.add_mixin("answer_logits", AnswerLogitsMixin())


def answer_loss(model, batch: Dict[str, torch.Tensor]) -> torch.Tensor:
    """next_token_loss of `batch` (model_inputs + labels), with logits computed at the labelled
    positions only (AnswerLogitsMixin). Same value as next_token_loss on the full logits."""
    targets = batch["labels"][:, 1:]
    positions = torch.nn.functional.pad(targets != IGNORE_INDEX, (0, 1), value=False)  # logits at t predict t+1
    logits = model(**model_inputs(batch), loss_positions=positions)[0]
    return torch.nn.functional.cross_entropy(logits[0].float(), targets[positions[:, :-1]])


def model_inputs(batch: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """The collated batch without what the model does not take (labels, prompt_length, record_index)."""
    return {k: v for k, v in batch.items() if k not in ("labels", "prompt_length", "record_index")}


def forward_step(data_iterator, model, args, timers):
    timers("batch generator").start()
    batch = get_batch(data_iterator, args)
    timers("batch generator").stop()
    loss = answer_loss(model, batch)
    return loss, {"loss": loss.detach()}


def greedy_answers(model, batch: Dict[str, torch.Tensor], tokenizer, max_new_tokens: int) -> List[str]:
    """Greedy answer of every row to its last question: each row's prompt is its first
    `prompt_length` tokens (the inference layout, earlier turns included)."""
    prompts = []
    for row, length in enumerate(batch["prompt_length"].tolist()):
        prompt = {key: batch[key][row:row + 1, :length].cpu() for key in
                  ("input_ids", "position_ids", "image_embed_mask", "vision_expert_mask", "image_rope_mask")}
        prompt["attention_mask"] = torch.ones(1, 1, length, length).tril()
        prompt["images"] = batch["images"][row:row + 1]
        prompts.append(prompt)
    config = GenerationConfig(max_length=int(batch["prompt_length"].max()) + max_new_tokens, top_k=1)
    eos = tokenizer.eos_token_id
    outputs = generate_batch(model, prompts, config, eos_token_id=eos, pad_token_id=tokenizer.pad_token_id)
    return [tokenizer.decode([t for t in ids if t != eos], skip_special_tokens=True).strip() for ids in outputs]


def reference_answers(batch: Dict[str, torch.Tensor], tokenizer) -> List[str]:
    """The last answer of every row: its labels after `prompt_length`, without eos."""
    answers = []
    for row, length in enumerate(batch["prompt_length"].tolist()):
        ids = [t for t in batch["labels"][row, length:].tolist() if t not in (IGNORE_INDEX, tokenizer.eos_token_id)]
        answers.append(tokenizer.decode(ids, skip_special_tokens=True).strip())
    return answers


def forward_step_eval(data_iterator, model, args, timers, *, tokenizer):
    """Teacher-forced loss plus a greedy answer to every row's last question. Metrics of the batch:
    `acc` / `acc_w/o_case` (exact match over all rows, as upstream's captcha validation) and
    `score` (utils.evaluation's rule: exact match ignoring case, or IoU >= 0.5 for every box)."""
    batch = get_batch(data_iterator, args)
    loss = answer_loss(model, batch)
    module = getattr(model, "module", model)
    mixins_before = set(module.mixins)
    try:
        predictions = greedy_answers(module, batch, tokenizer, args.eval_max_new_tokens)
    finally:
        for name in set(module.mixins) - mixins_before:  # the chat core's KV-cache mixin: not for training
            module.del_mixin(name)
    targets = reference_answers(batch, tokenizer)
    for prediction, target in zip(predictions, targets):
        logger.debug("pred %r label %r", prediction, target)
    scores = exact_match(predictions, targets)
    scores["score"] = sum(score_answer(p, t)["correct"] for p, t in zip(predictions, targets)) / max(1, len(targets))
    return loss, {name: torch.tensor(value, device=loss.device) for name, value in scores.items()}


# Runs and the final checkpoint ------------------------------------------------------------

def find_resume_dir(save_root: str, experiment_name: str):
    """The newest `<save_root>/<experiment_name>-<date>` run that holds a complete checkpoint, or None."""
    runs = [d for d in glob.glob(os.path.join(save_root, glob.escape(experiment_name) + "-*"))
            if resumable_iteration(d)[0] is not None]
    return max(runs, key=os.path.getmtime) if runs else None


def resume_iteration(run_dir: str) -> str:
    """The iteration folder of `run_dir` to resume: the newest complete one, with a warning for each newer
    one (or a bad `latest`) passed over and why."""
    iteration, skipped = resumable_iteration(run_dir)
    for name, why in skipped:
        logger.warning("resuming %s: skipped %s: %s", run_dir, name, why)
    if iteration is None:
        raise CogVLMError(f"{run_dir} holds no complete checkpoint to resume; start over with --no_resume")
    return iteration


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
