"""Finetuning data: conversations -> training samples, the two data sources (a folder of captchas
named by their label, a JSONL file of conversations about images), and the collate function.

A training sample of a conversation (image_length = L patches, `--version chat`):

    [bos] [boi] [patch x L] [eoi] Question: q1 Answer: a1 \\n Question: q2 Answer: a2 [eos]
    labels: -100 everywhere except on a1, a2 and the token after each answer, whose label is eos

The input is exactly what the chat core feeds when it answers the last question with the earlier
turns as history (`llama2_text_processor_inference` lays out prompt, masks and positions), so every
assistant turn trains in one sequence and the loss covers assistant tokens only. At the end of an
earlier answer the input continues with the template's turn separator, but its label is eos: at
inference that turn ended there. A template that does not show history (`base`) makes one sample
per turn instead.

JSONL records (one per line; `image` relative to the JSONL file; LLaVA's `from`/`value` with
`human`/`gpt` accepted too; `<image>` in a user turn is dropped: the image always comes first):

    {"image": "images/1.png", "conversations": [{"role": "user", "content": "What colour is the circle?"},
     {"role": "assistant", "content": "red"}], "type": "colour"}
"""
import json
import logging
import os
from collections import Counter
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from PIL import Image

from models.errors import CogVLMError
from models.templates import IMAGE_MARKER, get_template, render
from utils.language import llama2_text_processor_inference

logger = logging.getLogger(__name__)

CAPTCHA_QUERY = "CAPTCHA:"
IGNORE_INDEX = -100
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
MAX_BAD_FRACTION = 0.05
ROLES = {"user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant"}
Turns = Sequence[Tuple[str, str]]


class DatasetError(CogVLMError):
    """Training or evaluation data that cannot be used."""


