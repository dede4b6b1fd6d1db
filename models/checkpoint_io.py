"""Finding, validating and loading SAT checkpoints with errors a user can act on.

SAT's own loader downloads unknown names (which hangs offline), silently returns when `latest`
is missing, and only prints unexpected keys. We resolve names under `$SAT_HOME` ourselves, check
the directory layout first and refuse checkpoints whose keys do not match the model, naming them.
"""
import json
import logging
import os

import torch

from utils import hf_format
from models.errors import CheckpointError

logger = logging.getLogger(__name__)

RELEASED_CHECKPOINTS = {
    "cogvlm-base-224": "text-image pretrained, 224px",
    "cogvlm-base-490": "text-image pretrained, 490px",
    "cogvlm-chat-v1.1": "multi-turn chat and VQA, 490px",
    "cogvlm-grounding-base": "grounding (REC, grounded captioning), 490px",
    "cogvlm-grounding-generalist": "grounding generalist, 490px",
}
DOWNLOAD_HINT = ("download it from https://huggingface.co/THUDM/CogVLM (SAT format) and unpack it there, "
                 "or pass the checkpoint directory itself (SAT or HF format) to --from_pretrained")


def sat_home() -> str:
    return os.path.expanduser(os.environ.get("SAT_HOME", "~/.sat_models"))


def resolve_checkpoint(name_or_dir: str) -> str:
    """Return the checkpoint directory for a path or a name under $SAT_HOME; never downloads."""
    if os.path.isdir(name_or_dir):
        return name_or_dir
    looks_like_path = os.sep in name_or_dir or name_or_dir.startswith(".")
    candidate = os.path.join(sat_home(), name_or_dir)
    if not looks_like_path and os.path.isdir(candidate):
        return candidate
    if looks_like_path:
        raise CheckpointError(f"checkpoint directory '{name_or_dir}' does not exist; pass an existing directory "
                              f"or a released name ({', '.join(RELEASED_CHECKPOINTS)})")
    if name_or_dir in RELEASED_CHECKPOINTS:
        raise CheckpointError(f"checkpoint '{name_or_dir}' not found: looked in {candidate} ($SAT_HOME={sat_home()}); "
                              + DOWNLOAD_HINT)
    raise CheckpointError(f"unknown checkpoint '{name_or_dir}': it is not a directory, not in $SAT_HOME={sat_home()}, "
                          f"and not a released name ({', '.join(RELEASED_CHECKPOINTS)})")


def read_latest_iteration(ckpt_dir: str) -> str:
    latest = os.path.join(ckpt_dir, "latest")
    if not os.path.isfile(latest):
        raise CheckpointError(f"checkpoint '{ckpt_dir}' has no 'latest' file (it names the iteration folder to load); "
                              "is this a complete SAT checkpoint directory?")
    with open(latest) as f:
        iteration = f.read().strip()
    if not iteration:
        raise CheckpointError(f"'{latest}' is empty: it should hold the iteration folder name, e.g. 1")
    return iteration


def read_model_config(ckpt_dir: str) -> dict:
    """The SAT model config of a checkpoint directory; for an HF-format one, derived from its config.json."""
    if hf_format.is_hf_checkpoint(ckpt_dir):
        return hf_format.sat_config_from_hf(hf_format.read_hf_config(ckpt_dir),
                                            source=os.path.join(ckpt_dir, hf_format.HF_CONFIG))
    path = os.path.join(ckpt_dir, "model_config.json")
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint '{ckpt_dir}' has no model_config.json; is this a SAT checkpoint directory?")
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}); restore it from the original download") from None


def checkpoint_file(ckpt_dir: str, mp_rank: int = 0) -> str:
    iteration = read_latest_iteration(ckpt_dir)
    path = os.path.join(ckpt_dir, iteration, f"mp_rank_{mp_rank:02d}_model_states.pt")
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint file {path} is missing ('latest' says iteration {iteration}); "
                              "the download may be incomplete")
    return path


def load_state_dict_file(path: str) -> dict:
    """Read a SAT `{'module': state_dict}` file onto the CPU (memory-mapped: no second copy in RAM)."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # torch raises many types for a corrupt/truncated file
        raise CheckpointError(f"cannot read checkpoint file {path} ({type(e).__name__}: {str(e)[:200]}); "
                              "the file is corrupt or incomplete, download it again") from None
    if not isinstance(checkpoint, dict) or "module" not in checkpoint:
        raise CheckpointError(f"{path} is not a SAT checkpoint (expected a dict with key 'module')")
    return checkpoint["module"]


def _summarise(keys, limit=6):
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f" ... ({len(keys)} in all)" if len(keys) > limit else "")


def load_weights(model: torch.nn.Module, state_dict: dict, source: str, allow_missing_prefixes=()) -> None:
    """Copy `state_dict` into `model`, raising CheckpointError on keys that do not match.

    allow_missing_prefixes: key fragments that may be absent (new finetuning parameters that the
    caller initialises, e.g. LoRA matrices when finetuning from a base checkpoint).
    """
    result = model.load_state_dict(state_dict, strict=False)
    missing = [k for k in result.missing_keys if not any(p in k for p in allow_missing_prefixes)]
    unexpected = list(result.unexpected_keys)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys: {_summarise(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {_summarise(unexpected)}")
        hint = "check that --from_pretrained points at a CogVLM checkpoint of this format"
        if any(".matrix_A." in k or ".original." in k for k in unexpected):
            hint = "it holds LoRA weights: load it with --use_lora (and the same --lora_rank), or merge it first with merge_model.py"
        raise CheckpointError(f"checkpoint {source} does not match the model ({'; '.join(parts)}); {hint}")
