"""Batch captioning throughput: scripts/batch_infer.py in one process, and on Ray Data with 1 and 2 workers (model
replicas), one torch thread each, on the tiny scenes model and on config M.

    python bench/batch.py                                    # both models, the three modes
    python bench/batch.py --models scenes --images 64 --modes one ray2

Each mode is a fresh `python scripts/batch_infer.py` (the Ray ones start a local Ray cluster) over a folder of
JPEG images (the pictures in assets/, in turn), one question, greedy, --batch_size engine rows per model replica,
into a new JSON-lines file, which this script watches as it grows. Per mode it prints images/s over the whole run
(start-up, Ray and the model loads included) and the steady images/s: the rows written between the moments a
quarter and three quarters of them were there, over that time (Ray hands rows back a task, 2 engine batches, at
a time: use enough images for many tasks per worker). Then the steady ratios: Ray with one worker against one
process (Ray's own cost), two workers against one (the scaling). Config M (bench/generate.py) is saved with
random weights as bench/serve.py does, so every answer has exactly --max_new_tokens tokens; the scenes model
stops at its end token.
"""
import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

from PIL import Image

from bench.serve import make_random_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCENES = os.path.join(ROOT, "checkpoints", "cogvlm-tiny-scenes")
PICTURES = ["scene_1", "scene_2", "shapes", "house"]
QUESTION = "What is in the image?"
MODES = {"one": ("one process", []), "ray1": ("Ray, 1 worker", ["--ray", "--workers", "1"]),
         "ray2": ("Ray, 2 workers", ["--ray", "--workers", "2"])}
# per model: images per run, engine rows per replica (config M's are fewer so that a run has 8 Ray tasks)
DEFAULTS = {"scenes": (1024, 8), "M": (64, 4)}
POLL_S = 0.02
SUMMARY = re.compile(r"(\d+) images, (\d+) rows \((\d+) errors\) written to .* in ([\d.]+) s: ([\d.]+) images/s")


def image_folder(folder: str, count: int) -> str:
    """`count` JPEG files, the PICTURES in turn."""
    os.makedirs(folder)
    for index in range(count):
        picture = Image.open(os.path.join(ROOT, "assets", f"{PICTURES[index % len(PICTURES)]}.png")).convert("RGB")
        picture.save(os.path.join(folder, f"{index:05d}.jpg"), quality=95)
    return folder


def lines_in(path: str) -> int:
    try:
        with open(path, "rb") as f:
            return f.read().count(b"\n")
    except FileNotFoundError:
        return 0


def run_mode(mode: str, checkpoint: str, images: str, count: int, output: str, flags) -> dict:
    """One batch_infer run: the images it wrote, its whole-run and its steady images/s."""
    command = [sys.executable, os.path.join(ROOT, "scripts", "batch_infer.py"), "--from_pretrained", checkpoint,
               "--device", "cpu", "--images", images, "--query", QUESTION, "--output", output,
               *flags, *MODES[mode][1]]
    if mode != "one":
        command += ["--threads_per_worker", "1"]
    env = dict(os.environ, OMP_NUM_THREADS="1")  # one torch thread in the one-process mode too
    with tempfile.TemporaryFile("w+") as log:
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=log, text=True)
        marks = {}  # rows -> when they were first seen
        while process.poll() is None:
            marks.setdefault(lines_in(output), time.monotonic())
            time.sleep(POLL_S)
        stdout = process.stdout.read()
        match = SUMMARY.search(stdout)
        if process.returncode != 0 or match is None:
            log.seek(0)
            sys.stderr.write(log.read()[-3000:])
            raise SystemExit(f"error: {MODES[mode][0]} exited with {process.returncode}")
    (n1, t1), (n2, t2) = (min(((n, t) for n, t in marks.items() if n >= share * count), default=(0, 0.0))
                          for share in (0.25, 0.75))
    return {"images": int(match.group(1)), "wall_s": float(match.group(4)), "rate": float(match.group(5)),
            "steady": (n2 - n1) / (t2 - t1) if t2 > t1 else float("nan")}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=["scenes", "M"], default=["scenes", "M"])
    parser.add_argument("--images", type=int, default=None, help="images per run (default: scenes 1024, M 64)")
    parser.add_argument("--modes", nargs="+", choices=sorted(MODES), default=["one", "ray1", "ray2"])
    parser.add_argument("--batch_size", type=int, default=None, help="engine rows per model replica (default: scenes 8, "
                                                                     "M 4)")
    parser.add_argument("--max_new_tokens", type=int, default=8)
    parser.add_argument("--bf16", action="store_true", help="bfloat16 weights (config M)")
    options = parser.parse_args()

    work = tempfile.mkdtemp(prefix="cogvlm-batch-bench-")
    try:
        print(f"{os.cpu_count()} CPUs, --max_new_tokens {options.max_new_tokens}; load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
        print(f"{'model':8} {'mode':15} {'images':>6} {'wall s':>7} {'images/s':>9} {'steady':>9}")
        for model in options.models:
            count = options.images or DEFAULTS[model][0]
            batch_size = options.batch_size or DEFAULTS[model][1]
            folder = image_folder(os.path.join(work, f"images-{model}"), count)
            if model == "scenes":
                checkpoint, extra = SCENES, []
            else:
                checkpoint = make_random_checkpoint(os.path.join(work, "config-M"), "M")
                extra = ["--max_length", "512"] + (["--bf16"] if options.bf16 else [])
            flags = ["--batch_size", str(batch_size), "--max_new_tokens", str(options.max_new_tokens), *extra]
            results = {}
            for mode in options.modes:
                r = results[mode] = run_mode(mode, checkpoint, folder, count, os.path.join(work, f"{model}-{mode}.jsonl"),
                                             flags)
                print(f"{model:8} {MODES[mode][0]:15} {r['images']:6d} {r['wall_s']:7.1f} {r['rate']:9.2f} "
                      f"{r['steady']:9.2f}", flush=True)
            for mode, base, what in (("ray1", "one", "Ray, 1 worker / one process"),
                                     ("ray2", "ray1", "Ray, 2 workers / 1 worker"),
                                     ("ray2", "one", "Ray, 2 workers / one process")):
                if mode in results and base in results:
                    print(f"{model:8} {what}: {results[mode]['steady'] / results[base]['steady']:.2f}x steady, "
                          f"{results[mode]['rate'] / results[base]['rate']:.2f}x whole run")
        print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
