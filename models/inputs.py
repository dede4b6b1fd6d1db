"""What `CogVLMModel.forward` takes, checked before any compute: every keyword is used or refused.

- Keywords: the forward's named inputs, SAT's own, and those each mixin declares it reads (a class attribute
  `forward_inputs`; SAT's own mixins are listed here). Anything else is a CogVLMError naming it.
- Upstream's spelling of the pixels: the image processor's outputs under a `vision_` prefix (`vision_image`,
  and the ViT's fixed token inputs beside it).
- The image block: pixels, `image_embed_mask`, `vision_expert_mask`, `image_rope_mask` and `position_ids`
  must agree (the layout utils.language.llama2_text_processor_inference builds), or the forward would
  silently compute something else.
"""
from typing import Iterable, Optional

import torch

from sat.model.cached_autoregressive_model import CachedAutoregressiveMixin

from models.errors import CogVLMError

VISION_PREFIX = "vision_"  # upstream passes the image processor's outputs to the forward with this prefix
# The ViT's own token inputs, as upstream's image processor returns them beside "image": one CLS id (its vocab
# has one entry), no positions (learned per patch), full attention. They carry nothing else, so they are
# checked against that and not passed on.
_VIT_TOKEN_INPUTS = ("input_ids", "position_ids", "attention_mask")
# SAT's own forward keyword, and those its generation loop (filling_sequence) passes as None to models that
# do not use them (decoder-only: no encoder, no attention logits added)
_SAT_FORWARD_INPUTS = ("output_hidden_states",)
_SAT_NONE_INPUTS = ("encoder_outputs", "log_attention_weights")
_SAT_MIXIN_INPUTS = {CachedAutoregressiveMixin: ("mems",)}


def rope_position_ids(image_rope_mask: torch.Tensor) -> torch.Tensor:
    """(B, L) 0/1 mask of image patches -> (B, L) positions: +1 per token, one shared by a patch run."""
    rope = image_rope_mask.bool()
    continues_run = torch.zeros_like(rope)
    continues_run[:, 1:] = rope[:, 1:] & rope[:, :-1]
    return torch.cumsum((~continues_run).long(), dim=1) - 1


def take_vision_inputs(kwargs: dict, images: Optional[torch.Tensor], device) -> Optional[torch.Tensor]:
    """Remove the upstream `vision_*` keywords from `kwargs`; returns the pixels (`images` or `vision_image`,
    (N, 3, S, S)). The ViT's token inputs are checked to be the only ones it has; anything else is refused."""
    vision = {name[len(VISION_PREFIX):]: kwargs.pop(name) for name in list(kwargs)
              if name.startswith(VISION_PREFIX) and name != "vision_expert_mask"}
    if "image" in vision:
        if images is not None:
            raise CogVLMError("forward got both images= and vision_image=; pass the pixels once (either name)")
        images = vision.pop("image")
    unknown = sorted(set(vision) - set(_VIT_TOKEN_INPUTS))
    if unknown:
        raise CogVLMError(f"forward got {', '.join(VISION_PREFIX + k for k in unknown)}, which CogVLM's ViT does not "
                          "take; its inputs are vision_image (N, 3, S, S) and the token inputs "
                          f"{', '.join(VISION_PREFIX + k for k in _VIT_TOKEN_INPUTS)} of the image processor")
    if vision and images is None:
        raise CogVLMError(f"forward got {', '.join(VISION_PREFIX + k for k in vision)} without vision_image; pass "
                          "the image processor's whole output")
    if images is not None and images.dim() != 4:
        raise CogVLMError(f"images / vision_image has shape {tuple(images.shape)}; it must be (N, 3, S, S)")
    count = 0 if images is None else images.shape[0]
    ids, positions, mask = (vision.get(name) for name in _VIT_TOKEN_INPUTS)
    if ids is not None and (tuple(ids.shape) != (count, 1) or bool(ids.to(device).ne(0).any())):
        raise CogVLMError(f"vision_input_ids must be zeros of shape ({count}, 1), the ViT's CLS id per image; "
                          f"got shape {tuple(ids.shape)}")
    if positions is not None:
        raise CogVLMError("vision_position_ids must be None: the ViT's position embeddings are learned per patch")
    if mask is not None and not bool(mask.to(device).bool().all()):
        raise CogVLMError("vision_attention_mask must be all ones: the ViT attends over the whole image")
    return images


