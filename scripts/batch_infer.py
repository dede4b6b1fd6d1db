"""Ask every image of a folder the same question, in batches; one JSON line per image.

    python scripts/batch_infer.py --from_pretrained cogvlm-chat-v1.1 --version chat --bf16 \
        --images photos/ --query "Describe the image." --batch_size 8 --output results.jsonl

Each line of the output: {"file": path under --images, "answer": ..., "tokens": generated tokens (end token
included), "finish_reason": "stop" | "length"}, or {"file": ..., "error": why} for a file that is not a
readable image (or whose prompt does not fit --max_length). Images are found recursively by extension
and processed in sorted order; lines come in that order. Every line is flushed as it is written, so a
killed run loses only the answers in flight: run the same command again and it skips the files already in
the output (a half-written last line is dropped first). Generation runs on the serving engine
(utils/engine.py): --batch_size rows decode together, and a finished row takes the next image at once.
Takes the CLI's flags (--temperature, --top_k, --max_length, --bf16, --quant, ...).
"""
import argparse
import collections
import json
import logging
import os
import sys

# run as `python scripts/batch_infer.py` from anywhere: the library lives one level up
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tqdm import tqdm  # noqa: E402

from models.errors import CogVLMError, ImageError, PromptError  # noqa: E402
from utils.engine import Engine  # noqa: E402
from utils.pipeline import add_inference_args, generation_config, load_pipeline, setup_logging  # noqa: E402
from utils.vision import load_image  # noqa: E402

logger = logging.getLogger("batch_infer")

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def find_images(folder: str):
    """Image files under `folder` (by extension, recursively), as sorted paths relative to it."""
    if not os.path.isdir(folder):
        raise CogVLMError(f"--images {folder} is not a directory; give the folder that holds the images")
    found = []
    for root, _, names in os.walk(folder):
        found += [os.path.relpath(os.path.join(root, name), folder) for name in names
                  if name.lower().endswith(IMAGE_EXTENSIONS)]
    return sorted(found)


def read_done(output: str):
    """The files an earlier run already wrote (answer or error). A last line cut short by a kill is removed
    from the file, so that appending continues on a clean line."""
    if not os.path.exists(output):
        return set()
    done, good_bytes = set(), 0
    with open(output, "rb") as f:
        for line in f:
            try:
                record = json.loads(line)
                complete = line.endswith(b"\n") and isinstance(record, dict) and "file" in record
            except ValueError:
                complete = False
            if not complete:
                break
            done.add(record["file"])
            good_bytes += len(line)
    if good_bytes != os.path.getsize(output):
        logger.warning("%s: dropping a half-written line after %d complete ones", output, len(done))
        with open(output, "r+b") as f:
            f.truncate(good_bytes)
    return done


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="CogVLM batch inference over a folder of images")
    add_inference_args(parser)
    parser.add_argument("--images", required=True, help="folder of images (searched recursively)")
    parser.add_argument("--query", required=True, help="the question asked about every image")
    parser.add_argument("--output", required=True, help="JSON-lines file to write (appended to: a rerun resumes)")
    parser.add_argument("--batch_size", type=int, default=8, help="images generated at once")
    parser.add_argument("--max_new_tokens", type=int, default=None, help="answer length cap (default: --max_length)")
    args = parser.parse_args(argv)
    setup_logging()
    try:
        if int(os.environ.get("WORLD_SIZE", 1)) > 1:
            raise CogVLMError("batch_infer.py runs as one process; start it with python, not torchrun")
        if args.batch_size < 1:
            raise CogVLMError(f"--batch_size must be at least 1, got {args.batch_size}")
        config = generation_config(args, max_new_tokens=args.max_new_tokens)
        files = find_images(args.images)
        done = read_done(args.output)
        todo = [name for name in files if name not in done]
        logger.info("%d images in %s, %d done before, %d to go", len(files), args.images, len(files) - len(todo),
                    len(todo))
        if not todo:
            return 0
        pipeline = load_pipeline(args)
        run(pipeline, args, config.replace(max_length=pipeline.defaults.max_length), todo)
    except CogVLMError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


def run(pipeline, args, config, todo) -> None:
    """Submit the images to an engine with batch_size rows, keeping as many more queued so that a freed row
    never waits for image decoding; write each result, in order, as soon as it and those before it are done."""
    engine = Engine(pipeline.model, pipeline.defaults.max_length, max_batch_size=args.batch_size,
                    max_waiting=2 * args.batch_size + 1, eos_token_id=pipeline.processor.eos_token_id)
    query = "" if args.no_prompt else args.query
    in_flight = collections.deque()  # (file, (chat turn, engine request) or None, error or None)
    with open(args.output, "a", encoding="utf-8") as out, tqdm(total=len(todo), unit="image") as progress:
        def write_oldest():
            name, job, error = in_flight.popleft()
            if job is not None:
                turn, request = job
                for token in request:  # waits for the engine
                    turn.add_token(token)
                turn.finish()
                record = {"file": name, "answer": turn.response, "tokens": len(turn.token_ids),
                          "finish_reason": turn.finish_reason}
            else:
                record = {"file": name, "error": error}
            out.write(json.dumps(record, ensure_ascii=False) + "\n")
            out.flush()
            progress.update()

        for name in todo:
            try:
                conversation = pipeline.conversation(load_image(os.path.join(args.images, name)))
                turn = pipeline.chat(conversation, query, config)  # the prompt; generated on the engine:
                request = engine.submit(turn.inputs, turn.generation_config, turn.generator)
                in_flight.append((name, (turn, request), None))
            except (ImageError, PromptError) as e:
                in_flight.append((name, None, str(e)))
            while len(in_flight) > 2 * args.batch_size:
                write_oldest()
        while in_flight:
            write_oldest()
    engine.close()


if __name__ == "__main__":
    sys.exit(main())
