"""The checkpoint layer: finding, reading, writing and converting CogVLM checkpoints, and loading them.

    checkpoint = open_checkpoint("cogvlm-chat-v1.1")          # directory, format, typed config: read once
    model, args = load_model(checkpoint, device="cpu", dtype=torch.bfloat16, quant=8)

layout.py     the tensor table: SAT/HF names, shapes and model-parallel split rules (the only source)
sat_format.py SAT directories: shard files, the lazy memory-mapped reader (any rank of any split), writer
hf_format.py  HF (cogvlm-chat-hf) directories: safetensors reader (SAT-key view) and writer
directory.py  finding a checkpoint (path, $SAT_HOME, released names, hub repo ids) and opening it
download.py   released SAT zips and HF-format hub repos through huggingface_hub (resume, atomic unpack)
loader.py     load_model: build this process's share of the model and load it (quantizing on the way)
convert.py    SAT <-> HF conversion and SAT resharding (merge / split / fold LoRA)
atomic.py     writes that never leave half a checkpoint
"""
from models.checkpoint.convert import convert_hf_to_sat, convert_sat_to_hf, parse_size, reshard_checkpoint
from models.checkpoint.directory import RELEASED_CHECKPOINTS, Checkpoint, open_checkpoint, sat_home
from models.checkpoint.loader import install_upstream_api, load_model, model_class_for

install_upstream_api()

__all__ = ["Checkpoint", "open_checkpoint", "load_model", "model_class_for", "convert_sat_to_hf",
           "convert_hf_to_sat", "reshard_checkpoint", "parse_size", "RELEASED_CHECKPOINTS", "sat_home"]
