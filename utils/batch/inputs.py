"""What `--images` names, read as rows: one input kind per run.

    inputs = resolve_inputs(["shards/00000.tar", "shards/00001.tar"])
    for row in inputs.rows():                   # plain dicts, as a Ray worker gets them too
        item = inputs.format.item(row)          # key, image source or bytes, or why there is none
        image = item.image()                    # utils.vision's loading and limits (ImageError)

Kinds: a folder (its images, recursively, keyed `file` by their path under it), image files or URLs and
.txt lists of them (one a line, relative paths from the list's folder; keyed `file` as written), webdataset
.tar shards (img2dataset's layout, key.jpg + key.json; keyed `key` by the sample key, unique across shards)
or .parquet files (an image-bytes, 🤗-datasets image or path/URL column, keyed `key` by --key_column).
"""
import collections
import os
import tarfile
from dataclasses import dataclass
from typing import Iterator, List, Optional, Sequence

import pyarrow as pa
import pyarrow.parquet as pq
import webdataset
from PIL import Image

from models.errors import CogVLMError, ImageError
from utils.vision import image_from_bytes, load_image

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
WEBDATASET_IMAGE_FIELDS = ("jpg", "jpeg", "png", "webp")  # img2dataset's encode formats
PARQUET_IMAGE_COLUMNS = ("image", "jpg", "jpeg", "png", "webp", "url")  # tried in order without --image_column
DEFAULT_KEY_COLUMN = "key"  # img2dataset's
SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz")
URL_PREFIXES = ("http://", "https://", "data:")
READ_ROWS = 64  # rows per table read at a time
FILES_PER_UNIT = 1024  # image files per read unit (Inputs.units)


@dataclass
class Item:
    """One input: its key, where its image comes from (a path or URL, or, with `data`, where the bytes
    were read: named in errors), and why it has none (`error`)."""
    key: str
    source: str
    data: Optional[bytes] = None
    error: Optional[str] = None

    def image(self) -> Image.Image:
        """The decoded RGB image (utils.vision's limits), or ImageError."""
        if self.error is not None:
            raise ImageError(self.error)
        if self.data is not None:
            return image_from_bytes(self.data, self.source)
        return load_image(self.source)


@dataclass(frozen=True)
class RowFormat:
    """Where a row of one input kind ("files", "webdataset" or "parquet") keeps its key and image.
    image_column: the webdataset field or parquet column (webdataset, None: the first image field present)."""
    kind: str
    key_column: str
    image_column: Optional[str] = None

    @property
    def key_name(self) -> str:
        """The key's name in the result rows."""
        return "file" if self.kind == "files" else "key"

    @property
    def fields(self) -> List[str]:
        """webdataset: the sample fields that may hold the image, in the order they are tried."""
        return [self.image_column] if self.image_column else list(WEBDATASET_IMAGE_FIELDS)

    def key(self, row: dict) -> str:
        key = row.get(self.key_column)
        if key is None:
            raise CogVLMError(f"an input row has no {self.key_column!r}; every row needs a key to resume by")
        return key if isinstance(key, str) else str(key)

    def item(self, row: dict) -> Item:
        key = self.key(row)
        if self.kind == "files":
            return Item(key, row["source"])
        if self.kind == "webdataset":
            source = f"{row.get('__url__')}: {key}"
            for field in self.fields:
                if row.get(field) is not None:
                    return Item(key, f"{source}.{field}", data=row[field])
            return Item(key, source, error=f"webdataset sample {source} has no {'/'.join(self.fields)} file; name "
                                           "its image field with --image_column")
        value = row.get(self.image_column)
        if isinstance(value, dict):  # a 🤗 datasets Image column: {"bytes", "path"}
            value = value.get("bytes") or value.get("path")
        if isinstance(value, (bytes, bytearray)):
            return Item(key, f"parquet row {key} ({self.image_column})", data=bytes(value))
        if isinstance(value, str) and value:
            return Item(key, value)
        return Item(key, f"parquet row {key}", error=f"parquet row {key} has no image in column {self.image_column!r}")

    def read_unit(self, unit: dict) -> Iterator[pa.Table]:
        """The rows of one read unit (Inputs.units): the columns `item` reads, READ_ROWS at a time."""
        if "files" in unit:
            for start in range(0, len(unit["files"]), READ_ROWS):
                yield pa.Table.from_pylist(unit["files"][start:start + READ_ROWS])
            return
        path = unit["path"]
        try:
            if self.kind == "parquet":
                batches = pq.ParquetFile(path).iter_batches(batch_size=READ_ROWS, row_groups=[unit["row_group"]],
                                                            columns=[self.key_column, self.image_column])
                for batch in batches:
                    yield pa.Table.from_batches([batch])
                return
            schema = pa.schema([("__key__", pa.string()), ("__url__", pa.string())] +
                               [(field, pa.binary()) for field in self.fields])
            rows = []
            for sample in webdataset.WebDataset(path, shardshuffle=False, empty_check=False):
                rows.append({name: sample.get(name) for name in schema.names})
                if len(rows) == READ_ROWS:
                    yield pa.Table.from_pylist(rows, schema=schema)
                    rows = []
            if rows:
                yield pa.Table.from_pylist(rows, schema=schema)
        except (OSError, ValueError, tarfile.TarError, pa.ArrowException) as e:
            raise CogVLMError(f"{path} cannot be read past the rows written so far ({type(e).__name__}); repair or "
                              "remove it, then run again (done rows are kept)") from None


