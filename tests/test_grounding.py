"""utils/grounding.py: box parsing, phrase attachment (spaCy and fallback), drawing; the CLI's picture."""
import io
import logging
import shutil
import sys

import json

import pytest
from PIL import Image

import cli_demo
import utils.pipeline
import utils.grounding as grounding
from models.checkpoint import open_checkpoint
from models.releases import RELEASED_CHECKPOINTS
from utils.chat import ChatStream
from utils.grounding import (GroundedBox, attach_phrases, draw_boxes, ground, label_origin, object_phrase,
                             load_noun_chunker, next_output_path, parse_boxes, strip_boxes, to_pixels)

GREY = (128, 128, 128)


@pytest.fixture(scope="module")
def nlp():
    pipeline = load_noun_chunker()
    assert pipeline is not None, "en_core_web_sm is not installed: pip install -r requirements.txt"
    return pipeline


# Parsing ------------------------------------------------------------------------------------

def test_single_box_to_pixels_of_a_non_square_image():
    text = "The pear [[250,100,750,900]] is ripe."
    (mention,) = parse_boxes(text)
    assert mention.relative == (250, 100, 750, 900)
    assert text[mention.span[0]:mention.span[1]] == "[[250,100,750,900]]"
    # 400 x 200: x is a quarter .. three quarters of 400, y a tenth .. nine tenths of 200
    assert to_pixels(mention.relative, 400, 200) == (100, 20, 300, 180)


def test_multi_box_group_shares_one_phrase(nlp):
    boxes = ground("There are two dogs [[010,020,300,400;500,520,900,980]] on the grass.", (1000, 500), nlp=nlp)
    assert [b.box for b in boxes] == [(10, 10, 300, 200), (500, 260, 900, 490)]
    assert [b.phrase for b in boxes] == ["two dogs", "two dogs"]
    assert boxes[0].span == boxes[1].span


@pytest.mark.parametrize("bad", ["[[1,2,3]]", "[[1,2,3,4,5]]", "[[a,b,c,d]]", "[[-5,10,20,30]]", "[[1.5,2,3,4]]",
                                 "[[]]", "[[;]]", "[[12,34,56,78", "[12,34,56,78]", "[[12,,34,56]]"])
def test_malformed_boxes_are_skipped_and_neighbours_kept(bad):
    text = f"a cat [[100,100,200,200]] and {bad} a dog [[300,300,400,400]]"
    boxes = ground(text, (1000, 1000), nlp=None)
    assert [b.relative for b in boxes] == [(100, 100, 200, 200), (300, 300, 400, 400)]


def test_malformed_part_of_a_group_is_skipped():
    assert [m.relative for m in parse_boxes("dogs [[1,2,3;100,100,200,200;x]]")] == [(100, 100, 200, 200)]


@pytest.mark.parametrize("bad", ["[[0,0,1000,500]]", "[[0,0,500,1200]]", "[[600,0,500,500]]", "[[0,600,500,500]]"])
def test_out_of_range_or_inverted_boxes_are_skipped(bad):
    assert parse_boxes(f"the thing {bad}") == []


def test_largest_coordinate_stays_inside_the_image():
    assert to_pixels((0, 0, 999, 999), 490, 224) == (0, 0, 489, 223)
    for width, height in [(1, 1), (37, 1001), (2000, 3), (4095, 4096)]:
        x0, y0, x1, y1 = to_pixels((0, 0, 999, 999), width, height)
        assert (x0, y0) == (0, 0) and 0 <= x1 < width and 0 <= y1 < height


def test_no_boxes_and_empty_text():
    assert ground("Just a sentence with [brackets] and [[no numbers]].", (100, 100)) == []
    assert ground("", (100, 100)) == []
    assert strip_boxes("a cat [[1,2,3,4]] sits.") == "a cat sits."


# Phrases ------------------------------------------------------------------------------------

def test_phrases_on_a_grounded_caption(nlp):
    text = ("A woman [[102,40,480,990]] holds a green pear [[300,420,410,560]] while a small boy "
            "[[600,300,850,995]] points at the ripe apples [[520,100,640,200;700,80,820,190]].")
    phrases = [b.phrase for b in ground(text, (490, 490), nlp=nlp)]
    assert phrases == ["A woman", "a green pear", "a small boy", "the ripe apples", "the ripe apples"]


def test_phrase_is_the_noun_chunk_just_before_the_box(nlp):
    text = "The man in the blue jacket [[100,100,300,900]] is walking his dog [[400,600,550,900]] in the park."
    assert [b.phrase for b in ground(text, (100, 100), nlp=nlp)] == ["the blue jacket", "his dog"]


def test_rec_answer_without_text_takes_the_default_phrase(nlp):
    (box,) = ground("[[120,330,450,880]]", (1000, 1000), nlp=nlp, default_phrase="the red car")
    assert box == GroundedBox("the red car", (120, 330, 450, 880), (120, 330, 450, 880), (0, 19))


