"""CogVLM networks on SwissArmyTransformer."""
from models import sat_compat  # noqa: F401  (must precede the first `import sat`)
from models.cogvlm_model import CogVLMModel, FineTuneTestCogVLMModel, FineTuneTrainCogVLMModel
from models.eva_clip_model import EVA2CLIPModel

__all__ = ["CogVLMModel", "FineTuneTrainCogVLMModel", "FineTuneTestCogVLMModel", "EVA2CLIPModel"]
