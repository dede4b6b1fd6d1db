"""The tiny scenes CogVLM answers questions about scenes it has never seen, through the CLI.

    python scripts/scenes_cli_demo.py                  # 4 unseen scenes, 4 questions each
    python scripts/scenes_cli_demo.py --count 10 --seed 7

Renders scenes (scripts/make_scene_dataset.py, a seed the training data does not use), types them into
`cli_demo.py` as a user would (image path, then questions in one conversation, `clear`, ... `stop`),
and prints every question with the expected and the given answer, the accuracy (exact match; boxes:
IoU >= 0.5) and where the CLI saved the pictures with the boxes it drew. The CLI runs with no flag but
the checkpoint: it takes the tokenizer, the template and grounding mode from the checkpoint directory.
"""
import argparse
import os
import random
import re
import subprocess
import sys
import tempfile

from scripts.make_scene_dataset import questions_of_type, render_scene
from utils.cli import add_checkpoint_arg
from utils.evaluation import score_answer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SHIPPED = os.path.join(ROOT, "checkpoints", "cogvlm-tiny-scenes")
ANSWER_PREFIX = "Model: "
SAVED = re.compile(r"Grounding result saved to (\S+)")
DEMO_TYPES = ("colour", "count", "relation", "exist", "shape", "grounding")


def scene_questions(shapes, rng: random.Random, per_scene: int):
    """`per_scene` questions of different types about one scene, a grounding question always among them."""
    picked, kinds = [], ["grounding"] + rng.sample([k for k in DEMO_TYPES if k != "grounding"], len(DEMO_TYPES) - 1)
    for kind in kinds:
        pair = questions_of_type(kind, shapes, rng)
        if pair is not None:
            picked.append((kind, *pair))
        if len(picked) == per_scene:
            break
    rng.shuffle(picked)
    return picked


def ask_with_cli(scenes, checkpoint: str, grounding_dir: str):
    """Run cli_demo.py once over all scenes [(image path, [(kind, question, answer), ...])]; returns its
    answers in order and the grounding pictures it saved."""
    script = "".join(path + "\n" + "".join(q + "\n" for _, q, _ in questions) + "clear\n" for path, questions in scenes)
    result = subprocess.run([sys.executable, os.path.join(ROOT, "cli_demo.py"), "--from_pretrained", checkpoint,
                             "--grounding_dir", grounding_dir], input=script + "stop\n", capture_output=True,
                            text=True, cwd=ROOT)
    if result.returncode != 0:
        sys.stderr.write(result.stderr[-2000:])
        raise SystemExit(f"error: cli_demo.py exited with {result.returncode}")
    # prompts are printed without newlines, so an answer sits after the last "Model: " of its line
    lines = result.stdout.splitlines()
    answers = [line.rsplit(ANSWER_PREFIX, 1)[1].strip() for line in lines if ANSWER_PREFIX in line]
    pictures = [match.group(1) for line in lines for match in [SAVED.search(line)] if match]
    expected = sum(len(questions) for _, questions in scenes)
    if len(answers) != expected:
        raise SystemExit(f"error: expected {expected} answers from cli_demo.py, got {len(answers)}")
    return answers, pictures


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--count", type=int, default=4, help="number of scenes")
    parser.add_argument("--questions", type=int, default=4, help="questions per scene")
    parser.add_argument("--seed", type=int, default=2024, help="scene seed (the shipped model trained on seed 0)")
    add_checkpoint_arg(parser, default=SHIPPED)
    parser.add_argument("--grounding_dir", default="grounding_output", help="where the CLI saves grounding pictures")
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory() as folder:
        scenes, descriptions = [], []
        for index in range(args.count):
            image, shapes = render_scene(rng)
            path = os.path.join(folder, f"scene-{index + 1}.png")
            image.save(path)
            scenes.append((path, scene_questions(shapes, rng, args.questions)))
            descriptions.append(", ".join(s.name for s in sorted(shapes, key=lambda s: s.box[0])))
        answers, pictures = ask_with_cli(scenes, args.from_pretrained, args.grounding_dir)
    results = {"text": [0, 0], "boxes": [0, 0]}
    answer_iter = iter(answers)
    for number, ((_, questions), description) in enumerate(zip(scenes, descriptions), 1):
        print(f"scene {number}: {description} (left to right)")
        for kind, question, expected in questions:
            answer = next(answer_iter)
            score = score_answer(answer, expected)
            tally = results["boxes" if score["grounding"] else "text"]
            tally[0] += score["correct"]
            tally[1] += 1
            print(f"  {question:<52} expected {expected:<20} answer {answer:<20} {'ok' if score['correct'] else 'WRONG'}")
    (text_ok, text_n), (box_ok, box_n) = results["text"], results["boxes"]
    print(f"exact match {text_ok}/{text_n} ({text_ok / max(1, text_n):.0%}) on answers without boxes, "
          f"grounding IoU>=0.5 {box_ok}/{box_n} ({box_ok / max(1, box_n):.0%}) on unseen scenes")
    if pictures:
        print(f"grounding pictures (boxes drawn by the CLI): {', '.join(pictures)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
