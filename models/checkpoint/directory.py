"""Finding a checkpoint and opening it once: its directory, format, typed config, tokenizer and defaults.

`open_checkpoint(name_or_dir)` takes a directory (SAT or HF format), a released name, looked up under
`$SAT_HOME` (default `~/.sat_models`) and downloaded there when missing, or a hub repo id in HF format
(`THUDM/cogvlm-chat-hf`, downloaded into the HF cache); see download.py. It reads the config once; everything
downstream gets the `Checkpoint` it returns. Unlike SAT's own loader it never hangs offline on a name:
`local_files_only` (or HF_HUB_OFFLINE=1) makes no request at all.
"""
import logging
import os
from dataclasses import dataclass
from typing import Optional

from models.checkpoint import download, hf_format, sat_format
from models.config import CogVLMConfig
from models.errors import CheckpointError
from models.releases import RELEASED_CHECKPOINTS, SAT_HUB_REPO, ReleasedCheckpoint

logger = logging.getLogger(__name__)

TOKENIZER_DIR = "tokenizer"  # a checkpoint may carry its tokenizer in this folder


def sat_home() -> str:
    return os.path.expanduser(os.environ.get("SAT_HOME", "~/.sat_models"))


@dataclass(frozen=True)
class Checkpoint:
    """An opened checkpoint directory.

    format: "sat" or "hf". tokenizer_dir: the tokenizer it carries (a `tokenizer/` folder, or the HF
    directory itself when it holds tokenizer files), else None.
    """
    path: str
    format: str
    config: CogVLMConfig
    tokenizer_dir: Optional[str] = None
    released: Optional[ReleasedCheckpoint] = None

    @property
    def name(self) -> str:
        return os.path.basename(os.path.normpath(self.path))

    @property
    def template(self) -> Optional[str]:
        """The prompt template the checkpoint names (its config, or its release), else None."""
        if self.config.template is not None:
            return self.config.template
        return self.released.template if self.released else None

    @property
    def grounding(self) -> bool:
        return self.config.grounding or bool(self.released and self.released.grounding)

    def reader(self):
        """The checkpoint's tensors: a sat_format.SATReader or an hf_format.HFReader."""
        if self.format == "hf":
            return hf_format.HFReader(self.path, self.config)
        return sat_format.SATReader(self.path, self.config)


def find_checkpoint_dir(name_or_dir: str, local_files_only: bool = False, home: Optional[str] = None) -> str:
    """The directory of a path, of a name under `home` (default $SAT_HOME; a released name is downloaded there
    when missing), or of a hub repo id `owner/name` in HF format (downloaded into the HF cache). With
    `local_files_only` (or HF_HUB_OFFLINE=1) nothing is fetched: what is not on disk is an error."""
    if os.path.isdir(name_or_dir):
        return name_or_dir
    where = f"$SAT_HOME={sat_home()}" if home is None else home
    home = sat_home() if home is None else os.path.expanduser(home)
    looks_like_path = os.sep in name_or_dir or name_or_dir.startswith(".")
    candidate = os.path.join(home, name_or_dir)
    if not looks_like_path and os.path.isdir(candidate):
        return candidate
    if name_or_dir in RELEASED_CHECKPOINTS:
        return download.download_released(name_or_dir, SAT_HUB_REPO, RELEASED_CHECKPOINTS[name_or_dir].zip_file,
                                          candidate, local_files_only)
    if download.is_hub_repo_id(name_or_dir):
        return download.download_hub_repo(name_or_dir, local_files_only)
    released = ", ".join(RELEASED_CHECKPOINTS)
    if looks_like_path:
        raise CheckpointError(f"checkpoint directory '{name_or_dir}' does not exist; pass an existing directory, "
                              f"a hub repo id (owner/name) or a released name ({released})")
    raise CheckpointError(f"unknown checkpoint '{name_or_dir}': it is not a directory, not in {where}, "
                          f"and not a released name ({released})")


def _tokenizer_dir(path: str, fmt: str) -> Optional[str]:
    carried = os.path.join(path, TOKENIZER_DIR)
    if os.path.isdir(carried):
        return carried
    if fmt == "hf" and any(os.path.isfile(os.path.join(path, f)) for f in ("tokenizer.model", "tokenizer.json")):
        return path
    return None


def open_checkpoint(name_or_dir: str, local_files_only: bool = False, home: Optional[str] = None) -> Checkpoint:
    """Find the checkpoint `name_or_dir` names (downloading a released name or hub repo id unless
    `local_files_only`; names under `home`, default $SAT_HOME) and read its config (once). A directory with a
    SAT model_config.json is SAT format; one with only an HF config.json is HF format."""
    path = find_checkpoint_dir(name_or_dir, local_files_only, home)
    if sat_format.is_sat_dir(path):
        fmt, config = "sat", sat_format.read_sat_config(path)
    elif hf_format.is_hf_dir(path):
        fmt, config = "hf", hf_format.read_hf_config(path)[1]
    else:
        raise CheckpointError(f"'{path}' is neither a SAT checkpoint ({sat_format.CONFIG_FILE}) nor an HF one "
                              f"({hf_format.CONFIG_FILE}); pass a CogVLM checkpoint directory")
    name = os.path.basename(os.path.normpath(path))
    return Checkpoint(path=path, format=fmt, config=config, tokenizer_dir=_tokenizer_dir(path, fmt),
                      released=RELEASED_CHECKPOINTS.get(name))
