"""EVA2-CLIP-E vision encoder (SAT's `EVA2CLIPModel`, with an image-only forward).

SAT's model already has CogVLM's architecture: conv patch embedding + CLS (vocab of size 1),
learned position embeddings, post-sublayer LayerNorm (`h = h + LN(Attn(h))`), GELU MLP, no final
norm, and a final hook that drops the CLS position. We only add a forward that takes nothing but the
images: the token inputs SAT's transformer wants (one CLS id, full attention) are built here.
"""
import torch

from sat.model.official.eva_clip_model import EVA2CLIPModel as SATEVA2CLIPModel


class EVA2CLIPModel(SATEVA2CLIPModel):
    def forward(self, images: torch.Tensor, **kw_args):
        """images: (N, 3, S, S) -> [features (N, patches, hidden), *per-layer outputs]."""
        cls_ids = torch.zeros(images.shape[0], 1, dtype=torch.long, device=images.device)
        attention_mask = torch.ones(1, 1, dtype=images.dtype, device=images.device)
        kw_args.pop("parallel_output", None)
        return super().forward(input_ids=cls_ids, position_ids=None, attention_mask=attention_mask, image=images,
                               **kw_args)
