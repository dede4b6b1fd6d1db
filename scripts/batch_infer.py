"""Caption a dataset: every question about every image, a result row each, in this process or on a Ray
cluster (Ray Data: a pool of model replicas, each with the serving engine inside).

    python scripts/batch_infer.py --from_pretrained cogvlm-chat-v1.1 --version chat --bf16 \
        --images photos/ --query "Describe the image." --batch_size 8 --output results.jsonl
    python scripts/batch_infer.py --from_pretrained cogvlm-chat-v1.1 --version chat --bf16 \
        --images shards/*.tar --queries_file questions.txt --output captions.parquet \
        --ray auto --workers 8 --gpus_per_worker 1

--images (one kind per run): a folder (searched recursively), image files or URLs, .txt lists of them (one
a line), webdataset .tar shards (img2dataset's key.jpg + key.json), or .parquet files with an image-bytes
or path/URL column (--image_column; rows keyed by --key_column). --output: x.jsonl (JSON lines) or
x.parquet (a folder of parquet parts); a row per (image, question): `file` or `key`, `query` (when several
are asked), `answer`, `tokens` (end token included), `finish_reason` ("stop" | "length"), or `error` for
an input that is not a readable image (or whose prompt does not fit --max_length). utils/batch/ has the
details.

Resumable, exactly once: run the same command again after a kill (or Ctrl-C) and it skips what the
output holds; a row that was half written is dropped first. Ctrl-C / SIGTERM stop cleanly: the rows
done are written, one line says how to resume, and the exit status is 130 / 143. Generation runs on the
serving engine (utils/engine.py): --batch_size rows decode together, and a finished row takes the next
image at once. Takes the CLI's flags (--temperature, --top_k, --max_length, --bf16, --quant, ...).
"""
import argparse
import logging
import sys

from models.errors import CogVLMError
from utils.batch import LOCAL
from utils.cli import Interrupted, add_inference_args, run_main, setup_logging, single_process, stop_on_signals

logger = logging.getLogger("batch_infer")

RAY_FLAGS = ("workers", "gpus_per_worker", "threads_per_worker")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="CogVLM batch inference: every question about every image")
    add_inference_args(parser)
    parser.add_argument("--images", nargs="+", required=True,
                        help="a folder (searched recursively), image files or URLs, .txt lists of them (one a line), "
                             "webdataset .tar shards, or .parquet files: one kind")
    parser.add_argument("--query", action="append", help="a question asked about every image (repeat for several)")
    parser.add_argument("--queries_file", default=None, help="a text file of questions, one a line")
    parser.add_argument("--output", required=True,
                        help="x.jsonl (JSON lines) or x.parquet (a folder of parquet parts); appended to: a rerun "
                             "resumes")
    parser.add_argument("--batch_size", type=int, default=8, help="images generated at once (per worker with --ray)")
    parser.add_argument("--max_new_tokens", type=int, default=None, help="answer length cap (default: --max_length)")
    parser.add_argument("--image_column", default=None,
                        help="the image field of webdataset samples (default: the first of jpg/jpeg/png/webp) or the "
                             "parquet column with image bytes or a path/URL (default: the first of image/jpg/jpeg/png/"
                             "webp/url)")
    parser.add_argument("--key_column", default=None,
                        help="parquet: the column of unique values that names each row (default: key)")
    cluster = parser.add_argument_group("Ray (several model replicas, one machine or a cluster)")
    cluster.add_argument("--ray", nargs="?", const=LOCAL, default=None, metavar="ADDRESS",
                         help="run on Ray Data: alone, the cluster `ray start` runs on this machine, or a new local "
                              "one; `auto`, HOST:PORT or ray://HOST:10001 join that cluster")
    cluster.add_argument("--workers", type=int, default=None, help="model replicas (default 1)")
    cluster.add_argument("--gpus_per_worker", type=float, default=None,
                         help="GPUs per replica, a fraction shares one (default: 1 on a cluster with GPUs, else 0)")
    cluster.add_argument("--threads_per_worker", type=int, default=None,
                         help="CPUs reserved per replica, its torch threads (default 1)")
    return parser.parse_args(argv)