@dataclass
class Inputs:
    """What --images names: the row format, and the rows (files) or the shard / parquet paths to read."""
    format: RowFormat
    files: List[dict]
    paths: List[str]

    @property
    def count(self) -> Optional[int]:
        """How many inputs there are, where that is known before reading."""
        return len(self.files) if self.format.kind == "files" else None

    def units(self, files_per_unit: int = FILES_PER_UNIT) -> List[dict]:
        """The inputs cut into read units, each read whole by one task: a webdataset shard {"path"}, a parquet
        row group {"path", "row_group"}, or {"files": up to `files_per_unit` file rows}."""
        if self.format.kind == "files":
            return [{"files": self.files[start:start + files_per_unit]}
                    for start in range(0, len(self.files), files_per_unit)]
        if self.format.kind == "parquet":
            return [{"path": path, "row_group": group} for path in self.paths
                    for group in range(pq.ParquetFile(path).num_row_groups)]
        return [{"path": path} for path in self.paths]

    def rows(self) -> Iterator[dict]:
        """Every input row, read in this process."""
        for unit in self.units():
            for table in self.format.read_unit(unit):
                yield from table.to_pylist()


def read_units(units: pa.Table, row_format: RowFormat) -> Iterator[pa.Table]:
    """A Ray read task's body: the rows of a table of read units."""
    for unit in units.to_pylist():
        yield from row_format.read_unit(unit)


def find_images(folder: str) -> List[str]:
    """Image files under `folder` (by extension, recursively), as sorted paths relative to it."""
    found = []
    for root, _, names in os.walk(folder):
        found += [os.path.relpath(os.path.join(root, name), folder) for name in names
                  if name.lower().endswith(IMAGE_EXTENSIONS)]
    return sorted(found)


def _kind(argument: str) -> str:
    name = argument.lower()
    if name.startswith(URL_PREFIXES):
        return "files"
    return "webdataset" if name.endswith(SHARD_SUFFIXES) else "parquet" if name.endswith(".parquet") else "files"


def _file_rows(argument: str, only_argument: bool) -> List[dict]:
    if argument.startswith(URL_PREFIXES):
        return [{"file": argument, "source": argument}]
    if os.path.isdir(argument):  # one folder keeps the old keys: paths under it
        return [{"file": name if only_argument else os.path.join(argument, name),
                 "source": os.path.abspath(os.path.join(argument, name))} for name in find_images(argument)]
    if argument.endswith(".txt"):
        folder = os.path.dirname(os.path.abspath(argument))
        with open(argument, encoding="utf-8") as f:
            entries = [line.strip() for line in f if line.strip()]
        return [{"file": entry, "source": entry if entry.startswith(URL_PREFIXES)
                 else os.path.join(folder, os.path.expanduser(entry))} for entry in entries]
    return [{"file": argument, "source": os.path.abspath(argument)}]