class SampleError(DatasetError):
    """One record that cannot become a training sample. `kind` names the problem for summaries
    ('missing image', 'wrong roles', 'empty answer', 'too long', ...); the message says more."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


class TrainingSampleBuilder:
    """Conversation turns [(query, answer), ...] -> training samples, tensors of shape (L,).

    Composes the inference text processor (same prompt layout, masks and positions as the chat
    core). `samples(turns)` returns one sample, or one per turn for a template without history;
    `builder(answer, query)` is the one-turn form (None when it does not fit `max_length`, the processor's
    `max_target_length`). Each sample's `prompt_length` counts the tokens of its last answer's prompt
    (image and earlier turns included).
    """

    def __init__(self, text_processor: llama2_text_processor_inference):
        self.text_processor = text_processor
        self.tokenizer = text_processor.tokenizer
        self.template = text_processor.template
        self.max_length = text_processor.max_target_length
        self.image_length = text_processor.image_length

    def __call__(self, answer: str, query: str = CAPTCHA_QUERY) -> Optional[Dict[str, torch.Tensor]]:
        try:
            return self.conversation([(query, answer)])
        except SampleError:
            return None

    def samples(self, turns: Turns) -> List[Dict[str, torch.Tensor]]:
        if get_template(self.template).turn is None:
            return [self.conversation([turn]) for turn in turns]
        return [self.conversation(turns)]

    def conversation(self, turns: Turns) -> Dict[str, torch.Tensor]:
        """One sequence that trains every answer of `turns`; raises SampleError if it cannot."""
        *history, (query, answer) = turns
        prompt_text = render(self.template, query, history, with_image=True)
        try:
            prompt = self.text_processor(prompt_text)
        except CogVLMError:
            raise SampleError("too long", f"the prompt does not fit --max_length {self.max_length}") from None
        answer_ids = self.text_processor.encode(answer) + [self.tokenizer.eos_token_id]
        prompt_length = prompt["input_ids"].shape[1]
        n = len(answer_ids)
        if prompt_length + n > self.max_length:
            raise SampleError("too long", f"prompt and answer ({prompt_length + n} tokens) do not fit --max_length "
                              f"{self.max_length}")
        input_ids = torch.cat([prompt["input_ids"][0], torch.tensor(answer_ids)])
        labels = torch.cat([torch.full((prompt_length,), IGNORE_INDEX), torch.tensor(answer_ids)])
        if history:
            self._label_history_answers(labels, prompt_text, prompt["input_ids"][0], history)
        zeros = torch.zeros(n, dtype=torch.long)
        sample = {"input_ids": input_ids, "labels": labels,
                  "position_ids": torch.cat([prompt["position_ids"][0],
                                             prompt["position_ids"][0, -1] + torch.arange(1, n + 1)])}
        for mask in ("image_embed_mask", "vision_expert_mask", "image_rope_mask"):
            sample[mask] = torch.cat([prompt[mask][0], zeros])
        sample["prompt_length"] = torch.tensor(prompt_length)
        return sample

    def _label_history_answers(self, labels: torch.Tensor, prompt_text: str, prompt_ids: torch.Tensor,
                               history: Turns) -> None:
        """Put the earlier answers (and eos after each) into `labels`, in place.

        Answer k spans the tokens between the inference prompt of turn k (history < k, query k) and
        the rendered text up to the end of answer k; both must tokenize as prefixes of the whole.
        """
        template = get_template(self.template)
        text = prompt_text.partition(IMAGE_MARKER)[2]
        text_ids = self.text_processor.encode(text)
        offset = prompt_ids.shape[0] - len(text_ids)  # bos + image block
        rendered = ""
        for k, (query, answer) in enumerate(history):
            turn_prompt = rendered + template.query.format(query=query)
            turn = template.turn.format(query=query, response=answer)
            answer_start = template.turn.format(query=query, response="\x00").index("\x00")
            answer_end = len(rendered) + answer_start + len(answer)
            start_ids = self.text_processor.encode(turn_prompt)
            end_ids = self.text_processor.encode(text[:answer_end])
            if text_ids[:len(start_ids)] != start_ids or text_ids[:len(end_ids)] != end_ids \
                    or len(end_ids) >= len(text_ids):
                raise SampleError("tokenization", f"answer {k + 1} does not tokenize apart from the text around it in the "
                                  f"'{self.template}' template")
            start, end = offset + len(start_ids), offset + len(end_ids)
            labels[start:end] = prompt_ids[start:end]
            labels[end] = self.tokenizer.eos_token_id
            rendered += turn


def llama2_text_processor(tokenizer, max_target_length: int = 2048, image_length: int = 256) -> TrainingSampleBuilder:
    """The upstream name: a TrainingSampleBuilder over a fresh inference text processor."""
    return TrainingSampleBuilder(llama2_text_processor_inference(tokenizer, max_target_length, image_length))


# Records ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Record:
    """One image with its conversation: `turns` [(query, answer), ...], `line` 1-based (0 for folders)."""
    image: str
    turns: Tuple[Tuple[str, str], ...]
    type: Optional[str] = None
    line: int = 0


def parse_record(obj, base_dir: str, line: int = 0) -> Record:
    """A JSONL object -> Record; raises SampleError naming what is wrong with it."""
    if not isinstance(obj, dict):
        raise SampleError("not an object", "not a JSON object")
    image = obj.get("image")
    if not isinstance(image, str) or not image:
        raise SampleError("no image path", "no 'image' path")
    path = image if os.path.isabs(image) else os.path.join(base_dir, image)
    if not os.path.isfile(path):
        raise SampleError("missing image", f"image '{image}' not found")
    messages = obj.get("conversations")
    if not isinstance(messages, list) or not messages:
        raise SampleError("no conversations", "no 'conversations' list")
    roles, contents = [], []
    for message in messages:
        if not isinstance(message, dict):
            raise SampleError("wrong roles", "a conversation entry is not an object")
        role = message.get("role", message.get("from"))
        content = message.get("content", message.get("value"))
        if role not in ROLES or not isinstance(content, str):
            raise SampleError("wrong roles", f"wrong role {role!r}: use user/assistant (or human/gpt) with a text content")
        roles.append(ROLES[role])
        contents.append(content)
    expected = ["user", "assistant"] * (len(roles) // 2)
    if roles != expected or len(roles) % 2:
        raise SampleError("wrong roles", f"wrong roles {'/'.join(roles)}: turns must alternate user, assistant, ..., assistant")
    turns = []
    for k in range(0, len(contents), 2):
        query = contents[k].replace("<image>", "").strip()
        answer = contents[k + 1].strip()
        if not answer:
            raise SampleError("empty answer", f"empty answer in turn {k // 2 + 1}")
        turns.append((query, answer))
    kind = obj.get("type")
    return Record(path, tuple(turns), kind if isinstance(kind, str) else None, line)


def read_jsonl(path: str, max_bad_fraction: float = MAX_BAD_FRACTION) -> List[Record]:
    """Every usable record of a JSONL file. A bad line is skipped with a warning naming its line
    number; when more than `max_bad_fraction` of the records are bad, DatasetError summarises them."""
    if not os.path.isfile(path):
        raise DatasetError(f"data file '{path}' does not exist; pass --train_data/--valid_data a JSONL file or a "
                           "folder of images (scripts/make_scene_dataset.py writes a JSONL example)")
    base_dir = os.path.dirname(os.path.abspath(path))
    records, bad = [], []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                records.append(parse_record(json.loads(line), base_dir, number))
            except ValueError:
                bad.append((number, "not valid JSON", "not valid JSON"))
            except SampleError as e:
                bad.append((number, e.kind, str(e)))
    check_bad_records(path, len(records), bad, max_bad_fraction)
    if not records:
        raise DatasetError(f"no records in '{path}'; each line must be a JSON object with 'image' and 'conversations'")
    return records


def check_bad_records(source: str, good: int, bad: Sequence[Tuple[int, str, str]], max_bad_fraction: float) -> None:
    """Warn about each bad record (line, kind, message); raise DatasetError when there are too many."""
    for number, _, message in bad[:20]:
        logger.warning("%s line %d skipped: %s", source, number, message)
    if len(bad) > 20:
        logger.warning("%s: %d more bad records", source, len(bad) - 20)
    total = good + len(bad)
    if total and len(bad) > max_bad_fraction * total:
        kinds = Counter(kind for _, kind, _ in bad)
        summary = ", ".join(f"{count} {kind}" for kind, count in kinds.most_common())
        raise DatasetError(f"{len(bad)} of {total} records in '{source}' are bad (more than {max_bad_fraction:.0%}): "
                           f"{summary}; first bad lines {[n for n, _, _ in bad[:5]]}; fix or remove them")


def find_images(data_dir: str) -> List[str]:
    """All image files under `data_dir` (recursively), sorted."""
    if not os.path.isdir(data_dir):
        raise DatasetError(f"data folder '{data_dir}' does not exist; run scripts/split_dataset.py (or "
                           "scripts/make_captcha_dataset.py) first, or pass the right --train_data/--valid_data")
    found = []
    for root, _, names in os.walk(data_dir):
        found.extend(os.path.join(root, n) for n in names if n.lower().endswith(IMAGE_SUFFIXES))
    if not found:
        raise DatasetError(f"no images ({', '.join(IMAGE_SUFFIXES)}) found in '{data_dir}'")
    return sorted(found)


def label_of(path: str) -> str:
    """The captcha text of an image: its file name without the extension (`3bnyf.png` -> `3bnyf`)."""
    return os.path.splitext(os.path.basename(path))[0]


def captcha_records(data_dir: str, query: str = CAPTCHA_QUERY) -> List[Record]:
    """A folder of images named by their label as one-turn records `query` -> label."""
    return [Record(path, ((query, label_of(path)),), "captcha") for path in find_images(data_dir)]


def load_records(path: str) -> List[Record]:
    """Records of a JSONL file or of a captcha folder (file name = label)."""
    return captcha_records(path) if os.path.isdir(path) else read_jsonl(path)


# Datasets ---------------------------------------------------------------------------------

class ConversationDataset(torch.utils.data.Dataset):
    """Records as training samples, each with its image tensor (3, S, S) under 'image'.

    Text samples are built when the dataset is made (a record that does not fit --max_length or
    does not tokenize is skipped with its line number). Images are read when a sample is asked for;
    an unreadable one is skipped with a warning (the next readable sample stands in), so one bad
    file never stops an epoch. With `cache=True` every image is decoded once and kept in memory
    (resized, uint8: 3*S*S bytes each): later epochs cost no data time, which pays off when the
    model step is as cheap as the decoding (tiny models) and the loader runs in the training
    process (`--num-workers 0`). Each sample carries `record_index` (its record in `records`).
    """

    def __init__(self, records: Sequence[Record], image_processor, builder: TrainingSampleBuilder,
                 cache: bool = False, source: str = "", max_bad_fraction: float = MAX_BAD_FRACTION):
        self.records = list(records)
        self.image_processor = image_processor
        self.builder = builder
        self.items: List[Tuple[int, Dict[str, torch.Tensor]]] = []
        bad = []
        for index, record in enumerate(self.records):
            try:
                self.items.extend((index, sample) for sample in builder.samples(record.turns))
            except SampleError as e:
                bad.append((record.line, e.kind, f"{os.path.basename(record.image)}: {e}"))
        check_bad_records(source, len(self.records) - len(bad), bad, max_bad_fraction)
        if not self.items:
            raise DatasetError(f"no usable sample in '{source}'")
        self._warned = set()
        self._images = {} if cache else None
        logger.info("%d samples of %d records from %s", len(self.items), len(self.records), source)

    def __len__(self) -> int:
        return len(self.items)

    def _image(self, path: str):
        """The image tensor of `path`, or None (with one warning per file) if it cannot be read."""
        if self._images is not None and path in self._images:
            cached = self._images[path]
            return None if cached is None else self.image_processor.normalize(cached)
        try:
            with Image.open(path) as image:
                image = image.convert("RGB")
        except Exception as e:  # PIL raises many types for truncated/corrupt files
            if path not in self._warned:
                self._warned.add(path)
                logger.warning("skipping %s: not a readable image (%s)", path, type(e).__name__)
            image = None
        if self._images is None:
            return None if image is None else self.image_processor.to_tensor(image)
        self._images[path] = None if image is None else self.image_processor.resize(image)
        return self._image(path)

    def load(self, index: int) -> Optional[Dict[str, torch.Tensor]]:
        """Sample `index` with its image, or None if its image cannot be read."""
        record_index, sample = self.items[index]
        image = self._image(self.records[record_index].image)
        if image is None:
            return None
        return {**sample, "image": image, "record_index": torch.tensor(record_index)}

    def __getitem__(self, index: int) -> Dict[str, torch.Tensor]:
        for offset in range(len(self.items)):
            sample = self.load((index + offset) % len(self.items))
            if sample is not None:
                return sample
        raise DatasetError("no usable image in the dataset: every image was unreadable")


class CaptchaDataset(ConversationDataset):
    """Images in a folder whose file name is the label, prompt `query` (upstream's captcha data)."""

    def __init__(self, data_dir: str, image_processor, text_processor: TrainingSampleBuilder,
                 query: str = CAPTCHA_QUERY, cache: bool = False):
        super().__init__(captcha_records(data_dir, query), image_processor, text_processor, cache=cache,
                         source=data_dir, max_bad_fraction=1.0)
        self.files = [record.image for record in self.records]


def collate_samples(samples: Sequence[Dict[str, torch.Tensor]], pad_token_id: int = 0) -> Dict[str, torch.Tensor]:
    """Stack samples into a batch, right-padding to the longest one.

    Returns (B, L) input_ids / labels / position_ids / masks, prompt_length (B,), record_index (B,)
    when the samples have it, a shared causal attention_mask (1, 1, L, L) (padding sits after every
    real token, so no real token attends to it, and its labels are -100), and images (B, 3, S, S).
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
    batch["prompt_length"] = torch.stack([s["prompt_length"] for s in samples])
    if all("record_index" in s for s in samples):
        batch["record_index"] = torch.stack([s["record_index"] for s in samples])
    batch["attention_mask"] = torch.ones(1, 1, length, length).tril()
    batch["images"] = torch.stack([s["image"] for s in samples])
    return batch

