"""LoRA on CogVLM's visual expert: the image tokens' attention QKV and output projection in each LLM layer.

SAT's lora2 `LoraMixin` wraps each layer's own attention linears, which in CogVLM belong to the
language expert; the visual expert's live in `LlamaVisionExpertAttnMixin` (models/mixin.py). This
mixin wraps those with SAT's own `LoraLinear`, so the parameters carry the same names
(`original.weight`, `matrix_A.k`, `matrix_B.k`, B starting at zero) and checkpoints, the loader and
merging treat both experts alike.
"""
from typing import Optional, Sequence

from sat.model.base_model import BaseMixin
from sat.model.finetune.lora2 import LoraLinear, merge_linear_lora, replace_linear_with_lora

QKV_PARTS = 3  # the fused QKV projection: one (A, B) pair per part, as SAT does for the language expert


class VisionExpertLoraMixin(BaseMixin):
    """Rank-`r` LoRA (scaling lora_alpha / r, SAT's default alpha 1) on the visual-expert attention of
    the layers in `layer_range` (default: all `num_layers`)."""

    def __init__(self, num_layers: int, r: int, lora_alpha: float = 1.0, layer_range: Optional[Sequence[int]] = None):
        super().__init__()
        self.r, self.lora_alpha = r, lora_alpha
        self.layer_range = list(range(num_layers)) if layer_range is None else list(layer_range)

    def reinit(self, parent_model):
        attention = parent_model.get_mixin("rotary")
        for i in self.layer_range:
            attention.vision_query_key_value_list[i] = replace_linear_with_lora(
                attention.vision_query_key_value_list[i], QKV_PARTS, self.r, self.lora_alpha)
            attention.vision_dense_list[i] = replace_linear_with_lora(attention.vision_dense_list[i], 1, self.r,
                                                                      self.lora_alpha)

    def merge_lora(self, parent_model):
        """Fold W += scaling * B @ A into plain linears (same state-dict keys as before LoRA)."""
        attention = parent_model.get_mixin("rotary")
        for layers in (attention.vision_query_key_value_list, attention.vision_dense_list):
            for i, layer in enumerate(layers):
                if isinstance(layer, LoraLinear):
                    merged = merge_linear_lora(layer)
                    layers[i] = merged.to(layer.original.weight.device)
