"""CogVLM inputs for 🤗 transformers: prompt templates, the image transform and the token layout.

A conversation becomes

    input_ids       [bos] [0] [0 x L] [0] [text ...]      L = (image_size / patch_size)^2 image patches
    token_type_ids    0    1   1 x L   1    0 ...         1 = boi, the patches and eoi (their embeddings
                                                          come from the image); 0 = text
    position_ids      0    1   2 x L   3    4 ...         `cogvlm_position_ids`: the patches share one

and a text-only conversation is [bos] [text ...] with token_type_ids all 0 and positions 0, 1, 2, ...
Text is tokenised without special tokens; bos is added explicitly (transformers 5 `LlamaTokenizer`
does not always add it).

This file is also copied into converted checkpoint directories as `trust_remote_code` code, so it
imports only the standard library, numpy, PIL, torch and transformers.
"""
import json
import os
import shutil
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image
from transformers import AutoTokenizer, BatchFeature, PretrainedConfig

from .configuration_cogvlm import DEFAULT_TEMPLATE, PROMPT_TEMPLATES

LANGUAGE_TOKEN_TYPE, VISION_TOKEN_TYPE = 0, 1
IMAGE_PLACEHOLDER_ID = 0  # input id of the image block's positions; their embeddings are replaced
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PROCESSOR_CONFIG = "processor_config.json"


History = Sequence[Tuple[str, str]]


def history_to_prompt(template: str, query: str, history: Optional[History] = None) -> str:
    """The prompt text of `query` after the earlier turns `history` [(query, response), ...] in `template` (a
    `template_version` name)."""
    if template not in PROMPT_TEMPLATES:
        raise ValueError(f"unknown template_version {template!r}; choose one of {', '.join(PROMPT_TEMPLATES)}")
    query_template, turn_template, _ = PROMPT_TEMPLATES[template]
    prompt = ""
    if turn_template is not None:
        for old_query, response in history or ():
            prompt += turn_template.format(query=old_query, response=response)
    return prompt + query_template.format(query=query)


def cogvlm_position_ids(token_type_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None):
    """(B, L) token types (and 0/1 padding mask) -> (B, L) positions, 0 at the first real token.

    +1 per token, except that the patches of an image (type-1 tokens with type-1 neighbours on both
    sides) share one position. Padding positions are 0.
    """
    vision = token_type_ids == VISION_TOKEN_TYPE
    patch = torch.zeros_like(vision)
    patch[:, 1:-1] = vision[:, :-2] & vision[:, 1:-1] & vision[:, 2:]
    step = torch.ones_like(vision)
    step[:, 1:] = ~(patch[:, 1:] & patch[:, :-1])
    real = None if attention_mask is None else attention_mask[:, -token_type_ids.shape[1]:].bool()
    if real is not None:
        step = step & real
    positions = step.long().cumsum(-1) - 1
    return positions.clamp(min=0)


def image_to_tensor(image: Union[Image.Image, torch.Tensor], image_size: int) -> torch.Tensor:
    """PIL image -> (3, S, S) float32: RGB, bicubic resize to S x S, [0, 1], CLIP mean/std normalisation.

    A tensor is taken as already processed and must be (3, S, S).
    """
    if isinstance(image, torch.Tensor):
        if tuple(image.shape) != (3, image_size, image_size):
            raise ValueError(f"an image tensor must be (3, {image_size}, {image_size}), got {tuple(image.shape)}")
        return image
    if not isinstance(image, Image.Image):
        raise ValueError(f"images must be PIL images or (3, S, S) tensors, got {type(image).__name__}")
    pixels = np.asarray(image.convert("RGB").resize((image_size, image_size), Image.BICUBIC))
    pixels = (pixels.astype(np.float32) / 255.0 - np.asarray(CLIP_MEAN, dtype=np.float32)) \
        / np.asarray(CLIP_STD, dtype=np.float32)
    return torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)))


