"""Render synthetic captchas: `<label>.png` files whose file name is the text they show.

    python scripts/make_captcha_dataset.py --out archive --count 2000 --style clean --seed 0

Styles (4-6 characters of [a-z0-9], 160x60 RGB):
  clean    several sans fonts, dark text on a light background, one slot per character, small jitter, light noise
  shifted  the LoRA demo's new domain: serif fonts, coloured text and backgrounds, mild rotation, a thin line
  hard     packed glyphs, strong per-character rotation, a wave warp, crossing lines, speckle and blur

Fonts come from pip packages (font-source-sans-pro, font-hanken-grotesk, font-source-serif-pro,
font-caladea), so every machine renders the same images for the same seed.
"""
import argparse
import logging
import math
import os
import random
import string
import sys
from typing import List

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

logger = logging.getLogger(__name__)

CHARSET = string.ascii_lowercase + string.digits
STYLES = ("clean", "shifted", "hard")
WIDTH, HEIGHT = 160, 60
MARGIN = 5


def _font_files(style: str) -> List[str]:
    if style == "shifted":
        import font_caladea
        import font_source_serif_pro

        serif = font_source_serif_pro.font_files_ttf
        return [serif["SourceSerifPro"], serif["SourceSerifProSemibold"],
                font_caladea.font_files["Caladea"], font_caladea.font_files["CaladeaBold"]]
    import font_hanken_grotesk
    import font_source_sans_pro

    sans = font_source_sans_pro.font_files_ttf
    grotesk = font_hanken_grotesk.font_files_otf
    return [sans["SourceSansPro"], sans["SourceSansProSemibold"], sans["SourceSansProBold"],
            grotesk["HankenGrotesk"], grotesk["HankenGroteskMedium"], grotesk["HankenGroteskBold"]]


_FONT_CACHE = {}


def _font(path: str, size: int) -> ImageFont.FreeTypeFont:
    key = (path, size)
    if key not in _FONT_CACHE:
        _FONT_CACHE[key] = ImageFont.truetype(path, size)
    return _FONT_CACHE[key]


def random_label(rng: random.Random, min_len: int = 4, max_len: int = 6) -> str:
    return "".join(rng.choice(CHARSET) for _ in range(rng.randint(min_len, max_len)))


def _glyph(char: str, font: ImageFont.FreeTypeFont, colour, angle: float) -> Image.Image:
    """One character on a transparent tile, rotated by `angle` degrees."""
    left, top, right, bottom = font.getbbox(char)
    tile = Image.new("RGBA", (right - left + 4, bottom - top + 4), (0, 0, 0, 0))
    ImageDraw.Draw(tile).text((2 - left, 2 - top), char, font=font, fill=colour)
    return tile.rotate(angle, resample=Image.BICUBIC, expand=True) if angle else tile


