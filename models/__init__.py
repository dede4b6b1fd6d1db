"""CogVLM networks on SwissArmyTransformer, their typed config, and the checkpoint layer above them.

`from models import CogVLMModel` (or another name of __all__) imports the networks and the checkpoint layer,
which gives them the upstream `CogVLMModel.from_pretrained` (the networks themselves never import the
checkpoint layer). Importing the package alone loads neither (PEP 562 lazy names), so that its light modules
(models.errors, models.config) load without SAT: an entry script's `--help` and flag errors never wait for it.

SAT and DeepSpeed read their environment when first imported, which any submodule may do: it is set here,
before any of them can be.
"""
import importlib
import logging
import os

import torch

# DeepSpeed guesses its accelerator and says so on stdout when it lands on the CPU: name it.
if "DS_ACCELERATOR" not in os.environ and not torch.cuda.is_available():
    os.environ["DS_ACCELERATOR"] = "cpu"
# SAT's start-up lines: its CUDA-less checkpointing fallback, model building and model-parallel set-up, a guessed
# LOCAL_WORLD_SIZE, model-only mode, the parameter count (our loader says what it loaded), and its optional QLoRA
# import failing where bitsandbytes is absent (--use_qlora says so when asked for). The rest of SAT's log (the
# training progress) stays; utils.cli's --verbose shows these too.
SAT_START_UP_NOISE = ("DeepSpeed/CUDA is not installed", " model ...", "initializing model parallel with size",
                      "You didn't pass in LOCAL_WORLD_SIZE", "You are using model-only mode",
                      "number of parameters on model parallel rank", "Failed to load bitsandbytes")


class _QuietStartUp(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = str(record.msg)
        return not any(noise in message for noise in SAT_START_UP_NOISE)


SAT_NOISE_FILTER = _QuietStartUp()
logging.getLogger("sat").addFilter(SAT_NOISE_FILTER)

_PUBLIC = {"CogVLMModel": "models.cogvlm_model", "FineTuneTrainCogVLMModel": "models.cogvlm_model",
           "FineTuneTestCogVLMModel": "models.cogvlm_model", "EVA2CLIPModel": "models.eva_clip_model"}
__all__ = list(_PUBLIC)


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'models' has no attribute {name!r}")
    module = importlib.import_module(_PUBLIC[name])
    importlib.import_module("models.checkpoint")  # installs CogVLMModel.from_pretrained
    return getattr(module, name)
