"""Captioning on a Ray cluster with Ray Data: Ray reads the inputs, a pool of actors (model replicas, each
loaded once with the serving engine inside) answers, and this process, the driver, writes the rows as they
come.

    with ray_cluster("local"):      # or "auto" / "HOST:PORT" / "ray://HOST:10001" to join a cluster
        caption_on_ray(flags, config, inputs, queries, output, workers=2, gpus_per_worker=1, threads_per_worker=4)

Failures are Ray's to handle: a dead actor is restarted and its tasks retried (Ray Data's defaults for
actor pools: max_restarts -1, max_task_retries -1). The driver writes rather than Ray's write_parquet so
that every row passes through `Output.write`, which keeps one per (key, query) whatever Ray retried, and
so that the output stays the ledger a rerun resumes from (a sink written from the tasks leaves the files
of a failed try behind and cannot tell a rerun what is done). Rows are a few hundred bytes: one writer
keeps up with any number of actors.
"""
import argparse
import contextlib
import dataclasses
import logging
import math
import os
from typing import Iterator, List, Optional, Sequence

import pyarrow as pa
import pyarrow.compute as pc
import ray
import ray.data
import ray.exceptions
import torch

from models.checkpoint import open_checkpoint
from models.errors import CogVLMError
from utils.batch import LOCAL
from utils.batch.captioner import Captioner
from utils.batch.inputs import Inputs, RowFormat, read_units
from utils.batch.outputs import Output, result_schema
from utils.cli import setup_logging
from utils.pipeline import load_pipeline

logger = logging.getLogger(__name__)

# two batches in flight per actor, on two threads: the next one's prompts fill engine rows while the last
# answers of the one before are still decoding
CALLS_PER_WORKER = 2
# Reading moves bytes (images are decoded in the actors): without a CPU of its own it cannot be starved by
# actors that reserve every CPU of a node; a fixed task count and Ray Data's backpressure bound it.
READ_CPUS = 0
# rows per actor call, in engine batches (--batch_size): a call streams them through the engine, and an
# actor task (a call, or the calls of one block) hands its rows to the driver when it ends
CALL_BATCHES = 2
MAX_FILE_UNITS = 4096  # from_items puts each read unit's block from the driver, about a millisecond each
# the project's own packages, shipped to every node of a cluster (the environment: requirements.txt)
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PACKAGES = [os.path.join(ROOT, name) for name in ("models", "utils")]


@contextlib.contextmanager
def ray_cluster(address: str) -> Iterator[None]:
    """Connected to Ray for the block: `address` LOCAL joins the cluster `ray start` runs on this machine
    (or $RAY_ADDRESS) or starts one for the block, anything else is ray.init's address. A process already
    connected (a notebook, the tests) stays on its cluster and connected."""
    if ray.is_initialized():
        logger.info("on the Ray cluster this process is connected to")
        yield
        return
    try:
        ray.init(address=None if address == LOCAL else address, runtime_env={"py_modules": PACKAGES})
    except ConnectionError as e:
        raise CogVLMError(f"cannot reach a Ray cluster at --ray {address} ({e}); start one with `ray start --head` "
                          "or give its address") from None
    try:
        yield
    finally:
        ray.shutdown()


def default_gpus_per_worker(device: Optional[str]) -> float:
    """One GPU per model replica when the cluster has GPUs (and --device is not cpu), else none."""
    has_gpus = ray.cluster_resources().get("GPU", 0) > 0
    return 1.0 if has_gpus and not (device or "").startswith("cpu") else 0.0


class CaptionWorker:
    """One model replica in a Ray Data actor: the model loaded once, the serving engine inside. Called
    with batches of input rows (pyarrow), returns their result rows; rows whose key is in `done_keys` (every
    query written before) are skipped."""

    def __init__(self, flags, config, queries: Sequence[str], row_format: RowFormat, done_keys: pa.Array,
                 threads: int):
        setup_logging()
        torch.set_num_threads(threads)
        pipeline = load_pipeline(flags)
        self.format, self.done_keys = row_format, done_keys
        self.schema = result_schema(row_format.key_name, len(queries) > 1)
        self.captioner = Captioner(pipeline, queries, config.replace(max_length=pipeline.defaults.max_length),
                                   flags.batch_size, row_format.key_name, callers=CALLS_PER_WORKER)

    def __call__(self, batch: pa.Table) -> pa.Table:
        if len(self.done_keys):
            keys = pc.cast(batch[self.format.key_column], pa.string())
            batch = batch.filter(pc.invert(pc.fill_null(pc.is_in(keys, value_set=self.done_keys), False)))
        rows = list(self.captioner.answer(self.format.item(row) for row in batch.to_pylist()))
        return pa.Table.from_pylist(rows, schema=self.schema)


