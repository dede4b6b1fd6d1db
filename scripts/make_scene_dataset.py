"""Render synthetic scenes of coloured shapes with questions about them, as a JSONL finetuning set.

    python scripts/make_scene_dataset.py --out scenes --count 2000 --seed 0

writes `scenes/images/000000.png ...` and `scenes/data.jsonl`, one record per image:

    {"image": "images/000000.png", "type": "colour",
     "conversations": [{"role": "user", "content": "What colour is the circle?"},
                       {"role": "assistant", "content": "red"}]}

A scene is SIZE x SIZE pixels on a light background with 1-4 shapes (kinds: KINDS, colours:
COLOURS, sizes MIN_SIDE..MAX_SIDE px), each in its own cell of a GRID x GRID grid at a random place
inside it; no two shapes share both kind and colour, so "the red circle" always names one shape.
The scenes are kept simple enough for a 1.3M-parameter model trained from scratch in minutes on a
CPU: few kinds and colours, far apart, and shapes a few ViT patches wide. Question types (the record's
`type` is the type of its last question): colour of a shape, shape of a colour, counting, yes/no
existence, left/right relation, grounding (`Where is the red circle?` -> `[[x0,y0,x1,y1]]`, the
shape's pixel box x1000 / SIZE, 000-999) and a short grounded caption listing the shapes left to
right (by grid column, then top to bottom). Records have 1..--max_turns questions. Seeded: the same arguments give the same files, byte
for byte.
"""
import argparse
import json
import math
import os
import random
import sys
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

from PIL import Image, ImageDraw
from tqdm import tqdm

SIZE = 111
# cells per side, each SIZE / GRID = 37 px: one ViT patch of the scene model (scripts/tiny_scenes), so a
# shape lies whole in one patch and its kind and colour are one token's content
GRID = 3
MIN_SIDE, MAX_SIDE = 28, 35
COLOURS: Dict[str, Tuple[int, int, int]] = {
    "red": (215, 40, 40), "green": (40, 160, 60), "blue": (40, 80, 215), "yellow": (230, 200, 30)}
KINDS = ("circle", "square", "triangle")
COLOUR_JITTER = 14
# relative weight of each question type, and how many records end with it
TYPE_WEIGHTS = {"colour": 1.0, "shape": 1.0, "count": 1.0, "exist": 1.0, "relation": 1.0, "grounding": 1.5,
                "caption": 0.5}
# px between two centres for a left/right question: shapes in one grid column (at most 9 px apart) are
# never compared, shapes in neighbouring columns (at least 28 px apart) always are
MIN_RELATION_GAP = 16