def _parquet_format(paths: Sequence[str], image_column: Optional[str], key_column: Optional[str]) -> RowFormat:
    """The columns to read, checked against every file's schema (a footer read each)."""
    for path in paths:
        schema = pq.read_schema(path)
        names = ", ".join(schema.names)
        image = image_column or next((c for c in PARQUET_IMAGE_COLUMNS if c in schema.names), None)
        if image is None:
            raise CogVLMError(f"parquet file {path} has none of the columns {', '.join(PARQUET_IMAGE_COLUMNS)}; name "
                              f"its image column with --image_column (its columns: {names})")
        if image not in schema.names:
            raise CogVLMError(f"parquet file {path} has no column {image!r} (--image_column); its columns: {names}")
        key = key_column or DEFAULT_KEY_COLUMN
        if key not in schema.names:
            raise CogVLMError(f"parquet file {path} has no column {key!r} to key its rows by; name a column of unique "
                              f"values with --key_column (its URL column will do; its columns: {names})")
        image_column, key_column = image, key
    return RowFormat("parquet", key_column, image_column)


def resolve_inputs(arguments: Sequence[str], image_column: Optional[str] = None,
                   key_column: Optional[str] = None) -> Inputs:
    """Read what the --images arguments name (a folder, image files or URLs, .txt lists, .tar shards or
    .parquet files; one kind), checking it exists. CogVLMError names a bad argument."""
    for argument in arguments:
        if not argument.startswith(URL_PREFIXES) and not os.path.exists(argument):
            raise CogVLMError(f"--images {argument} does not exist; give a folder, image files or URLs, .txt lists "
                              "of them, webdataset .tar shards or .parquet files")
    kinds = {_kind(argument) for argument in arguments}
    if len(kinds) > 1:
        raise CogVLMError(f"--images mixes {' and '.join(sorted(kinds))} inputs; give one kind per run")
    kind = kinds.pop()
    paths = [os.path.abspath(argument) for argument in arguments]
    if kind != "parquet" and key_column is not None:
        raise CogVLMError("--key_column applies to parquet inputs only; webdataset samples and files have their keys")
    if kind == "parquet":
        return Inputs(_parquet_format(paths, image_column, key_column), [], paths)
    if kind == "webdataset":
        return Inputs(RowFormat("webdataset", "__key__", image_column), [], paths)
    if image_column is not None:
        raise CogVLMError("--image_column applies to webdataset and parquet inputs only; drop it for image files")
    files = [row for argument in arguments for row in _file_rows(argument, len(arguments) == 1)]
    seen = set()
    for row in files:
        if row["file"] in seen:
            raise CogVLMError(f"--images names {row['file']} twice; each input needs its own name to resume by")
        seen.add(row["file"])
    return Inputs(RowFormat("files", "file"), files, paths)


def read_queries(queries: Optional[Sequence[str]], queries_file: Optional[str], no_prompt: bool) -> List[str]:
    """The questions asked about every image: --query (repeated) then --queries_file's lines (blank ones
    skipped); --no_prompt: the empty query alone."""
    if no_prompt:
        if queries or queries_file:
            raise CogVLMError("--no_prompt sends the image with an empty query; drop --query / --queries_file")
        return [""]
    found = list(queries or [])
    if queries_file is not None:
        try:
            with open(queries_file, encoding="utf-8") as f:
                found += [line.strip() for line in f if line.strip()]
        except OSError as e:
            raise CogVLMError(f"cannot read --queries_file {queries_file} ({e.strerror}); check the path") from None
    if not found:
        raise CogVLMError("no question to ask: give --query (repeat it for several) or --queries_file")
    repeated = [query for query, count in collections.Counter(found).items() if count > 1]
    if repeated:
        raise CogVLMError(f"the query {repeated[0]!r} is asked twice; each query gets its own row, ask it once")
    return found
