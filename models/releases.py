"""The released CogVLM checkpoints: the one registry of their names and what is known about each.

    RELEASED_CHECKPOINTS["cogvlm-chat-v1.1"].template     # "chat": the prompt template it answers best with

A released name given to `--from_pretrained` is downloaded from the hub repo SAT_HUB_REPO (one zip per
name; models.checkpoint.directory); the checkpoint layer reads template and grounding from here when the
checkpoint's own config does not say. The same weights are published in HF format as `hf_repo`.

This module imports only the standard library and models.templates: the flag parsers read it before any
model code loads.
"""
from dataclasses import dataclass
from typing import Dict

from models.templates import TEMPLATE_NAMES

# The SAT zips: file names as listed at https://huggingface.co/THUDM/CogVLM/tree/main, commit b9ccd2d
# "grounding v1.1", each about 28 GB; the names as upstream CogVLM registers them with SAT
# (utils/models/cogvlm_model.py of github.com/THUDM/CogVLM: MODEL_URLS["cogvlm-chat-v1.1"] =
# "r2://cogvlm-chat-v1.1.zip", ...). cogvlm-grounding-generalist's zip is v1.1 (the earlier
# cogvlm-grounding-generalist.zip of commit ed628a8 was replaced on main). SAT's zips hold one top folder
# named after the checkpoint (sat/resources/download.py asserts it); the unpacker also takes the files at the top.
SAT_HUB_REPO = "THUDM/CogVLM"
# The tokenizer of the released models (upstream's --local_tokenizer default).
RELEASED_TOKENIZER = "lmsys/vicuna-7b-v1.5"


@dataclass(frozen=True)
class ReleasedCheckpoint:
    purpose: str
    template: str        # the prompt template it answers best with (models.templates)
    image_size: int      # px of the square images its ViT takes
    zip_file: str        # its SAT zip in SAT_HUB_REPO
    hf_repo: str         # the same model in HF format (cogvlm-*-hf)
    grounding: bool = False  # answers with [[x0,y0,x1,y1]] boxes

    def __post_init__(self):
        if self.template not in TEMPLATE_NAMES:
            raise ValueError(f"template {self.template!r} is not one of {', '.join(TEMPLATE_NAMES)}")

    @property
    def description(self) -> str:
        return f"{self.purpose}, {self.image_size}px"


RELEASED_CHECKPOINTS: Dict[str, ReleasedCheckpoint] = {
    "cogvlm-base-224": ReleasedCheckpoint("text-image pretrained", "base", 224, "cogvlm-base-224.zip",
                                          "THUDM/cogvlm-base-224-hf"),
    "cogvlm-base-490": ReleasedCheckpoint("text-image pretrained, position encoding interpolated from 224px",
                                          "base", 490, "cogvlm-base-490.zip", "THUDM/cogvlm-base-490-hf"),
    "cogvlm-chat-v1.1": ReleasedCheckpoint("multi-turn chat and VQA", "chat", 490, "cogvlm-chat-v1.1.zip",
                                           "THUDM/cogvlm-chat-hf"),
    "cogvlm-grounding-base": ReleasedCheckpoint("grounding (REC, grounded captioning)", "base", 490,
                                                "cogvlm-grounding-base.zip", "THUDM/cogvlm-grounding-base-hf",
                                                grounding=True),
    "cogvlm-grounding-generalist": ReleasedCheckpoint("grounding generalist", "base", 490,
                                                      "cogvlm-grounding-generalist-v1.1.zip",
                                                      "THUDM/cogvlm-grounding-generalist-hf", grounding=True),
}
DEFAULT_CHECKPOINT = "cogvlm-chat-v1.1"        # what the front ends load when --from_pretrained is not given
DEFAULT_FINETUNE_CHECKPOINT = "cogvlm-base-490"  # what finetune_demo.py starts from (upstream's recipe)
