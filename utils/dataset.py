"""Finetuning data: captcha images labelled by their file name, the training text processor, the
collate function, and exact-match scoring shared by training-time evaluation and evaluate_demo.py.

A training sample (image_length = L patches, answer of n tokens):

    [bos] [boi] [patch x L] [eoi] CAPTCHA:  answer_1 .. answer_n  [eos]
    labels: -100 on everything up to and including "CAPTCHA:", then the answer ids and eos

so the loss is the next-token cross-entropy of the answer only. Prompt, masks and positions come
from `llama2_text_processor_inference` (the same layout the chat core feeds at inference time).
"""
import logging
import os
from typing import Dict, List, Sequence

import torch
from PIL import Image

from models.errors import CogVLMError
from utils.language import history_to_prompt, llama2_text_processor_inference

logger = logging.getLogger(__name__)

CAPTCHA_QUERY = "CAPTCHA:"
IGNORE_INDEX = -100
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


class llama2_text_processor(llama2_text_processor_inference):  # noqa: N801 (upstream name)
    """(answer, query) -> one training sample, tensors of shape (L,) (masks, positions, labels).

    The prompt is the `--version` template of `query` with the image first; the answer follows it,
    then eos. Returns None when the sample does not fit in `max_target_length`.
    """

    def __call__(self, answer: str, query: str = CAPTCHA_QUERY):
        prompt_inputs = super().__call__(history_to_prompt(self.signal_type, query, with_image=True))
        answer_ids = self.encode(answer) + [self.tokenizer.eos_token_id]
        prompt_length = prompt_inputs["input_ids"].shape[1]
        if prompt_length + len(answer_ids) > self.max_target_length:
            return None
        n = len(answer_ids)
        zeros = torch.zeros(n, dtype=torch.long)
        sample = {
            "input_ids": torch.cat([prompt_inputs["input_ids"][0], torch.tensor(answer_ids)]),
            "labels": torch.cat([torch.full((prompt_length,), IGNORE_INDEX), torch.tensor(answer_ids)]),
            "position_ids": torch.cat([prompt_inputs["position_ids"][0],
                                       prompt_inputs["position_ids"][0, -1] + torch.arange(1, n + 1)]),
        }
        for mask in ("image_embed_mask", "vision_expert_mask", "image_rope_mask"):
            sample[mask] = torch.cat([prompt_inputs[mask][0], zeros])
        sample["context_length"] = torch.tensor(prompt_length)
        return sample


def find_images(data_dir: str) -> List[str]:
    """All image files under `data_dir` (recursively), sorted."""
    if not os.path.isdir(data_dir):
        raise CogVLMError(f"data folder '{data_dir}' does not exist; run scripts/split_dataset.py (or "
                          "scripts/make_captcha_dataset.py) first, or pass the right --train-data/--valid-data")
    found = []
    for root, _, names in os.walk(data_dir):
        found.extend(os.path.join(root, n) for n in names if n.lower().endswith(IMAGE_SUFFIXES))
    if not found:
        raise CogVLMError(f"no images ({', '.join(IMAGE_SUFFIXES)}) found in '{data_dir}'")
    return sorted(found)


def label_of(path: str) -> str:
    """The captcha text of an image: its file name without the extension (`3bnyf.png` -> `3bnyf`)."""
    return os.path.splitext(os.path.basename(path))[0]