def check_image_inputs(input_ids, position_ids, vision_expert_mask, image_embed_mask, image_rope_mask, images,
                       image_length: int) -> torch.Tensor:
    """Refuse inputs the forward could not honour (CogVLMError naming the argument); returns position_ids
    (derived from image_rope_mask when not given). All masks are (B, L) like input_ids."""
    for name, mask in (("vision_expert_mask", vision_expert_mask), ("image_embed_mask", image_embed_mask),
                       ("image_rope_mask", image_rope_mask), ("position_ids", position_ids)):
        if mask is not None and mask.shape[-1] != input_ids.shape[1]:
            raise CogVLMError(f"{name} has shape {tuple(mask.shape)} but input_ids has {tuple(input_ids.shape)}; "
                              "give every mask one entry per token")
    has_block = image_embed_mask is not None and bool(image_embed_mask.any())
    if images is not None and not has_block:
        raise CogVLMError("an image was given (images / vision_image) but image_embed_mask marks no image positions;"
                          " build the inputs with the text processor from a prompt that holds the image marker")
    if has_block and images is None:
        raise CogVLMError("image_embed_mask marks image positions but no image was given; pass images= "
                          "(or upstream's vision_image=) with the pixels of each image")
    if has_block and vision_expert_mask is None:
        raise CogVLMError("an image block needs vision_expert_mask (1 on boi and the patches), as the text "
                          "processor returns it")
    if vision_expert_mask is not None and bool(vision_expert_mask.any()):
        if not has_block or bool((vision_expert_mask.bool() & ~image_embed_mask.bool()).any()):
            raise CogVLMError("vision_expert_mask marks positions outside the image block of image_embed_mask; "
                              "the visual expert is for boi and the image patches only")
    if has_block:
        needed = images.shape[0] * (image_length + 2)
        if int(image_embed_mask.bool().sum()) != needed:
            raise CogVLMError(f"image_embed_mask marks {int(image_embed_mask.bool().sum())} positions but "
                              f"{images.shape[0]} image(s) need {image_length + 2} each (boi, {image_length} "
                              "patches, eoi)")
    if image_rope_mask is not None:
        derived = rope_position_ids(image_rope_mask).to(input_ids.device)
        if position_ids is None:
            return derived
        if not torch.equal(position_ids.to(derived.device).expand_as(derived), derived):
            raise CogVLMError("position_ids disagree with image_rope_mask (all patches of an image share one "
                              "position); pass the text processor's position_ids, or leave them out")
    if position_ids is None:
        raise CogVLMError("forward needs position_ids (or image_rope_mask to derive them from)")
    return position_ids


def accepted_keywords(mixins: Iterable) -> frozenset:
    """SAT's forward keywords and those the given mixins read."""
    names = set(_SAT_FORWARD_INPUTS)
    for mixin in mixins:
        names.update(getattr(mixin, "forward_inputs", _SAT_MIXIN_INPUTS.get(type(mixin), ())))
    return frozenset(names)


def check_keywords(kwargs: dict, accepted: frozenset) -> None:
    """Refuse keywords outside `accepted` (SAT's generation-loop ones are dropped when None)."""
    for name in _SAT_NONE_INPUTS:
        if name in kwargs and kwargs[name] is None:
            del kwargs[name]
    unknown = sorted(set(kwargs) - accepted)
    if unknown:
        raise CogVLMError(f"CogVLMModel.forward got {', '.join(map(repr, unknown))}, which it does not use; "
                          "its inputs are input_ids, position_ids, attention_mask, vision_expert_mask, "
                          "image_embed_mask, image_rope_mask and images (or vision_image), plus "
                          f"{', '.join(sorted(accepted))} from SAT and this model's mixins")
