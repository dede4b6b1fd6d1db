"""EVA2-CLIP-E vision encoder (SAT's `EVA2CLIPModel`, with an image-only forward).

SAT's model already has CogVLM's architecture: conv patch embedding + CLS (vocab of size 1),
learned position embeddings, post-sublayer LayerNorm (`h = h + LN(Attn(h))`), GELU MLP, no final
norm, and a final hook that drops the CLS position. We add a forward that takes nothing but the
images (the token inputs SAT's transformer wants, one CLS id and full attention, are built here), and
route its attention through models.kernels.attention (its bf16 CPU kernel) where SAT's default would run.
"""
import torch

from sat.model.base_model import BaseMixin, non_conflict
from sat.model.official.eva_clip_model import EVA2CLIPModel as SATEVA2CLIPModel
from sat.transformer_defaults import attention_fn_default

from models.kernels.attention import MaskKinds, prompt_attention


class PromptAttentionMixin(BaseMixin):
    """Full attention without dropout through `prompt_attention`; anything else (another attention hook,
    dropout, a mask) as before."""

    def __init__(self):
        super().__init__()
        self.mask_kinds = MaskKinds()  # the layers of one forward share its mask

    @non_conflict
    def attention_fn(self, q, k, v, mask, dropout_fn, old_impl=attention_fn_default, **kw_args):
        if old_impl is attention_fn_default and dropout_fn is None and self.mask_kinds(mask) == "all":
            return prompt_attention(q, k, v)
        return old_impl(q, k, v, mask, dropout_fn, **kw_args)


class EVA2CLIPModel(SATEVA2CLIPModel):
    def __init__(self, args, transformer=None, **kwargs):
        super().__init__(args, transformer=transformer, **kwargs)
        self.add_mixin("prompt-attention", PromptAttentionMixin())

    def forward(self, images: torch.Tensor, **kw_args):
        """images: (N, 3, S, S) -> [features (N, patches, hidden), *per-layer outputs]."""
        cls_ids = torch.zeros(images.shape[0], 1, dtype=torch.long, device=images.device)
        attention_mask = torch.ones(1, 1, dtype=images.dtype, device=images.device)
        kw_args.pop("parallel_output", None)
        return super().forward(input_ids=cls_ids, position_ids=None, attention_mask=attention_mask, image=images,
                               **kw_args)
