"""CogVLM for 🤗 transformers: our own modeling code, registered with the Auto classes on import.

The files of REMOTE_CODE_FILES (configuration, modeling and its vision part, processing) are
self-contained (torch, transformers, PIL, numpy): `add_remote_code` copies them into an HF-format
checkpoint directory with an `auto_map`, so that
`AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)` works in any environment with
transformers, without this project installed.
"""
import json
import os
import shutil
import tempfile
from typing import List, Optional

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoProcessor, GenerationConfig

from models.errors import CheckpointError, TokenizerError
from models.releases import RELEASED_TOKENIZER
from models.templates import DEFAULT_TEMPLATE, TEMPLATE_KEY, TEMPLATE_NAMES
from models.hf_cogvlm.configuration_cogvlm import CogVLMConfig
from models.hf_cogvlm.modeling_cogvlm import CogVLMForCausalLM, CogVLMModel
from models.hf_cogvlm.processing_cogvlm import CogVLMProcessor

CODE_DIR = os.path.dirname(os.path.abspath(__file__))
REMOTE_CODE_FILES = ("configuration_cogvlm.py", "modeling_cogvlm.py", "modeling_cogvlm_vision.py",
                     "processing_cogvlm.py")
AUTO_MAP = {
    "AutoConfig": "configuration_cogvlm.CogVLMConfig",
    "AutoModel": "modeling_cogvlm.CogVLMModel",
    "AutoModelForCausalLM": "modeling_cogvlm.CogVLMForCausalLM",
    "AutoProcessor": "processing_cogvlm.CogVLMProcessor",
}
# What a LLaMA tokenizer directory may hold; tokenizer.model or tokenizer.json is required.
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "chat_template.jinja")
CONFIG_FILE, GENERATION_CONFIG_FILE = "config.json", "generation_config.json"

AutoConfig.register(CogVLMConfig.model_type, CogVLMConfig, exist_ok=True)
AutoModel.register(CogVLMConfig, CogVLMModel, exist_ok=True)
AutoModelForCausalLM.register(CogVLMConfig, CogVLMForCausalLM, exist_ok=True)
AutoProcessor.register(CogVLMConfig, CogVLMProcessor, exist_ok=True)
# save_pretrained of an in-process model then writes `auto_map` and copies the code files, as remote code does
CogVLMConfig.register_for_auto_class()
CogVLMModel.register_for_auto_class("AutoModel")
CogVLMForCausalLM.register_for_auto_class("AutoModelForCausalLM")


def _umask_mode() -> int:
    """The mode a plain open() gives a new file (0o666 less the umask): mkstemp's files are private (0o600)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _write_atomically(path: str, write) -> None:
    """Call write(file) on a temporary file next to `path`, then rename it into place (with the permissions
    open() would have given it)."""
    handle, tmp_path = tempfile.mkstemp(dir=os.path.dirname(path), prefix=f".{os.path.basename(path)}.")
    try:
        with os.fdopen(handle, "wb") as f:
            write(f)
        os.chmod(tmp_path, _umask_mode())
        os.replace(tmp_path, path)
    except BaseException:
        os.unlink(tmp_path)
        raise


def _copy_atomically(source: str, target: str) -> None:
    with open(source, "rb") as f:
        _write_atomically(target, lambda out: shutil.copyfileobj(f, out))


def _write_json(path: str, data: dict) -> None:
    _write_atomically(path, lambda f: f.write((json.dumps(data, indent=2, sort_keys=True) + "\n").encode()))


def tokenizer_files_of(tokenizer_dir: str) -> List[str]:
    """The tokenizer files in `tokenizer_dir` (TokenizerError when it has no vocabulary file)."""
    files = [name for name in TOKENIZER_FILES if os.path.isfile(os.path.join(tokenizer_dir, name))]
    if not {"tokenizer.model", "tokenizer.json"} & set(files):
        raise TokenizerError(f"'{tokenizer_dir}' has no tokenizer.model or tokenizer.json; give the directory "
                             f"of the Vicuna tokenizer (e.g. a download of {RELEASED_TOKENIZER})")
    return files


def add_remote_code(hf_dir: str, template: Optional[str] = None,
                    tokenizer_dir: Optional[str] = None) -> List[str]:
    """Make an HF-format CogVLM directory (config.json + safetensors) loadable with transformers alone.

    Copies the remote-code files, adds `auto_map` (and `model_type` / `architectures` when
    missing) to config.json and sets its `template_version` to `template` (None: keep config.json's, else the
    default),
    writes generation_config.json and, when `tokenizer_dir` is given, copies its tokenizer files.
    Each file is written under a temporary name and renamed into place. Returns the names of the
    files written.
    """
    config_path = os.path.join(hf_dir, CONFIG_FILE)
    if not os.path.isfile(config_path):
        raise CheckpointError(f"'{hf_dir}' has no {CONFIG_FILE}; convert the checkpoint to HF format first")
    if template is not None and template not in TEMPLATE_NAMES:
        raise CheckpointError(f"unknown template version '{template}'; choose one of {', '.join(TEMPLATE_NAMES)}")
    tokenizer_files = tokenizer_files_of(tokenizer_dir) if tokenizer_dir is not None else []
    try:
        with open(config_path) as f:
            config = json.load(f)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{config_path} is not valid JSON ({e}); convert the checkpoint again") from None
    config.setdefault("model_type", CogVLMConfig.model_type)
    config.setdefault("architectures", [CogVLMForCausalLM.__name__])
    config["auto_map"] = dict(AUTO_MAP)
    config[TEMPLATE_KEY] = template or config.get(TEMPLATE_KEY, DEFAULT_TEMPLATE)
    try:
        model_config = CogVLMConfig.from_dict(config)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{config_path} is not a CogVLM config: {e}") from None

    for name in REMOTE_CODE_FILES:
        _copy_atomically(os.path.join(CODE_DIR, name), os.path.join(hf_dir, name))
    _write_json(config_path, config)
    generation = GenerationConfig(bos_token_id=model_config.bos_token_id, eos_token_id=model_config.eos_token_id,
                                  pad_token_id=model_config.pad_token_id)
    _write_atomically(os.path.join(hf_dir, GENERATION_CONFIG_FILE),
                      lambda f: f.write(generation.to_json_string(use_diff=True).encode()))
    for name in tokenizer_files:
        _copy_atomically(os.path.join(tokenizer_dir, name), os.path.join(hf_dir, name))
    return [*REMOTE_CODE_FILES, CONFIG_FILE, GENERATION_CONFIG_FILE, *tokenizer_files]


__all__ = ["AUTO_MAP", "REMOTE_CODE_FILES", "tokenizer_files_of", "CogVLMConfig", "CogVLMForCausalLM", "CogVLMModel", "CogVLMProcessor",
           "add_remote_code"]
