"""The result rows and where they go, with the bookkeeping that gives every input exactly one row.

    with open_output("captions.parquet", "key", queries) as output:   # or captions.jsonl
        todo = [row for row in rows if not output.done(key_of(row))]
        output.write(result_rows)          # rows whose (key, query) is written already are dropped
    print(output.summary())

A row per (input, query): the key (`file` or `key`), `query` when several are asked, `answer`, `tokens`
(end token included), `finish_reason`, or `error` for an input that is not a readable image (or whose
prompt does not fit). `x.jsonl`: JSON lines, flushed as written, fields without a value left out.
`x.parquet`: a folder of parts (read it with pandas.read_parquet, pyarrow.dataset or ray.data.read_parquet),
each written under a hidden name and renamed whole every PART_ROWS rows or PART_SECONDS, and at close.

The output is its own ledger: opening it reads which (key, query) pairs are written, a rerun skips the
inputs whose every query is, and `write` drops a row whose pair is written already (an input retried
after a worker died, or one interrupted between its queries). A lock file keeps a second run off it.
"""
import collections
import contextlib
import json
import logging
import os
import time
from typing import Iterable, Iterator, List, Optional, Sequence

import filelock
import pyarrow as pa
import pyarrow.parquet as pq

from models.checkpoint.atomic import PARTIAL_MARKER
from models.errors import CogVLMError

logger = logging.getLogger(__name__)

PART_ROWS = 1000
PART_SECONDS = 60.0


def result_schema(key_name: str, several_queries: bool) -> pa.Schema:
    fields = [(key_name, pa.string())] + ([("query", pa.string())] if several_queries else [])
    fields += [("answer", pa.string()), ("tokens", pa.int64()), ("finish_reason", pa.string()), ("error", pa.string())]
    return pa.schema(fields)


def result_row(key_name: str, key: str, query: Optional[str], **fields) -> dict:
    """A result row: key, query (None: one query is asked, no column), answer/tokens/finish_reason or error."""
    row = {key_name: key} if query is None else {key_name: key, "query": query}
    row.update({name: fields.get(name) for name in ("answer", "tokens", "finish_reason", "error")})
    return row


class Output:
    """The results, opened for appending: which inputs are done, `write`, and counts for the summary.

    queries: this run's; a row of another query counts for nothing. Subclasses read the rows written before
    (`_load`) and append (`_append`)."""

    def __init__(self, path: str, key_name: str, queries: Sequence[str]):
        self.path, self.key_name, self.queries = path, key_name, list(queries)
        self.several = len(self.queries) > 1
        self._pairs = set()  # (key, query) written
        self._per_key = collections.Counter()  # key: how many of this run's queries are written
        self.rows_before = self.rows_written = self.errors = self.duplicates = 0
        self._keys_written = set()
        self._start, self._first_write, self._keys_at_first_write = time.monotonic(), None, 0

    def done(self, key: str) -> bool:
        """Whether every query about `key` has its row."""
        return self._per_key[key] >= len(self.queries)

    def done_keys(self) -> List[str]:
        return [key for key, count in self._per_key.items() if count >= len(self.queries)]

    def write(self, rows: Iterable[dict]) -> int:
        """Append the rows whose (key, query) has none yet (the others are dropped); how many were kept."""
        rows = list(rows)
        kept = [row for row in rows if self._mark(row[self.key_name], row.get("query"))]
        self.duplicates += len(rows) - len(kept)
        if kept:
            self._append(kept)
            self.rows_written += len(kept)
            self.errors += sum(row.get("error") is not None for row in kept)
            self._keys_written.update(row[self.key_name] for row in kept)
            if self._first_write is None:
                self._first_write, self._keys_at_first_write = time.monotonic(), len(self._keys_written)
        return len(kept)

    def _mark(self, key: str, query: Optional[str]) -> bool:
        pair = (key, query if self.several else self.queries[0])
        if pair in self._pairs:
            return False
        self._pairs.add(pair)
        if pair[1] in self.queries:
            self._per_key[key] += 1
        return True

    def _load(self, record: dict, where: str) -> None:
        """Count a row written before (checked to match this run's key and query columns)."""
        if self.key_name not in record:
            raise CogVLMError(f"{where} has no {self.key_name!r}: it was not written for these inputs; give another "
                              "--output")
        if ("query" in record) != self.several:
            raise CogVLMError(f"{where} was written for {'several queries' if 'query' in record else 'one query'}; "
                              f"this run asks {len(self.queries)}: give another --output")
        self.rows_before += self._mark(record[self.key_name], record.get("query"))

    def summary(self) -> str:
        """One line: what this run wrote, how fast (also from the first row on: model loading left out)."""
        now, images = time.monotonic(), len(self._keys_written)
        elapsed = now - self._start
        line = (f"{images} images, {self.rows_written} rows ({self.errors} errors) written to {self.path} in "
                f"{elapsed:.1f} s: {images / elapsed:.2f} images/s")
        if self._first_write is not None and now > self._first_write and images > self._keys_at_first_write:
            rate = (images - self._keys_at_first_write) / (now - self._first_write)
            line += f" ({rate:.2f} images/s from the first row on)"
        return line

    def flush(self) -> None:
        """Write what is buffered."""

    def close(self) -> None:
        self.flush()

    def _append(self, rows: List[dict]) -> None:
        raise NotImplementedError