@pytest.mark.parametrize("question, phrase", [("Where is the red circle?", "the red circle"),
                                              ("Find the blue square.", "the blue square"), ("Locate a cat", "a cat")])
def test_a_bare_box_is_labelled_with_the_object_the_question_names(nlp, question, phrase):
    assert object_phrase(question, nlp=nlp) == phrase
    assert object_phrase(question, nlp=None) == phrase
    picture_labels = ground("[[100,100,500,500]]", (200, 200), nlp=nlp, default_phrase=object_phrase(question, nlp))
    assert [b.phrase for b in picture_labels] == [phrase]


def test_label_font_scales_with_the_image_and_fits_it():
    """A small image gets a small label: it must not cover the picture (it once took the whole question)."""
    def label_rows(size):
        image = Image.new("RGB", (size, size), GREY)
        picture = draw_boxes(image, [_box("the red circle", (0, size // 2, size // 4, size - 1))])
        column = [picture.getpixel((1, y)) for y in range(size // 2)]
        return sum(1 for p in column if p != GREY)
    small, large = label_rows(112), label_rows(896)
    assert 0 < small < 112 // 6 and small < large / 4
    wide = draw_boxes(Image.new("RGB", (60, 60), GREY), [_box("a very long phrase for a tiny image", (0, 30, 20, 50))])
    row = [wide.getpixel((x, 28)) for x in range(60)]
    assert row[0] != GREY and sum(p != GREY for p in row[40:]) > 5  # cut to fit the width, not running off it


def test_plain_fallback_without_spacy():
    text = "A man in a red shirt [[1,1,2,2]] is holding a pear [[3,3,4,4]] next to two dogs [[5,5,6,6]]; people [[7,7,8,8]]"
    assert attach_phrases(text, parse_boxes(text), nlp=None) == ["a red shirt", "a pear", "two dogs", "people"]


def test_missing_pipeline_warns_and_falls_back(monkeypatch, caplog):
    import spacy

    def not_installed(name, **kwargs):
        raise OSError(f"[E050] Can't find model '{name}'")

    monkeypatch.setattr(spacy, "load", not_installed)
    load_noun_chunker.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger="utils.grounding"):
            boxes = ground("a pear [[100,100,200,200]]", (10, 10))
        assert [b.phrase for b in boxes] == ["a pear"]
        assert any("en_core_web_sm is not installed" in r.getMessage() for r in caplog.records)
    finally:
        load_noun_chunker.cache_clear()


# Drawing ------------------------------------------------------------------------------------

def _box(phrase, box):
    return GroundedBox(phrase, box, (0, 0, 0, 0), (0, 0))


def test_box_edges_are_drawn_where_the_box_is():
    image = Image.new("RGB", (200, 160), GREY)
    x0, y0, x1, y1 = 40, 60, 150, 140
    picture = draw_boxes(image, [_box("a pear", (x0, y0, x1, y1))], line_width=3)
    px = picture.load()
    colour = px[x0, (y0 + y1) // 2]
    assert colour != GREY
    mid_x, mid_y = (x0 + x1) // 2, (y0 + y1) // 2
    for inset in range(3):  # the outline lies inside the box, 3 pixels thick, on all four edges
        assert px[x0 + inset, mid_y] == colour and px[x1 - inset, mid_y] == colour
        assert px[mid_x, y0 + inset] == colour and px[mid_x, y1 - inset] == colour
    assert px[x0 - 1, mid_y] == GREY and px[x1 + 1, mid_y] == GREY and px[mid_x, y1 + 1] == GREY
    assert px[x0 + 3, mid_y] == GREY and px[x1 - 3, mid_y] == GREY and px[mid_x, y1 - 3] == GREY
    assert px[mid_x, mid_y] == GREY
    # the label sits on a filled background of the box colour just above the box, with text on it
    label = [px[x, y] for x in range(x0, x0 + 30) for y in range(y0 - 8, y0)]
    assert label.count(colour) > len(label) // 2
    assert any(p != colour for p in label), "no text drawn on the label"
    assert px[x1 - 5, y0 - 3] == GREY  # the label is narrower than this box: no fill at its far end
    assert image.getpixel((x0, mid_y)) == GREY  # the input image is left untouched


def test_phrases_get_distinct_colours_and_groups_share_one():
    image = Image.new("RGB", (300, 300), GREY)
    boxes = [_box("a cat", (20, 50, 90, 120)), _box("a dog", (150, 50, 250, 120)), _box("a cat", (20, 200, 90, 280))]
    px = draw_boxes(image, boxes, line_width=2).load()
    cat, dog, cat2 = px[20, 85], px[150, 85], px[20, 240]
    assert GREY not in (cat, dog) and cat != dog and cat == cat2


def test_label_goes_below_when_the_box_touches_the_top():
    """A box at the top edge keeps its inside clear: the label goes under it (inside only when there is no
    room above or below)."""
    image = Image.new("RGB", (200, 200), GREY)
    px = draw_boxes(image, [_box("sky", (0, 0, 199, 100))], line_width=2).load()
    colour = px[0, 50]
    assert px[5, 5] == GREY and px[1, 102] == colour and px[150, 104] == GREY
    full = draw_boxes(image, [_box("all", (0, 0, 199, 199))], line_width=2).load()
    assert full[1, 1] == full[0, 50]


def test_label_origin_above_below_inside_and_within_the_image():
    assert label_origin((10, 50, 60, 90), (30, 12), (200, 200)) == (10, 38)    # above
    assert label_origin((10, 5, 60, 90), (30, 12), (200, 200)) == (10, 91)     # below
    assert label_origin((10, 5, 60, 195), (30, 12), (200, 200)) == (10, 5)     # inside the top edge
    assert label_origin((190, 50, 199, 90), (30, 12), (200, 200)) == (170, 38)  # kept within the width


def test_grounded_response_drawn_at_the_parsed_pixels(nlp):
    image = Image.new("RGB", (400, 200), GREY)
    picture = draw_boxes(image, ground("The pear [[250,100,750,900]] is ripe.", image.size, nlp=nlp), line_width=2)
    px = picture.load()
    # (250,100,750,900) on 400 x 200 is (100,20)-(300,180), edges included
    assert px[100, 100] != GREY and px[300, 100] != GREY and px[99, 100] == GREY and px[301, 100] == GREY
    assert px[200, 180] != GREY and px[200, 181] == GREY and px[200, 100] == GREY


def grounding_copy(golden, path):
    """The golden checkpoint with `"grounding": true` in its model_config.json."""
    shutil.copytree(golden.checkpoint, path)
    config = json.load(open(path / "model_config.json"))
    json.dump({**config, "grounding": True}, open(path / "model_config.json", "w"))
    return path


def test_grounding_checkpoints_and_output_paths(golden, tmp_path, monkeypatch):
    """Grounding mode comes from the checkpoint: its config says so, or it is a grounding release."""
    assert open_checkpoint(str(grounding_copy(golden, tmp_path / "any-name"))).grounding
    monkeypatch.setenv("SAT_HOME", str(tmp_path / "home"))
    for name, release in RELEASED_CHECKPOINTS.items():
        shutil.copytree(golden.checkpoint, tmp_path / "home" / name)
        assert open_checkpoint(name).grounding == release.grounding, name
    renamed = tmp_path / "my-grounding-experiment"  # a name is not a config: no grounding mode
    shutil.copytree(golden.checkpoint, renamed)
    assert not open_checkpoint(str(renamed)).grounding and not open_checkpoint(golden.checkpoint).grounding
    first = next_output_path(str(tmp_path / "out"))
    Image.new("RGB", (2, 2)).save(first)
    assert next_output_path(str(tmp_path / "out")) != first


# CLI ----------------------------------------------------------------------------------------

GROUNDED_ANSWER = "A woman [[100,200,500,900]] holds a pear [[600,500,700,650]]."


class GroundedAnswerStream(ChatStream):
    """The real chat turn (the tiny model answers noise), with a grounding answer put in its place."""

    def __iter__(self):
        yield from super().__iter__()
        self.response = GROUNDED_ANSWER


def test_cli_saves_the_grounding_picture_for_a_grounding_checkpoint(golden, monkeypatch, capsys, tmp_path):
    checkpoint = grounding_copy(golden, tmp_path / "tiny-grounding")
    monkeypatch.setattr(utils.pipeline, "ChatStream", GroundedAnswerStream)
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"{golden.image_path}\nWhere is the pear?\nstop\n"))
    rc = cli_demo.main(["--from_pretrained", str(checkpoint), "--local_tokenizer", golden.tokenizer_dir,
                        "--version", "base", "--max_length", "60", "--grounding_dir", str(tmp_path / "out")])
    out = capsys.readouterr().out
    assert rc == 0
    saved = [line.split("saved to ", 1)[1] for line in out.splitlines() if "Grounding result saved to " in line]
    assert saved == [str(tmp_path / "out" / "grounding-001.png")]
    picture, original = Image.open(saved[0]).convert("RGB"), Image.open(golden.image_path).convert("RGB")
    assert picture.size == original.size
    x0, y0, x1, y1 = to_pixels((600, 500, 700, 650), *original.size)
    mid_x, mid_y = (x0 + x1) // 2, (y0 + y1) // 2
    assert picture.getpixel((x0, mid_y)) == picture.getpixel((x1, mid_y)) != original.getpixel((x0, mid_y))
    assert picture.getpixel((mid_x, mid_y)) == original.getpixel((mid_x, mid_y))


def test_cli_does_not_draw_for_a_chat_checkpoint(golden, monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(utils.pipeline, "ChatStream", GroundedAnswerStream)
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"{golden.image_path}\nWhere is the pear?\nstop\n"))
    rc = cli_demo.main(["--from_pretrained", golden.checkpoint, "--local_tokenizer", golden.tokenizer_dir,
                        "--max_length", "60", "--grounding_dir", str(tmp_path / "out")])
    assert rc == 0 and "Grounding result" not in capsys.readouterr().out
    assert not (tmp_path / "out").exists()