def render_captcha(label: str, style: str = "clean", rng: random.Random = None) -> Image.Image:
    """Draw `label` in `style`; the same rng state gives the same image. Returns a 160x60 RGB image."""
    if style not in STYLES:
        raise ValueError(f"unknown captcha style '{style}'; choose one of {', '.join(STYLES)}")
    rng = rng or random.Random()
    fonts = _font_files(style)
    font = _font(rng.choice(fonts), rng.randint(30, 36) if style != "hard" else rng.randint(28, 38))
    if style == "clean":
        background = tuple(rng.randint(225, 255) for _ in range(3))
        ink = lambda: tuple(rng.randint(0, 70) for _ in range(3))  # noqa: E731
        max_angle, jitter = 4, 3
    elif style == "shifted":
        background = tuple(rng.randint(150, 255) for _ in range(3))
        ink = lambda: tuple(rng.randint(0, 110) for _ in range(3))  # noqa: E731
        max_angle, jitter = 12, 4
    else:
        background = tuple(rng.randint(170, 255) for _ in range(3))
        ink = lambda: tuple(rng.randint(0, 140) for _ in range(3))  # noqa: E731
        max_angle, jitter = 35, 6

    glyphs = [_glyph(c, font, ink() + (255,), rng.uniform(-max_angle, max_angle)) for c in label]
    gap = rng.randint(-2, 3) if style != "hard" else rng.randint(-5, 2)
    total = sum(g.width for g in glyphs) + gap * (len(glyphs) - 1)
    scale = min(1.0, (WIDTH - 8) / total)  # long labels in wide fonts are squeezed to fit
    if scale < 1.0:
        glyphs = [g.resize((max(1, int(g.width * scale)), g.height), Image.BICUBIC) for g in glyphs]
        total = sum(g.width for g in glyphs) + gap * (len(glyphs) - 1)
    image = Image.new("RGB", (WIDTH, HEIGHT), background)
    if style == "hard":  # glyphs packed and centred: where a character sits depends on the others
        x = max(2, (WIDTH - total) // 2 + rng.randint(-jitter, jitter))
        for g in glyphs:
            image.paste(g, (x, (HEIGHT - g.height) // 2 + rng.randint(-jitter, jitter)), g)
            x += g.width + gap
    else:  # one slot per character from the left, as many real captchas: position i holds character i
        slot = (WIDTH - 2 * MARGIN) // 6
        for i, g in enumerate(glyphs):
            if g.width > slot:
                g = g.resize((slot, g.height), Image.BICUBIC)
            x = MARGIN + i * slot + (slot - g.width) // 2 + rng.randint(-jitter, jitter)
            image.paste(g, (x, (HEIGHT - g.height) // 2 + rng.randint(-jitter, jitter)), g)

    draw = ImageDraw.Draw(image)
    if style == "shifted":
        draw.line([(0, rng.randint(10, HEIGHT - 10)), (WIDTH, rng.randint(10, HEIGHT - 10))], fill=ink(), width=1)
    if style == "hard":
        image = _wave(image, rng.uniform(2, 4), rng.uniform(0.04, 0.09), rng.uniform(0, 2 * math.pi), background)
        draw = ImageDraw.Draw(image)
        for _ in range(rng.randint(2, 4)):
            draw.line([(rng.randint(0, 40), rng.randint(0, HEIGHT)), (rng.randint(120, WIDTH), rng.randint(0, HEIGHT))],
                      fill=ink(), width=rng.randint(1, 3))
    pixels = np.asarray(image, dtype=np.float32)
    np_rng = np.random.default_rng(rng.getrandbits(32))
    noise = {"clean": 6.0, "shifted": 8.0, "hard": 14.0}[style]
    pixels = pixels + np_rng.normal(0, noise, pixels.shape)
    if style == "hard":
        speckle = np_rng.random(pixels.shape[:2]) < 0.04
        pixels[speckle] = np_rng.integers(0, 256, (int(speckle.sum()), 1))
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    if style == "hard":
        image = image.filter(ImageFilter.GaussianBlur(rng.uniform(0.5, 1.2)))
    return image


def _wave(image: Image.Image, amplitude: float, frequency: float, phase: float, fill) -> Image.Image:
    """Shift each column vertically by a sine of its x (a cheap non-affine warp)."""
    out = Image.new("RGB", image.size, fill)
    for x in range(image.width):
        dy = int(round(amplitude * math.sin(frequency * x * 2 * math.pi / 3 + phase)))
        out.paste(image.crop((x, 0, x + 1, image.height)), (x, dy))
    return out


def make_dataset(out_dir: str, count: int, style: str = "clean", seed: int = 0, min_len: int = 4,
                 max_len: int = 6, on_image=None) -> List[str]:
    """Write `count` captchas with distinct labels to `out_dir`; returns their paths in creation order.

    The (style, seed) pair fixes the images. `on_image(path)` is called after each one (progress).
    """
    os.makedirs(out_dir, exist_ok=True)
    rng = random.Random(f"{style}-{seed}")
    existing = {os.path.splitext(n)[0] for n in os.listdir(out_dir)}
    paths = []
    while len(paths) < count:
        label = random_label(rng, min_len, max_len)
        if label in existing:  # the file name is the label, so labels must be unique in a folder
            continue
        existing.add(label)
        path = os.path.join(out_dir, label + ".png")
        render_captcha(label, style, rng).save(path)
        paths.append(path)
        if on_image is not None:
            on_image(path)
    return paths


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="output folder (created; existing labels are not reused)")
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--style", choices=STYLES, default="clean")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--min_len", type=int, default=4)
    parser.add_argument("--max_len", type=int, default=6)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.count < 0 or not 1 <= args.min_len <= args.max_len:
        print("error: --count must be >= 0 and 1 <= --min_len <= --max_len", file=sys.stderr)
        return 1
    from tqdm import tqdm

    with tqdm(total=args.count, desc=f"rendering {args.style} captchas", unit="img") as bar:
        paths = make_dataset(args.out, args.count, args.style, args.seed, args.min_len, args.max_len,
                             on_image=lambda _: bar.update(1))
    logger.info("wrote %d %s captchas to %s", len(paths), args.style, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