class JsonlOutput(Output):
    """JSON lines, flushed as written; fields without a value are left out. A last line cut short by a kill
    is removed, so that appending continues on a clean line."""

    def __init__(self, path: str, key_name: str, queries: Sequence[str]):
        super().__init__(path, key_name, queries)
        if os.path.exists(path):
            self._read_existing()
        self._file = open(path, "a", encoding="utf-8")

    def _read_existing(self) -> None:
        good_bytes, size = 0, os.path.getsize(self.path)
        with open(self.path, "rb") as f:
            for number, line in enumerate(f, 1):
                if not line.endswith(b"\n") and good_bytes + len(line) == size:
                    logger.warning("%s: dropping a half-written last line after %d complete ones", self.path,
                                   number - 1)
                    break
                try:
                    record = json.loads(line)
                except ValueError:
                    record = None
                if not isinstance(record, dict):
                    raise CogVLMError(f"{self.path} line {number} is not a JSON result row; give another --output")
                self._load(record, f"{self.path} line {number}")
                good_bytes += len(line)
        if good_bytes != size:
            with open(self.path, "r+b") as f:
                f.truncate(good_bytes)

    def _append(self, rows: List[dict]) -> None:
        for row in rows:
            record = {name: value for name, value in row.items() if value is not None}
            self._file.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


class ParquetOutput(Output):
    """A folder of parquet parts `part-NNNNN.parquet`, each written under a hidden name and renamed whole,
    every PART_ROWS rows or PART_SECONDS (and at close): a kill loses at most the rows since the last part."""

    def __init__(self, path: str, key_name: str, queries: Sequence[str]):
        super().__init__(path, key_name, queries)
        if os.path.exists(path) and not os.path.isdir(path):
            raise CogVLMError(f"--output {path} is a file; a .parquet output is a folder of parts: name a new one")
        os.makedirs(path, exist_ok=True)
        self.schema = result_schema(key_name, self.several)
        parts = []
        for name in sorted(os.listdir(path)):
            if name.startswith(".") and PARTIAL_MARKER in name:  # left by a kill while it was written
                os.remove(os.path.join(path, name))
            elif name.startswith("part-") and name.endswith(".parquet"):
                parts.append(name)
        for name in parts:
            where = os.path.join(path, name)
            columns = [c for c in pq.read_schema(where).names if c in (key_name, "query")]
            for record in pq.read_table(where, columns=columns).to_pylist():
                self._load(record, where)
        self._next_part = max((int(name[5:-8]) for name in parts if name[5:-8].isdigit()), default=-1) + 1
        self._buffer: List[dict] = []
        self._last_part = time.monotonic()

    def _append(self, rows: List[dict]) -> None:
        self._buffer.extend(rows)
        if len(self._buffer) >= PART_ROWS or time.monotonic() - self._last_part >= PART_SECONDS:
            self.flush()

    def flush(self) -> None:
        # taken from the buffer before the write: an interrupt in between loses rows (redone on resume),
        # never writes them twice
        rows, self._buffer = self._buffer, []
        self._last_part = time.monotonic()
        if not rows:
            return
        name = f"part-{self._next_part:05d}.parquet"
        self._next_part += 1
        partial = os.path.join(self.path, f".{name}{PARTIAL_MARKER}{os.getpid()}")
        pq.write_table(pa.Table.from_pylist(rows, schema=self.schema), partial)
        os.replace(partial, os.path.join(self.path, name))


@contextlib.contextmanager
def open_output(path: str, key_name: str, queries: Sequence[str]) -> Iterator[Output]:
    """The output at `path` (.parquet: a folder of parts; anything else: JSON lines), locked against a
    second run, flushed and closed on the way out (an exception included)."""
    folder, name = os.path.split(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise CogVLMError(f"--output {path}: folder {folder} does not exist; create it first")
    lock = filelock.FileLock(os.path.join(folder, f".{name}.lock"))
    try:
        lock.acquire(timeout=0)
    except filelock.Timeout:
        raise CogVLMError(f"another run is writing {path}; wait for it to end or give another --output") from None
    try:
        kind = ParquetOutput if path.rstrip("/").endswith(".parquet") else JsonlOutput
        output = kind(path, key_name, queries)
        if output.rows_before:
            logger.info("%s: %d rows from earlier runs", path, output.rows_before)
        try:
            yield output
        finally:
            output.close()
            if output.duplicates:
                logger.info("%s: %d rows dropped, their (key, query) was written already (a retried input)", path,
                            output.duplicates)
    finally:
        lock.release()
