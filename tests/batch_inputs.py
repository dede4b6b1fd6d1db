"""The batch_infer tests' inputs: the same JPEG images as a folder, as webdataset shards in img2dataset's layout
(key.jpg + key.json + key.txt) and as parquet files (image bytes, and paths), each with broken entries."""
import io
import json
import os
import sys
import tarfile
from dataclasses import dataclass
from typing import Dict, List

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from conftest import ROOT

SCENES = os.path.join(ROOT, "checkpoints", "cogvlm-tiny-scenes")
SCRIPT = os.path.join(ROOT, "scripts", "batch_infer.py")
PICTURES = ["scene_1", "scene_2", "shapes", "house"]
BROKEN = b"\xff\xd8\xff not really a jpeg"
QUERIES = ["What is in the image?", "Where is the circle?"]


def jpeg(picture: str) -> bytes:
    buffer = io.BytesIO()
    Image.open(os.path.join(ROOT, "assets", f"{picture}.png")).convert("RGB").save(buffer, "JPEG", quality=95)
    return buffer.getvalue()


@dataclass
class Dataset:
    """images: key -> the picture it shows (None: broken, or no image at all)."""
    folder: str
    shards: List[str]
    parquet: str
    images: Dict[str, str]


def make_dataset(folder: str, count: int = 8) -> Dataset:
    """`count` images (the PICTURES in turn; the 4th is broken, the 7th of the shards has no image file), as a
    folder of key.jpg, webdataset shards of 4 and one parquet file in row groups of 4 (columns key, jpg, url,
    caption)."""
    images, rows = {}, []
    os.makedirs(os.path.join(folder, "images"), exist_ok=True)
    for index in range(count):
        key = f"{index // 4:05d}{index % 4:04d}"  # img2dataset's: shard number + index in the shard
        picture = None if index % 8 == 3 else PICTURES[index % len(PICTURES)]
        data = BROKEN if picture is None else jpeg(picture)
        path = os.path.join(folder, "images", f"{key}.jpg")
        with open(path, "wb") as f:
            f.write(data)
        images[key] = picture
        rows.append({"key": key, "jpg": data, "url": path, "caption": f"caption {index}"})
    shards = []
    for shard in range((count + 3) // 4):
        shards.append(os.path.join(folder, f"{shard:05d}.tar"))
        with tarfile.open(shards[-1], "w") as tar:
            for index, row in enumerate(rows[4 * shard:4 * shard + 4], 4 * shard):
                files = {"json": json.dumps({"key": row["key"], "url": row["url"], "status": "success"}).encode(),
                         "txt": row["caption"].encode()}
                if index % 8 != 6:
                    files["jpg"] = row["jpg"]
                for extension, data in sorted(files.items()):
                    info = tarfile.TarInfo(f"{row['key']}.{extension}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    parquet = os.path.join(folder, "images.parquet")
    pq.write_table(pa.Table.from_pylist(rows), parquet, row_group_size=4)
    return Dataset(os.path.join(folder, "images"), shards, parquet, images)


def flags(images, output, *extra, queries=QUERIES, max_new_tokens=12, batch_size=2) -> List[str]:
    return ["--from_pretrained", SCENES, "--device", "cpu", "--images", *images, "--output", str(output),
            "--max_new_tokens", str(max_new_tokens), "--batch_size", str(batch_size),
            *[flag for query in queries for flag in ("--query", query)], *extra]


def command(images, output, *extra, **kwargs) -> List[str]:
    return [sys.executable, SCRIPT, *flags(images, output, *extra, **kwargs)]


def read_rows(output) -> List[dict]:
    """An output's rows as dicts without empty fields (JSON lines or a parquet folder)."""
    output = str(output)
    if output.endswith(".parquet"):
        rows = pq.read_table(output).to_pylist()
    else:
        with open(output, encoding="utf-8") as f:
            rows = [json.loads(line) for line in f]
    return [{name: value for name, value in row.items() if value is not None} for row in rows]


def by_key(rows, key_name="key"):
    """{(key, query): row}, checking that no (key, query) has two rows."""
    table = {}
    for row in rows:
        pair = (row[key_name], row.get("query"))
        assert pair not in table, f"two rows for {pair}"
        table[pair] = row
    return table