def build_conversation_input_ids(tokenizer, *, query: str, history: Optional[History] = None,
                                 images: Optional[List] = None, template_version: str = DEFAULT_TEMPLATE,
                                 image_size: int = 490, patch_size: int = 14) -> Dict:
    """One conversation -> {'input_ids', 'token_type_ids', 'attention_mask'} (each (L,) long) and
    'images' ([one (3, S, S) float32 tensor], or None without an image)."""
    if images is not None and len(images) > 1:
        raise ValueError(f"CogVLM takes one image per conversation, got {len(images)}")
    text_ids = tokenizer.encode(history_to_prompt(template_version, query, history), add_special_tokens=False)
    input_ids, token_type_ids, pixel_values = [tokenizer.bos_token_id], [LANGUAGE_TOKEN_TYPE], None
    if images:
        image_tokens = (image_size // patch_size) ** 2 + 2  # boi + patches + eoi
        input_ids += [IMAGE_PLACEHOLDER_ID] * image_tokens
        token_type_ids += [VISION_TOKEN_TYPE] * image_tokens
        pixel_values = [image_to_tensor(images[0], image_size)]
    input_ids += text_ids
    token_type_ids += [LANGUAGE_TOKEN_TYPE] * len(text_ids)
    return {
        "input_ids": torch.tensor(input_ids, dtype=torch.long),
        "token_type_ids": torch.tensor(token_type_ids, dtype=torch.long),
        "attention_mask": torch.ones(len(input_ids), dtype=torch.long),
        "images": pixel_values,
    }


def _aligned(values, count: int, what: str) -> list:
    """None -> [None] * count; otherwise a list with one entry per text."""
    if values is None:
        return [None] * count
    if not isinstance(values, (list, tuple)) or len(values) != count:
        raise ValueError(f"give one {what} per text ({count} texts) as a list, None where there is none")
    return list(values)


class CogVLMProcessor:
    """Tokenizer + image transform, called HF-style:

        processor(images=image, text="What is in the image?", return_tensors="pt")
        processor(images=[image, None], text=["Describe it.", "Hello"], history=[[], [("Hi", "Hello!")]])

    `text` is the query of each conversation; the template (`template_version`, default the model's)
    turns it into the prompt. A batch is left-padded. Returns a BatchFeature with `input_ids`,
    `token_type_ids`, `attention_mask` (B, L) and, when any text has an image, `images`
    (N, 3, S, S) for the N texts that have one, in batch order; it goes to `model.generate(**inputs)`.
    Other HF keywords (`padding=`, ...) are accepted and have no effect: batches are always left-padded.
    """

    def __init__(self, tokenizer, image_size: int = 490, patch_size: int = 14,
                 template_version: str = DEFAULT_TEMPLATE):
        history_to_prompt(template_version, "")  # validates the name
        self.tokenizer = tokenizer
        self.image_size = image_size
        self.patch_size = patch_size
        self.template_version = template_version

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str, **kwargs) -> "CogVLMProcessor":
        """From a converted checkpoint (config.json + tokenizer files) or a saved processor directory."""
        kwargs.pop("trust_remote_code", None)
        path = str(pretrained_model_name_or_path)
        if os.path.isfile(os.path.join(path, PROCESSOR_CONFIG)):
            with open(os.path.join(path, PROCESSOR_CONFIG)) as f:
                saved = json.load(f)
            settings = {key: saved[key] for key in ("image_size", "patch_size", "template_version")}
        else:
            config, _ = PretrainedConfig.get_config_dict(path, **kwargs)
            vision = config.get("vision_config", {})
            settings = {"image_size": vision.get("image_size", 490), "patch_size": vision.get("patch_size", 14),
                        "template_version": config.get("template_version", DEFAULT_TEMPLATE)}
        return cls(AutoTokenizer.from_pretrained(path, **kwargs), **settings)

    @classmethod
    def register_for_auto_class(cls, auto_class: str = "AutoProcessor") -> None:
        """What AutoProcessor calls on a remote-code processor class."""
        cls._auto_class = auto_class

    def save_pretrained(self, save_directory: str) -> None:
        """Tokenizer, settings and this file: AutoProcessor reloads it alone (trust_remote_code)."""
        os.makedirs(save_directory, exist_ok=True)
        self.tokenizer.save_pretrained(save_directory)
        here = os.path.abspath(__file__)
        if os.path.dirname(here) != os.path.abspath(save_directory):
            shutil.copy(here, os.path.join(save_directory, os.path.basename(here)))
        with open(os.path.join(save_directory, PROCESSOR_CONFIG), "w") as f:
            json.dump({"processor_class": type(self).__name__,
                       "auto_map": {"AutoProcessor": f"{os.path.splitext(os.path.basename(here))[0]}."
                                                     f"{type(self).__name__}"},
                       "image_size": self.image_size, "patch_size": self.patch_size,
                       "template_version": self.template_version}, f, indent=2)

    def __call__(self, images=None, text: Union[str, List[str], None] = None, history=None,
                 template_version: Optional[str] = None, return_tensors: str = "pt", **unused) -> BatchFeature:
        if text is None:
            raise ValueError("give text= (the query; use '' for an image alone)")
        if return_tensors != "pt":
            raise ValueError(f"return_tensors={return_tensors!r} is not supported; use 'pt'")
        if isinstance(text, str):  # one conversation: an image (or [image]) and its history
            texts, histories = [text], [history]
            if isinstance(images, (list, tuple)):
                if len(images) > 1:
                    raise ValueError(f"CogVLM takes one image per conversation, got {len(images)}")
                images = images[0] if images else None
            images = [images]
        else:
            texts = list(text)
            images, histories = _aligned(images, len(texts), "image"), _aligned(history, len(texts), "history")
        samples = [build_conversation_input_ids(
            self.tokenizer, query=query, history=turns, images=None if image is None else [image],
            template_version=template_version or self.template_version, image_size=self.image_size,
            patch_size=self.patch_size) for query, image, turns in zip(texts, images, histories)]
        length = max(len(sample["input_ids"]) for sample in samples)
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else IMAGE_PLACEHOLDER_ID
        data = {}
        for key, fill in (("input_ids", pad_id), ("token_type_ids", LANGUAGE_TOKEN_TYPE), ("attention_mask", 0)):
            data[key] = torch.stack([torch.cat([torch.full((length - len(s[key]),), fill, dtype=torch.long), s[key]])
                                     for s in samples])
        pixel_values = [s["images"][0] for s in samples if s["images"]]
        if pixel_values:
            data["images"] = torch.stack(pixel_values)
        return BatchFeature(data)

    def batch_decode(self, *args, **kwargs):
        return self.tokenizer.batch_decode(*args, **kwargs)

    def decode(self, *args, **kwargs):
        return self.tokenizer.decode(*args, **kwargs)


__all__ = ["CogVLMProcessor", "build_conversation_input_ids", "cogvlm_position_ids", "history_to_prompt",
           "image_to_tensor"]
