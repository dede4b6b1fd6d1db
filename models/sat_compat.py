"""Every workaround for SwissArmyTransformer (SAT) 0.4.12 and the DeepSpeed it imports, in one place.

Each entry names what it patches and why (the environment SAT and DeepSpeed read when first imported is set by
models/__init__.py, before any submodule can import them). The training entries are called by
finetune_demo.py before SAT's `training_main`; they keep SAT's behaviour on GPUs.

Where we use SAT 0.4.12 differently rather than patch it, the reason stands next to the code:
  models/cogvlm_model.py   `parallel_output` only in args (SAT raises "got multiple values" as a kwarg too);
                           the LM head mixin upgraded in place; SAT builds visual-expert linears with
                           skip_init in every mode (finetuning from scratch initialises them itself)
  models/mixin.py          a plain-torch, out-of-place rotary (SAT's FastRotaryEmbedding needs CUDA and
                           rotates in place, which autograd refuses)
  models/eva_clip_model.py the ViT's token inputs built for it (SAT's ViT forward wants them)
  models/kv_cache.py       an in-place cache instead of SAT's concatenating "auto-regressive" mixin
  models/kernels/linear.py model parallelism not initialised counts as one partition
  models/checkpoint/       our own loading (SAT's from_pretrained downloads unknown names, moves shards with
                           .cuda(), cannot re-split; its load_checkpoint only prints unexpected keys)
  utils/generation.py      our own decoding loop and sampler (SAT's filling_sequence copies the cache per step)
"""
import argparse
import os
import pickle
import re
import time

import deepspeed.ops
import torch
from sat.helpers import print_rank0
from sat.training import deepspeed_training as sat_training
from sat.training import model_io as sat_model_io

from models.errors import CheckpointError

# written into an iteration folder by the finetuning save once all its files are (see save_optimizer_state_too)
SAVE_COMPLETE = "save_complete"


def load_tensors(path: str, **kwargs):
    """`torch.load(path, weights_only=True, **kwargs)`: unpickles tensors, containers, numbers and strings only,
    so a file cannot run code while it loads. A file holding other pickled objects is a CheckpointError
    naming the first one. Every checkpoint, optimizer-state and cache read goes through here (DeepSpeed's
    own reads pass weights_only=False)."""
    try:
        return torch.load(path, weights_only=True, **kwargs)
    except pickle.UnpicklingError as e:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        what = f"a pickled {found[1].rstrip('.')}" if found else "pickled objects other than tensors"
        raise CheckpointError(f"{path} holds {what}, not only tensors; it was not loaded, because unpickling it "
                              "could run code. Load only checkpoints of tensors (torch.save of state dicts, or "
                              "safetensors)") from None


# Training (finetune_demo.py) ------------------------------------------------------------------------

class _PercentSafeHelp(argparse.HelpFormatter):
    def _get_help_string(self, action):
        return re.sub(r"%(?![%(])", "%%", action.help)


class SATArgumentParser(argparse.ArgumentParser):
    """SAT 0.4.12's parser, made usable on a machine without CUDA.

    SAT 0.4.12 refuses to train when `args.device` ('cpu') differs from `args.local_rank` (0), and
    defaults to the nccl backend, which has no CPU support. On CPU we align the two and default the
    backend to gloo, so the same command runs on GPUs and on CPU. Its --warmup help says "1% of", which
    argparse reads as a format: every --help crashed; a lone percent sign is escaped.
    """

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _PercentSafeHelp)
        super().__init__(*args, **kwargs)

    def parse_args(self, args=None, namespace=None):
        parsed = super().parse_args(args, namespace)
        if not torch.cuda.is_available():
            parsed.device = parsed.local_rank = "cpu"
            if parsed.distributed_backend == "nccl":
                parsed.distributed_backend = "gloo"
        return parsed


