"""Write the character-level LLaMA tokenizer of the tiny captcha CogVLM (scripts/tiny_captcha/tokenizer).

    python scripts/make_char_tokenizer.py --out scripts/tiny_captcha/tokenizer

A SentencePiece model with one piece per printable ASCII character (plus `▁`), byte fallback for
everything else, and LLaMA's special ids (<unk>=0, <s>=1, </s>=2), saved with transformers'
LlamaTokenizer so that `--local_tokenizer` loads it like Vicuna's. Why not a subword vocabulary:
with pieces such as `ti` or `▁a`, the k-th answer token is no longer the k-th glyph in the image,
and a tiny model trained from scratch has to learn that mapping too; with single characters (and
std-1 ViT position embeddings) it left the "ignore the image" plateau after 550-1000 steps, where the
subword vocabulary was still on it at step 600 (bench/RESULTS.md, "Tiny captcha reader"; the model:
docs/finetuning.md).
"""
import argparse
import json
import os
import shutil
import string
import tempfile

from models.templates import render

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SPECIAL_TOKENS = 3  # <unk>, <s>, </s>
BYTE_PIECES = 256


def save_as_llama_tokenizer(model_file: str, out_dir: str) -> int:
    """Save the SentencePiece model `model_file` (LLaMA's special ids) as a transformers LlamaTokenizer
    directory `out_dir` (replaced if it exists); returns the tokenizer's size."""
    from transformers import LlamaTokenizer

    with tempfile.TemporaryDirectory() as work:
        shutil.copy(model_file, os.path.join(work, "tokenizer.model"))
        with open(os.path.join(work, "tokenizer_config.json"), "w") as config:
            json.dump(dict(tokenizer_class="LlamaTokenizer", add_bos_token=True, add_eos_token=False, legacy=True,
                           bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<unk>",
                           clean_up_tokenization_spaces=False), config)
        tokenizer = LlamaTokenizer.from_pretrained(work)  # reads tokenizer.model (the constructor would not)
        if os.path.isdir(out_dir):
            shutil.rmtree(out_dir)
        tokenizer.save_pretrained(out_dir)
        shutil.copy(model_file, os.path.join(out_dir, "tokenizer.model"))
    return len(tokenizer)


def make_char_tokenizer(out_dir: str) -> int:
    """Train the SentencePiece char model, save it as a LlamaTokenizer in `out_dir`; return its size."""
    import sentencepiece as spm

    characters = string.ascii_letters + string.digits + string.punctuation
    # a char model's vocabulary is exactly the characters of its corpus, so the corpus lists them all
    corpus = [characters, " ".join(characters), "CAPTCHA:", render("chat", "What is in the image?", with_image=False)]
    pieces = len(set("".join(corpus)) | {"▁"}) + SPECIAL_TOKENS + BYTE_PIECES
    with tempfile.TemporaryDirectory() as work:
        prefix = os.path.join(work, "tokenizer")
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(corpus), model_prefix=prefix, model_type="char", vocab_size=pieces,
            byte_fallback=True, character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
            normalization_rule_name="identity", add_dummy_prefix=True, remove_extra_whitespaces=False,
            minloglevel=2)
        return save_as_llama_tokenizer(prefix + ".model", out_dir)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=os.path.join(ROOT, "scripts", "tiny_captcha", "tokenizer"))
    args = parser.parse_args()
    size = make_char_tokenizer(args.out)
    print(f"wrote a {size}-piece character tokenizer to {args.out}")


if __name__ == "__main__":
    main()