def check_flags(args) -> None:
    """Flag errors (one CogVLMError line) before anything is read or loaded."""
    single_process("batch_infer.py", " (--ray runs several model replicas)")
    if args.batch_size < 1:
        raise CogVLMError(f"--batch_size must be at least 1, got {args.batch_size}")
    if args.ray is None:
        for name in RAY_FLAGS:
            if getattr(args, name) is not None:
                raise CogVLMError(f"--{name} needs --ray; without it one model runs in this process")
        return
    for name, least in (("workers", 1), ("threads_per_worker", 1), ("gpus_per_worker", 0)):
        if getattr(args, name) is not None and getattr(args, name) < least:
            raise CogVLMError(f"--{name} must be at least {least}, got {getattr(args, name)}")
    device = args.device or ""
    if args.gpus_per_worker == 0 and device.startswith("cuda"):
        raise CogVLMError(f"--device {device} with --gpus_per_worker 0: a replica without a GPU cannot use one; "
                          "give --gpus_per_worker 1 or --device cpu")
    if args.gpus_per_worker and device == "cpu":
        raise CogVLMError("--device cpu with --gpus_per_worker: the replicas would hold GPUs they never use; "
                          "drop one of them")


def caption_here(args, config, inputs, queries, output) -> None:
    """One model in this process: the inputs not done, in order, on the engine; a row written as it is done."""
    row_format = inputs.format
    total = None
    if inputs.count is not None:
        remaining = sum(not output.done(row_format.key(row)) for row in inputs.files)
        logger.info("%d inputs, %d done before, %d to go", inputs.count, inputs.count - remaining, remaining)
        if not remaining:
            return
        total = remaining * len(queries)
    from tqdm import tqdm

    from utils.batch.captioner import Captioner
    from utils.pipeline import load_pipeline

    pipeline = load_pipeline(args)
    todo = (row for row in inputs.rows() if not output.done(row_format.key(row)))
    with Captioner(pipeline, queries, config.replace(max_length=pipeline.defaults.max_length), args.batch_size,
                   row_format.key_name) as captioner, tqdm(total=total, unit="row") as progress:
        for row in captioner.answer(row_format.item(input_row) for input_row in todo):
            progress.update(output.write([row]))


def main(argv=None) -> int:
    args = parse_args(argv)
    setup_logging(args.verbose)
    opened = []  # the output once it is open: an interrupt says how many rows it holds

    def interrupted(stop: Interrupted) -> str:
        written = opened[0].rows_written if opened else 0
        return (f"interrupted ({stop}): {written} rows written to {args.output} this run; run the same command "
                "again to resume")

    return run_main(lambda: caption(args, opened), interrupted)


def caption(args, opened: list) -> int:
    # the model layers load here, after the flags: SAT and Ray take seconds to import (utils/cli.py)
    from utils.batch.inputs import read_queries, resolve_inputs
    from utils.batch.outputs import open_output
    from utils.batch.ray_job import caption_on_ray, default_gpus_per_worker, ray_cluster
    from utils.pipeline import generation_config

    check_flags(args)
    config = generation_config(args, max_new_tokens=args.max_new_tokens)
    queries = read_queries(args.query, args.queries_file, args.no_prompt)
    inputs = resolve_inputs(args.images, args.image_column, args.key_column)
    with open_output(args.output, inputs.format.key_name, queries) as output:
        opened.append(output)
        if args.ray is None:
            caption_here(args, config, inputs, queries, output)
        else:
            with ray_cluster(args.ray), stop_on_signals():  # ray.init sets its own SIGTERM handler: take it back
                gpus = args.gpus_per_worker
                caption_on_ray(args, config, inputs, queries, output, workers=args.workers or 1,
                               gpus_per_worker=default_gpus_per_worker(args.device) if gpus is None else gpus,
                               threads_per_worker=args.threads_per_worker or 1)
    print(output.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
