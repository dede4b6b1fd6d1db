"""Write the word-level LLaMA tokenizer of the tiny scenes CogVLM (scripts/tiny_scenes/tokenizer).

    python scripts/make_scene_tokenizer.py --out scripts/tiny_scenes/tokenizer

A SentencePiece BPE model trained on the questions and answers of scripts/make_scene_dataset.py in
the chat template, so that each word of that vocabulary ("circle", "Question", "yellow") is one
piece. Numbers are split into fixed two-digit pieces `00`..`99` and single digits: a box coordinate
such as 268 is written as `26` `8`, its first piece alone placing the edge to 1/100 of the image
(about one pixel of a 112-px scene), one class among 100 neighbouring positions rather than a
hundreds digit, then a tens digit that jumps from 9 to 0 between neighbouring places (docs/finetuning.md
describes the model; bench/RESULTS.md has what it reaches with it). Every printable ASCII character is a
piece too, and byte fallback covers any other text, so a user may type anything. `\\n` (the
template's turn separator), `[[` and `]]` are fixed pieces, so an answer never merges with what
follows it in a rendered history. LLaMA's special ids (<unk>=0,
<s>=1, </s>=2); saved with transformers' LlamaTokenizer so that `--local_tokenizer` loads it.
"""
import argparse
import os
import random
import string
import tempfile

from scripts.make_char_tokenizer import save_as_llama_tokenizer
from scripts.make_scene_dataset import conversation, render_scene
from models.templates import render

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

VOCAB_SIZE = 640
FIXED_PIECES = ["\n", "[[", "]]"] + [f"{n:02d}" for n in range(100)]
CORPUS_SCENES = 3000


def scene_corpus(scenes: int = CORPUS_SCENES, seed: int = 12345, version: str = "chat"):
    """Rendered conversations of `scenes` random scenes (the text only), plus every ASCII character."""
    rng = random.Random(seed)
    lines = [string.ascii_letters + string.digits + string.punctuation, " ".join(string.printable.strip())]
    for _ in range(scenes):
        _, shapes = render_scene(rng)
        messages, _ = conversation(shapes, 3, rng)
        turns = [(messages[i]["content"], messages[i + 1]["content"]) for i in range(0, len(messages), 2)]
        text = render(version, turns[-1][0], turns[:-1], with_image=False) + " " + turns[-1][1]
        lines.append(text)  # whole, so that "\nQuestion:" (no leading space) is learned too
    return lines


def make_scene_tokenizer(out_dir: str, vocab_size: int = VOCAB_SIZE) -> int:
    """Train the BPE model, save it as a LlamaTokenizer in `out_dir`; return its size."""
    import sentencepiece as spm

    with tempfile.TemporaryDirectory() as work:
        prefix = os.path.join(work, "tokenizer")
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(scene_corpus()), model_prefix=prefix, model_type="bpe", vocab_size=vocab_size,
            byte_fallback=True, split_digits=True, character_coverage=1.0, user_defined_symbols=FIXED_PIECES,
            unk_id=0, bos_id=1, eos_id=2, pad_id=-1, normalization_rule_name="identity", add_dummy_prefix=True,
            remove_extra_whitespaces=False, num_threads=1, minloglevel=2)
        return save_as_llama_tokenizer(prefix + ".model", out_dir)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=os.path.join(ROOT, "scripts", "tiny_scenes", "tokenizer"))
    parser.add_argument("--vocab_size", type=int, default=VOCAB_SIZE)
    args = parser.parse_args()
    size = make_scene_tokenizer(args.out, args.vocab_size)
    print(f"wrote a {size}-piece scene tokenizer to {args.out}")


if __name__ == "__main__":
    main()