class CaptchaDataset(torch.utils.data.Dataset):
    """Images in a folder whose file name is the label, as training samples.

    An unreadable or corrupt image is skipped with a warning (the next readable file stands in
    for it), so one bad file never stops an epoch. With `cache=True` every sample is decoded once
    and kept in memory (the resized image as uint8: 3*S*S bytes each), which makes later epochs
    cost no data time; it pays off when the model step is as cheap as the decoding (tiny models)
    and the data loader runs in the training process (`--num-workers 0`).
    """

    def __init__(self, data_dir: str, image_processor, text_processor: llama2_text_processor,
                 query: str = CAPTCHA_QUERY, cache: bool = False):
        self.files = find_images(data_dir)
        self.image_processor = image_processor
        self.text_processor = text_processor
        self.query = query
        self._warned = set()
        self._cache = {} if cache else None
        logger.info("found %d images in %s", len(self.files), data_dir)

    def __len__(self) -> int:
        return len(self.files)

    def _warn_once(self, path: str, reason: str):
        if path not in self._warned:
            self._warned.add(path)
            logger.warning("skipping %s: %s", path, reason)

    def load(self, index: int):
        """The sample of file `index`, or None (with a warning) if it cannot be used."""
        if self._cache is None:
            return self._decode(index, self.image_processor.to_tensor)
        if index not in self._cache:
            self._cache[index] = self._decode(index, self.image_processor.resize)
        cached = self._cache[index]
        if cached is None:
            return None
        return {**cached, "image": self.image_processor.normalize(cached["image"])}

    def _decode(self, index: int, image_fn):
        path = self.files[index]
        try:
            with Image.open(path) as image:
                image = image.convert("RGB")
        except Exception as e:  # PIL raises many types for truncated/corrupt files
            self._warn_once(path, f"not a readable image ({type(e).__name__})")
            return None
        sample = self.text_processor(label_of(path), self.query)
        if sample is None:
            self._warn_once(path, "label too long for --max_length")
            return None
        sample["image"] = image_fn(image)
        return sample

    def __getitem__(self, index: int) -> Dict[str, torch.Tensor]:
        for offset in range(len(self.files)):
            sample = self.load((index + offset) % len(self.files))
            if sample is not None:
                return sample
        raise CogVLMError("no usable image in the dataset: every file was unreadable or its label too long")


def collate_captchas(samples: Sequence[Dict[str, torch.Tensor]], pad_token_id: int = 0) -> Dict[str, torch.Tensor]:
    """Stack samples into a batch, right-padding to the longest one.

    Returns (B, L) input_ids / labels / position_ids / masks, context_length (B,), a shared causal
    attention_mask (1, 1, L, L) (padding sits after every real token, so it is never attended to by
    them, and its labels are -100), and vision_image (B, 3, S, S).
    """
    length = max(s["input_ids"].shape[0] for s in samples)
    pad_values = {"input_ids": pad_token_id, "labels": IGNORE_INDEX, "image_embed_mask": 0,
                  "vision_expert_mask": 0, "image_rope_mask": 0}
    batch = {}
    for key, pad in pad_values.items():
        batch[key] = torch.stack([torch.nn.functional.pad(s[key], (0, length - s[key].shape[0]), value=pad)
                                  for s in samples])
    # padded positions keep counting, like generated tokens would
    batch["position_ids"] = torch.stack([
        torch.cat([s["position_ids"], s["position_ids"][-1] + torch.arange(1, length - s["position_ids"].shape[0] + 1)])
        for s in samples])
    batch["context_length"] = torch.stack([s["context_length"] for s in samples])
    batch["attention_mask"] = torch.ones(1, 1, length, length).tril()
    batch["vision_image"] = torch.stack([s["image"] for s in samples])
    return batch


def exact_match(predictions: Sequence[str], labels: Sequence[str]) -> Dict[str, float]:
    """Exact-match accuracy, case-sensitive ('acc') and not ('acc_w/o_case'), as upstream reports it."""
    if not labels:
        return {"acc": 0.0, "acc_w/o_case": 0.0}
    pairs = list(zip(predictions, labels))
    return {"acc": sum(p == t for p, t in pairs) / len(pairs),
            "acc_w/o_case": sum(p.lower() == t.lower() for p, t in pairs) / len(pairs)}


@torch.no_grad()
def read_captcha(model, text_processor, image: torch.Tensor, query: str = CAPTCHA_QUERY,
                 max_new_tokens: int = 16) -> str:
    """Greedy answer of the chat core for one image tensor (3, S, S) (already processed)."""
    from utils.chat import GenerationConfig, generate_stream, vision_inputs_from

    inputs = text_processor(history_to_prompt(text_processor.signal_type, query, with_image=True))
    config = GenerationConfig(max_length=inputs["input_ids"].shape[1] + max_new_tokens, top_k=1)
    eos = text_processor.tokenizer.eos_token_id
    ids = [t for t in generate_stream(model, inputs, config, vision_inputs_from({"image": image[None]}, model), [eos])
           if t != eos]
    return text_processor.process_response(text_processor.tokenizer.decode(ids, skip_special_tokens=True))