@dataclass(frozen=True)
class Shape:
    kind: str
    colour: str
    box: Tuple[int, int, int, int]  # pixels: left, top, right, bottom (exclusive)

    @property
    def name(self) -> str:
        return f"{self.colour} {self.kind}"

    @property
    def centre_x(self) -> float:
        return (self.box[0] + self.box[2]) / 2

    @property
    def reading_order(self) -> Tuple[int, int]:
        """(grid column, top): left to right, and top to bottom within a column (no order by a few px)."""
        return int(self.centre_x * GRID // SIZE), self.box[1]


def relative_box(box: Tuple[int, int, int, int], size: int = SIZE) -> str:
    """Pixel box -> `[[x0,y0,x1,y1]]` in 000-999 (x1000 / size), as grounding models write it."""
    values = [min(999, v * 1000 // size) for v in box]
    return "[[" + ",".join(f"{v:03d}" for v in values) + "]]"


def _outline(kind: str, left: int, top: int, side: int) -> List[Tuple[float, float]]:
    """Polygon of a triangle or star in the square (left, top, side); circle/square use PIL primitives."""
    if kind == "triangle":
        return [(left + (side - 1) / 2, top), (left + side - 1, top + side - 1), (left, top + side - 1)]
    cx, cy, outer = left + (side - 1) / 2, top + (side - 1) / 2, (side - 1) / 2
    points = []
    for i in range(10):
        radius = outer if i % 2 == 0 else outer * 0.45
        angle = -math.pi / 2 + i * math.pi / 5
        points.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
    return points


def _draw(draw: ImageDraw.ImageDraw, kind: str, left: int, top: int, side: int, fill) -> None:
    if kind == "circle":
        draw.ellipse((left, top, left + side - 1, top + side - 1), fill=fill)
    elif kind == "square":
        draw.rectangle((left, top, left + side - 1, top + side - 1), fill=fill)
    else:
        draw.polygon(_outline(kind, left, top, side), fill=fill)


def render_scene(rng: random.Random) -> Tuple[Image.Image, List[Shape]]:
    """One scene: the image and its shapes, each with the tight box of its drawn pixels."""
    background = tuple(rng.randint(228, 255) for _ in range(3))
    image = Image.new("RGB", (SIZE, SIZE), background)
    draw = ImageDraw.Draw(image)
    wanted = rng.randint(1, 4)
    pairs = rng.sample([(k, c) for k in KINDS for c in COLOURS], wanted)
    cells = rng.sample(range(GRID * GRID), wanted)
    shapes: List[Shape] = []
    for (kind, colour), cell in zip(pairs, cells):
        x0, x1 = (cell % GRID) * SIZE // GRID, (cell % GRID + 1) * SIZE // GRID
        y0, y1 = (cell // GRID) * SIZE // GRID, (cell // GRID + 1) * SIZE // GRID
        side = rng.randint(MIN_SIDE, MAX_SIDE)
        left, top = rng.randint(x0, x1 - side), rng.randint(y0, y1 - side)
        mask = Image.new("L", (SIZE, SIZE), 0)
        _draw(ImageDraw.Draw(mask), kind, left, top, side, 255)
        fill = tuple(max(0, min(255, v + rng.randint(-COLOUR_JITTER, COLOUR_JITTER))) for v in COLOURS[colour])
        _draw(draw, kind, left, top, side, fill)
        shapes.append(Shape(kind, colour, mask.getbbox()))
    return image, shapes


def _count_answer(n: int) -> str:
    return str(n)


def questions_of_type(kind: str, shapes: Sequence[Shape], rng: random.Random) -> Optional[Tuple[str, str]]:
    """A (question, answer) pair of question type `kind` about `shapes`, or None if the scene has none."""
    by_kind = {k: [s for s in shapes if s.kind == k] for k in KINDS}
    by_colour = {c: [s for s in shapes if s.colour == c] for c in COLOURS}
    if kind == "colour":
        unique = [s for s in shapes if len(by_kind[s.kind]) == 1]
        if not unique:
            return None
        shape = rng.choice(unique)
        question = rng.choice(["What colour is the {}?", "What is the colour of the {}?"]).format(shape.kind)
        return question, shape.colour
    if kind == "shape":
        unique = [s for s in shapes if len(by_colour[s.colour]) == 1]
        if not unique:
            return None
        shape = rng.choice(unique)
        question = rng.choice(["What shape is the {} one?", "Which shape is {}?"]).format(shape.colour)
        return question, shape.kind
    if kind == "count":
        subject = rng.choice(["all", "kind", "colour"])
        if subject == "all":
            return rng.choice(["How many shapes are there?", "How many objects are in the image?"]), \
                _count_answer(len(shapes))
        if subject == "kind":
            counted = rng.choice(KINDS)
            return f"How many {counted}s are there?", _count_answer(len(by_kind[counted]))
        counted = rng.choice(list(COLOURS))
        return f"How many {counted} shapes are there?", _count_answer(len(by_colour[counted]))
    if kind == "exist":
        if rng.random() < 0.5:
            name, answer = rng.choice(shapes).name, "yes"
        else:  # a near miss: the colour or the kind of a shape that is there
            present = {(s.kind, s.colour) for s in shapes}
            model = rng.choice(shapes)
            misses = [(k, model.colour) for k in KINDS] + [(model.kind, c) for c in COLOURS]
            misses = [m for m in misses if m not in present]
            kind_, colour = rng.choice(misses)
            name, answer = f"{colour} {kind_}", "no"
        return rng.choice(["Is there a {}?", "Is there a {} in the image?"]).format(name), answer
    if kind == "relation":
        pairs = [(a, b) for a in shapes for b in shapes
                 if a is not b and abs(a.centre_x - b.centre_x) >= MIN_RELATION_GAP]
        if not pairs:
            return None
        a, b = rng.choice(pairs)
        side = rng.choice(["left", "right"])
        truth = a.centre_x < b.centre_x if side == "left" else a.centre_x > b.centre_x
        return f"Is the {a.name} to the {side} of the {b.name}?", "yes" if truth else "no"
    if kind == "grounding":
        shape = rng.choice(shapes)
        question = rng.choice(["Where is the {}?", "Find the {}."]).format(shape.name)
        return question, relative_box(shape.box)
    if kind == "caption":
        ordered = sorted(shapes, key=lambda s: s.reading_order)
        parts = [f"a {s.name} {relative_box(s.box)}" for s in ordered]
        text = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
        return rng.choice(["Describe the image.", "What is in the image?"]), text
    raise ValueError(f"unknown question type {kind}")


def conversation(shapes: Sequence[Shape], turns: int, rng: random.Random,
                 max_chars: Optional[int] = None) -> Tuple[List[Dict[str, str]], str]:
    """Up to `turns` questions (no question twice) with their answers, and the type of the last one.
    With `max_chars`, turns stop before questions and answers together would pass that many characters."""
    messages, asked, last_type, chars = [], set(), None, 0
    types, weights = list(TYPE_WEIGHTS), list(TYPE_WEIGHTS.values())
    while len(messages) < 2 * turns:
        for _ in range(20):
            kind = rng.choices(types, weights)[0]
            pair = questions_of_type(kind, shapes, rng)
            fits = pair is not None and (not messages or max_chars is None or chars + len(pair[0]) + len(pair[1])
                                         <= max_chars)
            if fits and pair[0] not in asked:
                break
        else:
            break
        asked.add(pair[0])
        chars += len(pair[0]) + len(pair[1])
        messages += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
        last_type = kind
    return messages, last_type


def make_scene_dataset(out_dir: str, count: int, seed: int, max_turns: int = 3, min_turns: int = 1,
                       max_chars: Optional[int] = None, progress: bool = True) -> str:
    """Write `count` scenes to out_dir/images and their records to out_dir/data.jsonl; returns its path.
    Each record has min_turns..max_turns questions (fewer when `max_chars` of text are reached)."""
    rng = random.Random(seed)
    os.makedirs(os.path.join(out_dir, "images"), exist_ok=True)
    path = os.path.join(out_dir, "data.jsonl")
    with open(path, "w") as jsonl:
        for index in tqdm(range(count), desc="rendering scenes", unit="img", disable=not progress):
            image, shapes = render_scene(rng)
            messages, last_type = conversation(shapes, rng.randint(min_turns, max_turns), rng, max_chars)
            name = f"images/{index:06d}.png"
            image.save(os.path.join(out_dir, name), optimize=False, compress_level=6)
            jsonl.write(json.dumps({"image": name, "conversations": messages, "type": last_type}) + "\n")
    return path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="output folder (images/ and data.jsonl)")
    parser.add_argument("--count", type=int, default=1000, help="number of scenes (one record each)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max_turns", type=int, default=3, help="questions per record: min_turns..max_turns")
    parser.add_argument("--min_turns", type=int, default=1)
    parser.add_argument("--max_chars", type=int, default=None,
                        help="stop adding questions before a record's text passes this many characters "
                             "(training sets of similar lengths: little padding in a batch)")
    args = parser.parse_args(argv)
    if args.count < 1 or not 1 <= args.min_turns <= args.max_turns:
        print("error: --count must be at least 1 and 1 <= --min_turns <= --max_turns", file=sys.stderr)
        return 1
    path = make_scene_dataset(args.out, args.count, args.seed, args.max_turns, args.min_turns, args.max_chars)
    print(f"wrote {args.count} scenes to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
