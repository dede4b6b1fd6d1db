"""CogVLM networks on SwissArmyTransformer, their typed config, and the checkpoint layer above them.

Importing the package also imports models.checkpoint, which gives the networks the upstream
`CogVLMModel.from_pretrained` (the networks themselves never import the checkpoint layer).
"""
from models import sat_compat  # noqa: F401  (must precede the first `import sat`)
from models.cogvlm_model import CogVLMModel, FineTuneTestCogVLMModel, FineTuneTrainCogVLMModel
from models.eva_clip_model import EVA2CLIPModel
from models import checkpoint  # noqa: F401,E402  (installs CogVLMModel.from_pretrained)

__all__ = ["CogVLMModel", "FineTuneTrainCogVLMModel", "FineTuneTestCogVLMModel", "EVA2CLIPModel"]