def read_dataset(units: List[dict], row_format: RowFormat, read_tasks: int) -> "ray.data.Dataset":
    """The input rows as a Ray dataset: each read unit (Inputs.units: a shard, a parquet row group, a slice of
    the file list) read in a Ray task, at most `read_tasks` at once, by the reader the one-process mode uses,
    so both see the same rows and keys. Ray's own read_parquet would list files in a one-CPU task, which
    actors holding every CPU starve."""
    return ray.data.from_items(units, override_num_blocks=len(units)).map_batches(
        read_units, fn_args=(row_format,), batch_size=1, batch_format="pyarrow", num_cpus=READ_CPUS,
        compute=ray.data.TaskPoolStrategy(size=read_tasks))


def _worker_flags(flags) -> argparse.Namespace:
    """The flags with local checkpoint / tokenizer paths made absolute: an actor's working directory is
    not the driver's."""
    flags = argparse.Namespace(**vars(flags))
    for name in ("from_pretrained", "local_tokenizer"):
        value = getattr(flags, name, None)
        if value and os.path.exists(value):
            setattr(flags, name, os.path.abspath(value))
    return flags


def caption_on_ray(flags, config, inputs: Inputs, queries: Sequence[str], output: Output, workers: int,
                   gpus_per_worker: float, threads_per_worker: int) -> None:
    """Answer every input not done in `output` on `workers` actors (each `gpus_per_worker` GPUs and
    `threads_per_worker` CPUs: torch's threads), writing the rows as Ray hands them back. flags: the parsed
    batch_infer flags (each actor loads the model they name); config: their GenerationConfig."""
    # a checkpoint that cannot be found fails here, once, not in every actor Ray restarts without end
    open_checkpoint(flags.from_pretrained, local_files_only=flags.local_files_only)
    if inputs.format.kind == "files":  # the driver has the list: only what is left goes to Ray
        inputs = dataclasses.replace(inputs, files=[row for row in inputs.files if not output.done(row["file"])])
        logger.info("%d images to go", len(inputs.files))
        if not inputs.files:
            return
    rows_per_call = CALL_BATCHES * flags.batch_size
    units = inputs.units(files_per_unit=max(rows_per_call, math.ceil(len(inputs.files) / MAX_FILE_UNITS)))
    if not units:
        return
    done_keys = pa.array([] if inputs.format.kind == "files" else output.done_keys(), pa.string())
    dataset = read_dataset(units, inputs.format, read_tasks=min(workers + 1, len(units))).map_batches(
        CaptionWorker, fn_constructor_args=(_worker_flags(flags), config, list(queries), inputs.format, done_keys,
                                            threads_per_worker),
        batch_size=rows_per_call, batch_format="pyarrow", num_cpus=threads_per_worker, num_gpus=gpus_per_worker,
        compute=ray.data.ActorPoolStrategy(size=workers, max_concurrent_calls_per_actor=CALLS_PER_WORKER,
                                           enable_true_multi_threading=True))
    try:
        for table in dataset.iter_batches(batch_size=None, batch_format="pyarrow"):
            output.write(table.to_pylist())
    except ray.exceptions.RayTaskError as error:
        cause = _worker_error(error)
        if cause is None:
            raise
        # bad input found in a worker: one line, as in this process (Ray Data appends its retry advice)
        raise CogVLMError(str(cause).splitlines()[0]) from None


def _worker_error(error: BaseException) -> Optional[CogVLMError]:
    """The CogVLMError a Ray task raised, out of the exceptions Ray and Ray Data wrap it in (or None)."""
    for _ in range(8):  # a few wrappers deep at most
        if isinstance(error, CogVLMError) and not isinstance(error, ray.exceptions.RayTaskError):
            return error
        error = getattr(error, "cause", None) or error.__cause__
        if error is None:
            return None
    return None
