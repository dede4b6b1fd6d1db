"""CogVLM networks on SwissArmyTransformer."""
import utils  # noqa: F401  (sets the environment SAT/DeepSpeed need before they are imported)
from models.cogvlm_model import CogVLMModel, FineTuneTestCogVLMModel, FineTuneTrainCogVLMModel
from models.eva_clip_model import EVA2CLIPModel

__all__ = ["CogVLMModel", "FineTuneTrainCogVLMModel", "FineTuneTestCogVLMModel", "EVA2CLIPModel"]
