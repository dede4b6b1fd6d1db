"""EVA2-CLIP-E vision encoder (SAT's `EVA2CLIPModel`, with an image-only forward).

SAT's model already has CogVLM's architecture: conv patch embedding + CLS (vocab of size 1),
learned position embeddings, post-sublayer LayerNorm (`h = h + LN(Attn(h))`), GELU MLP, no final
norm, and a final hook that drops the CLS position. We only add a forward that needs nothing but
the image, so callers do not have to build the ViT's dummy token inputs themselves.
"""
import torch

from sat.model.official.eva_clip_model import EVA2CLIPModel as SATEVA2CLIPModel


class EVA2CLIPModel(SATEVA2CLIPModel):
    def forward(self, image: torch.Tensor, input_ids=None, position_ids=None, attention_mask=None, **kw_args):
        """image: (B, 3, S, S) -> [features (B, patches, hidden), *per-layer outputs].

        input_ids / position_ids / attention_mask are accepted for compatibility with the upstream
        image processor, which passes dummy values; the ViT has one CLS token and full attention.
        """
        batch_size = image.shape[0]
        if input_ids is None or input_ids.shape[0] != batch_size:
            input_ids = torch.zeros(batch_size, 1, dtype=torch.long, device=image.device)
        attention_mask = torch.ones(1, 1, dtype=image.dtype, device=image.device)
        kw_args.pop("parallel_output", None)
        return super().forward(input_ids=input_ids, position_ids=None, attention_mask=attention_mask,
                               image=image, **kw_args)