def skip_deepspeed_shm_op() -> None:
    """DeepSpeed 0.19 compiles a shared-memory all-reduce op (minutes) the first time it starts on CPU;
    gloo does the same job without it, so we mark the op unavailable (no effect with CUDA)."""
    if torch.cuda.is_available():
        return
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def make_sat_training_cpu_safe(args) -> None:
    """SAT 0.4.12's training loop calls CUDA-only functions unconditionally: `torch.cuda.synchronize()`
    in its step timers, `report_memory` (CUDA memory stats) and saving the CUDA RNG state with every
    checkpoint. Without CUDA we swap in CPU-safe equivalents; the training itself (DeepSpeed engine,
    gloo) is unchanged."""
    if torch.cuda.is_available():
        return
    class CPUTimers(sat_training.Timers):
        class Timer(sat_training.Timers.Timer):
            def start(self):
                assert not self.started_, "timer has already been started"
                self.start_time = time.time()
                self.started_ = True

            def stop(self):
                assert self.started_, "timer is not started"
                self.elapsed_ += time.time() - self.start_time
                self.started_ = False

    sat_training.Timers = CPUTimers
    sat_training.report_memory = lambda name: None
    args.no_save_rng = True


def save_optimizer_state_too() -> None:
    """Make SAT 0.4.12's periodic checkpoints hold the optimizer state, so that a run can resume exactly.

    SAT saves through the DeepSpeed engine's model-states file, which carries the optimizer state
    without ZeRO, but it never writes ZeRO's partitioned optimizer files; and its EMA check reads
    `optimizer.optimizer`, which a plain (ZeRO-0, fp32) torch optimizer lacks. We add the ZeRO files
    and hand SAT the optimizer only when it is a DeepSpeed wrapper. Once every file of the iteration is
    written, rank 0 adds the SAVE_COMPLETE marker: SAT writes `latest` in place and, with ZeRO, before the
    optimizer files, so resuming trusts the marker (models.checkpoint.sat_format.resumable_iteration).
    """
    sat_save = sat_training.save_checkpoint

    def save(iteration, model, optimizer, lr_scheduler, args):
        marker = os.path.join(args.save, str(iteration), SAVE_COMPLETE)
        if torch.distributed.get_rank() == 0 and os.path.exists(marker):
            os.remove(marker)  # an iteration saved again (after a resume) is unfinished until it is done
        sat_save(iteration, model, optimizer if hasattr(optimizer, "optimizer") else None, lr_scheduler, args)
        if hasattr(model, "zero_optimization") and model.zero_optimization():
            model._save_zero_checkpoint(args.save, str(iteration))
            torch.distributed.barrier()
        if torch.distributed.get_rank() == 0:
            open(marker, "w").close()

    sat_training.save_checkpoint = save


def make_sat_load_weights_only() -> None:
    """Make SAT 0.4.12's `--load` read its checkpoint file as tensors only (load_tensors) before SAT loads it:
    SAT's own torch.load passes no weights_only, so only torch's default (or a TORCH_FORCE_* variable)
    decides whether the file may run code, and a refused file ends in a traceback, not an error line."""
    sat_load = sat_training.load_checkpoint

    def load(model, args, load_path=None, prefix="", specific_iteration=None):
        path = args.load if load_path is None else load_path
        iteration, release, found = sat_model_io.get_checkpoint_iteration(path)
        if found:
            load_tensors(sat_model_io.get_checkpoint_name(path, specific_iteration or iteration, release),
                         map_location="cpu", mmap=True)
        return sat_load(model, args, load_path, prefix, specific_iteration)

    sat_training.load_checkpoint = load


def enable_resume(resume_dir: str, tag: str) -> None:
    """Make SAT 0.4.12's training_main continue the run in `resume_dir` from its iteration folder `tag` (the
    newest complete one: utils.training.resume_iteration): weights, optimizer state, step, lr.

    SAT's own `--load` restores model weights only (and restarts its lr schedule with a re-warmup),
    and training_main has no hook after the DeepSpeed engine exists, so we wrap the two functions
    it calls there: the engine loads its full checkpoint, and the lr schedule is rebuilt as the
    interrupted run had it and advanced to the restored step.
    """
    setup = sat_training.setup_model_untrainable_params_and_optimizer
    make_scheduler = sat_training.get_learning_rate_scheduler

    def setup_and_load(args, model, config_params=None):
        engine, optimizer = setup(args, model, config_params)
        engine.checkpoint_engine.load = load_tensors  # DeepSpeed's own passes weights_only=False
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
