"""The tiny CogVLM of scripts/train_tiny_captcha.sh reads freshly rendered captchas through the CLI.

    python scripts/captcha_cli_demo.py                 # 8 unseen clean captchas
    python scripts/captcha_cli_demo.py --count 20 --style shifted --seed 7

Renders captchas it has never seen (a seed other than the training one), pipes them into
`cli_demo.py` as a user would type them (image path, `CAPTCHA:`, `clear`, ... `stop`), and prints
each label with the model's answer, then the exact-match accuracy.
"""
import argparse
import os
import subprocess
import sys
import tempfile

from scripts.make_captcha_dataset import STYLES, make_dataset
from utils.cli import add_checkpoint_arg, add_tokenizer_arg
from utils.dataset import CAPTCHA_QUERY, label_of
from utils.evaluation import exact_match

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SHIPPED = os.path.join(ROOT, "checkpoints", "cogvlm-tiny-captcha")
ANSWER_PREFIX = "Model: "


def read_with_cli(paths, checkpoint: str, tokenizer=None):
    """Run cli_demo.py once over all `paths`; returns its answers in order. The CLI takes the tokenizer
    and the template (`base`) from the checkpoint directory unless `tokenizer` is given."""
    script = "".join(f"{path}\n{CAPTCHA_QUERY}\nclear\n" for path in paths) + "stop\n"
    flags = ["--local_tokenizer", tokenizer] if tokenizer else []
    result = subprocess.run([sys.executable, os.path.join(ROOT, "cli_demo.py"), "--from_pretrained", checkpoint,
                             *flags, "--max_length", "96"], input=script, capture_output=True, text=True, cwd=ROOT)
    if result.returncode != 0:
        sys.stderr.write(result.stderr[-2000:])
        raise SystemExit(f"error: cli_demo.py exited with {result.returncode}")
    # prompts are printed without newlines, so an answer sits after the last "Model: " of its line
    answers = [line.rsplit(ANSWER_PREFIX, 1)[1].strip() for line in result.stdout.splitlines() if ANSWER_PREFIX in line]
    if len(answers) != len(paths):
        raise SystemExit(f"error: expected {len(paths)} answers from cli_demo.py, got {len(answers)}")
    return answers


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--count", type=int, default=8)
    parser.add_argument("--style", choices=STYLES, default="clean")
    parser.add_argument("--seed", type=int, default=2024, help="render seed (the training data uses seed 0)")
    add_checkpoint_arg(parser, default=SHIPPED)
    add_tokenizer_arg(parser)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as folder:
        paths = make_dataset(folder, args.count, args.style, args.seed)
        answers = read_with_cli(paths, args.from_pretrained, args.local_tokenizer)
        labels = [label_of(p) for p in paths]
    print(f"{'captcha':<10}{'answer':<10}")
    for label, answer in zip(labels, answers):
        print(f"{label:<10}{answer:<10}{'ok' if answer == label else 'WRONG'}")
    scores = exact_match(answers, labels)
    print(f"accuracy {scores['acc']:.2%} ({sum(a == t for a, t in zip(answers, labels))}/{len(labels)}) on unseen "
          f"{args.style} captchas")
    return 0


if __name__ == "__main__":
    sys.exit(main())
