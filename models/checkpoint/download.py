"""Downloading checkpoints from the Hugging Face hub: released SAT zips and HF-format repos.

    download_released("cogvlm-chat-v1.1", "THUDM/CogVLM", "cogvlm-chat-v1.1.zip", "$SAT_HOME/cogvlm-chat-v1.1")
    download_hub_repo("THUDM/cogvlm-chat-hf")   # -> the snapshot directory in the HF cache

Transfers go through huggingface_hub (its progress bars, its cache, HF_ENDPOINT, HF_HUB_OFFLINE, HF_HOME).
A released zip is unpacked into a hidden sibling of its target and renamed into place (atomic.py), under a
file lock (`$SAT_HOME/.locks/<name>.lock`), so that concurrent processes (torchrun ranks) download and unpack
once: the others wait for the lock and then find the directory.

Resume across processes: huggingface_hub 2.4 writes each download to `blobs/<etag>.<random>.incomplete`,
opened afresh by every process and left behind when the process is killed. Before handing a file to the
library we look for such partials of the file's blob; holding the library's own lock for that blob (so no
live download owns them), we continue the largest with the library's `http_get` (a Range request from its
size), check its size and sha256 against the hub's ETag, and move it to where the library keeps the blob;
the library then finds the blob and only links it. The other partials of that blob are removed.
"""
import contextlib
import glob
import hashlib
import logging
import os
import re
import shutil
import zipfile
import zlib
from typing import Dict, Iterator, List, Optional
from urllib.parse import urlsplit

import httpx2
from filelock import FileLock, Timeout
from huggingface_hub import (HfApi, RepoFile, constants, get_hf_file_metadata, hf_hub_download, hf_hub_url,
                             snapshot_download, try_to_load_from_cache)
from huggingface_hub.errors import (HfHubHTTPError, LocalEntryNotFoundError, RemoteEntryNotFoundError,
                                    RepositoryNotFoundError, RevisionNotFoundError)
from huggingface_hub.file_download import http_get, repo_folder_name
from huggingface_hub.utils import build_hf_headers, filter_repo_objects
from tqdm import tqdm

from models.checkpoint import hf_format, sat_format
from models.checkpoint.atomic import atomic_output_dir, is_disk_full
from models.errors import CheckpointError

logger = logging.getLogger(__name__)

# The first request to the hub: short enough that an unreachable hub is reported well within 15 s (the
# library's own first attempt waits 10 s and then retries for up to 60 s; its telemetry look-up adds 3 s).
PROBE_TIMEOUT_S = 8.0
# What an HF-format checkpoint needs (not the repo's remote code: models/hf_cogvlm is ours).
HF_FILE_PATTERNS = ["*.safetensors", "*.safetensors.index.json", "config.json", "generation_config.json",
                    "tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]
DOWNLOAD_HINT = ("to download by hand: get {file} from {endpoint}/{repo} and unzip it into {sat_home} (a folder "
                 "{name}/ with model_config.json), or pass a checkpoint directory (SAT or HF format) to --from_pretrained")
_REPO_PART = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_COPY_CHUNK = 16 << 20


class CorruptArchiveError(CheckpointError):
    """A zip whose data does not read back (bad CRC, truncated): the download, not the release, is wrong."""


def is_hub_repo_id(text: str) -> bool:
    """Whether `text` reads as a hub model repo id `owner/name` (call it only for what is not a directory)."""
    parts = text.split("/")
    return (len(parts) == 2 and all(_REPO_PART.fullmatch(part) for part in parts)
            and not any(".." in part or "--" in part or part.endswith(".") for part in parts))


def is_offline(local_files_only: bool) -> bool:
    """Whether the hub must not be asked: `local_files_only`, or HF_HUB_OFFLINE as huggingface_hub reads it."""
    return local_files_only or constants.is_offline_mode()


def hub_endpoint() -> str:
    """The hub's base URL ($HF_ENDPOINT, default https://huggingface.co), as huggingface_hub reads it."""
    return constants.ENDPOINT


def _gb(nbytes: int) -> str:
    return f"{nbytes / 1e9:.2f} GB"


# Released SAT checkpoints ------------------------------------------------------------------------

def download_released(name: str, repo_id: str, filename: str, target: str, local_files_only: bool = False) -> str:
    """Make `target` (`$SAT_HOME/<name>`) from the zip `filename` of hub repo `repo_id`; returns `target`.

    Offline (`local_files_only` or HF_HUB_OFFLINE=1) only a zip already in the HF cache is used."""
    hint = DOWNLOAD_HINT.format(file=filename, endpoint=hub_endpoint(), repo=repo_id, sat_home=os.path.dirname(target),
                                name=name)
    os.makedirs(os.path.dirname(target), exist_ok=True)
    lock = os.path.join(os.path.dirname(target), ".locks", f"{name}.lock")
    os.makedirs(os.path.dirname(lock), exist_ok=True)
    with _exclusive(lock, f"downloading {name}"):
        if os.path.isdir(target):  # another process made it while we waited
            return target
        context = f"checkpoint '{name}' is not in {target}"
        zip_path = _fetch_hub_file(repo_id, filename, context, hint, local_files_only,
                                   unpack_dir=os.path.dirname(target))
        try:
            unpack_checkpoint_zip(zip_path, target)
        except CorruptArchiveError as error:
            _remove_cached_file(zip_path)
            raise CheckpointError(f"{error}; it was removed from the HF cache: run again to download it anew") from None
    logger.info("checkpoint %s is ready in %s; its zip stays in the HF cache (%s)", name, target, zip_path)
    return target


def _fetch_hub_file(repo_id: str, filename: str, context: str, hint: str, local_files_only: bool,
                    unpack_dir: str) -> str:
    """The local path of `repo_id/filename` in the HF cache, downloaded (or resumed) when missing."""
    cache = constants.HF_HUB_CACHE
    lookup = f"{repo_id}/{filename}"
    if is_offline(local_files_only):
        cached = try_to_load_from_cache(repo_id, filename, cache_dir=cache)
        if isinstance(cached, str):
            return cached
        raise CheckpointError(f"{context}, and offline ({_offline_reason(local_files_only)}) the HF cache {cache} "
                              f"has no {lookup}; nothing was downloaded; {hint}")
    with _hub_errors(context, lookup, hint):
        meta = get_hf_file_metadata(hf_hub_url(repo_id, filename, endpoint=hub_endpoint()), timeout=PROBE_TIMEOUT_S)
        cached = try_to_load_from_cache(repo_id, filename, cache_dir=cache, revision=meta.commit_hash)
        if isinstance(cached, str):
            return cached
        storage = os.path.join(cache, repo_folder_name(repo_id=repo_id, repo_type="model"))
        partial = max((os.path.getsize(p) for p in _partials(storage, meta.etag)), default=0)
        size = meta.size or 0
        check_free_space({storage: size - partial, unpack_dir: size}, f"{lookup} ({_gb(size)}) and its unpacked copy")
        logger.info("downloading %s (%s) from %s into the HF cache %s", lookup, _gb(size), hub_endpoint(), cache)
        resume_partial_blob(cache, repo_id, filename, meta.etag, meta.location, meta.size)
        return hf_hub_download(repo_id, filename, revision=meta.commit_hash, cache_dir=cache, endpoint=hub_endpoint())


def unpack_checkpoint_zip(zip_path: str, target: str) -> None:
    """Unpack a SAT checkpoint zip into the new directory `target`: its members either at the top
    (`model_config.json`, `latest`, `1/...`) or in one top folder (`cogvlm-chat-v1.1/...`). Written into a
    hidden sibling and renamed into place; a corrupt or unexpected archive is one CheckpointError line and
    leaves nothing behind."""
    fix = "nothing was unpacked"
    try:
        with zipfile.ZipFile(zip_path) as archive:
            members = [m for m in archive.infolist() if not m.is_dir() and not m.filename.startswith("__MACOSX/")]
            prefix = _checkpoint_root(zip_path, [m.filename for m in members])
            total = sum(m.file_size for m in members)
            check_free_space({os.path.dirname(os.path.abspath(target)): total}, f"unpacking {zip_path}")
            with atomic_output_dir(target, "checkpoint directory") as partial, \
                    tqdm(total=total, unit="B", unit_scale=True, desc=f"unpacking {os.path.basename(target)}") as bar:
                for member in members:
                    _extract(archive, member, os.path.join(partial, *member.filename[len(prefix):].split("/")), bar)
                if not sat_format.is_sat_dir(partial):
                    raise CheckpointError(f"the archive {zip_path} holds no SAT checkpoint; {fix}")
    except (zipfile.BadZipFile, zlib.error, EOFError) as error:
        raise CorruptArchiveError(f"the archive {zip_path} is corrupt ({error}); {fix}") from None
    except NotImplementedError as error:  # a compression zipfile cannot read
        raise CheckpointError(f"cannot unpack {zip_path} ({error}); {fix}") from None


def _checkpoint_root(zip_path: str, names: List[str]) -> str:
    """'' when model_config.json is at the top of the archive, 'top/' when everything is in one folder."""
    if sat_format.CONFIG_FILE in names:
        prefix = ""
    else:
        tops = {name.split("/", 1)[0] for name in names}
        prefix = f"{tops.pop()}/" if len(tops) == 1 and "/" in names[0] else None
        if prefix is None or f"{prefix}{sat_format.CONFIG_FILE}" not in names:
            raise CheckpointError(f"unexpected archive {zip_path}: no {sat_format.CONFIG_FILE} at its top or in one top "
                                  "folder, so it is not a SAT checkpoint; nothing was unpacked")
    for name in names:
        relative = name[len(prefix):]
        if not name.startswith(prefix) or relative.startswith("/") or ".." in relative.split("/") or "\\" in relative:
            raise CheckpointError(f"unexpected archive {zip_path}: member '{name}' would land outside the "
                                  "checkpoint folder; nothing was unpacked")
    return prefix


def _remove_cached_file(path: str) -> None:
    """Remove a file of the HF cache: its blob and the snapshot link to it."""
    blob = os.path.realpath(path)
    for name in (blob, path):
        with contextlib.suppress(FileNotFoundError):
            os.remove(name)


def _extract(archive: zipfile.ZipFile, member: zipfile.ZipInfo, dest: str, bar: tqdm) -> None:
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    with archive.open(member) as src, open(dest, "wb") as dst:
        while chunk := src.read(_COPY_CHUNK):  # the member's CRC is checked when it has been read to its end
            dst.write(chunk)
            bar.update(len(chunk))


# HF-format repos ---------------------------------------------------------------------------------

def download_hub_repo(repo_id: str, local_files_only: bool = False) -> str:
    """The snapshot directory of hub repo `repo_id` (an HF-format checkpoint: safetensors, config, index and
    tokenizer files when present) in the HF cache, downloaded or resumed when missing."""
    hint = (f"to download by hand: `hf download {repo_id}` with a network (then pass --local_files_only), or pass "
            "the checkpoint directory itself (SAT or HF format) to --from_pretrained")
    context = f"'{repo_id}' is not a local directory"
    lookup = f"model repo {repo_id}"
    cache = constants.HF_HUB_CACHE
    if is_offline(local_files_only):
        try:
            return snapshot_download(repo_id, cache_dir=cache, local_files_only=True, allow_patterns=HF_FILE_PATTERNS)
        except (LocalEntryNotFoundError, OSError, ValueError):
            raise CheckpointError(f"{context}, and offline ({_offline_reason(local_files_only)}) the HF cache {cache} "
                                  f"has no complete {lookup}; nothing was downloaded; {hint}") from None
    api = HfApi(endpoint=hub_endpoint())
    not_found = (f"'{repo_id}' is neither a checkpoint directory nor a model repo on {hub_endpoint()} (private or gated "
                 "repos need `hf auth login`); pass an existing directory, a hub repo id in HF format or a released "
                 "name")
    with _hub_errors(context, lookup, hint, not_found):
        commit = api.repo_info(repo_id, timeout=PROBE_TIMEOUT_S).sha
        files = list(filter_repo_objects([f for f in api.list_repo_tree(repo_id, revision=commit, recursive=True)
                                          if isinstance(f, RepoFile)], allow_patterns=HF_FILE_PATTERNS,
                                         key=lambda f: f.path))
        if hf_format.CONFIG_FILE not in {f.path for f in files}:
            raise CheckpointError(f"hub repo '{repo_id}' has no {hf_format.CONFIG_FILE}, so it is not an HF-format "
                                  "checkpoint; pass an HF-format repo id, a released name (SAT zips) or a directory")
        missing = [f for f in files
                   if not isinstance(try_to_load_from_cache(repo_id, f.path, cache_dir=cache, revision=commit), str)]
        storage = os.path.join(cache, repo_folder_name(repo_id=repo_id, repo_type="model"))
        check_free_space({storage: sum(f.size for f in missing)}, lookup)
        for f in missing:
            if _partials(storage, f.lfs.sha256 if f.lfs is not None else f.blob_id):
                meta = get_hf_file_metadata(hf_hub_url(repo_id, f.path, revision=commit, endpoint=hub_endpoint()),
                                            timeout=PROBE_TIMEOUT_S)
                resume_partial_blob(cache, repo_id, f.path, meta.etag, meta.location, meta.size)
        return snapshot_download(repo_id, revision=commit, cache_dir=cache, endpoint=hub_endpoint(),
                                 allow_patterns=HF_FILE_PATTERNS)


# Resume, space, locks, errors --------------------------------------------------------------------

def _partials(storage: str, etag: Optional[str]) -> List[str]:
    """Partial downloads of blob `etag` that huggingface_hub left in the repo's cache folder `storage`."""
    if not etag:
        return []
    return glob.glob(os.path.join(glob.escape(os.path.join(storage, "blobs")), f"{glob.escape(etag)}.*.incomplete"))


def resume_partial_blob(cache: str, repo_id: str, filename: str, etag: str, url: str, size: Optional[int]) -> bool:
    """Finish the largest abandoned partial download of blob `etag` (file `filename` of `repo_id`, served at
    `url`, `size` bytes) with a Range request and put it where huggingface_hub keeps the blob; remove the
    other partials. Returns whether a blob was completed this way."""
    storage = os.path.join(cache, repo_folder_name(repo_id=repo_id, repo_type="model"))
    if not _partials(storage, etag):
        return False
    blob = os.path.join(storage, "blobs", etag)
    lock_path = os.path.join(cache, ".locks", repo_folder_name(repo_id=repo_id, repo_type="model"), f"{etag}.lock")
    os.makedirs(os.path.dirname(lock_path), exist_ok=True)
    with FileLock(lock_path, mode=0o664):  # the library's lock for this blob: no live download owns the partials
        partials = sorted(_partials(storage, etag), key=os.path.getsize, reverse=True)
        keep = None if os.path.exists(blob) or not partials else partials.pop(0)
        for stale in partials:
            logger.info("removing %s, an abandoned partial download", stale)
            os.remove(stale)
        if keep is None:
            return False
        done = os.path.getsize(keep)
        if size is not None and done > size:
            os.remove(keep)
            return False
        logger.info("resuming %s/%s at %s of %s", repo_id, filename, _gb(done), _gb(size or 0))
        headers = build_hf_headers()
        if urlsplit(url).netloc != urlsplit(hub_endpoint()).netloc:
            headers.pop("authorization", None)  # a signed CDN url, as the library does: no token to third parties
        with open(keep, "r+b") as f:
            f.seek(0, os.SEEK_END)
            http_get(url, f, resume_size=done, headers=headers, expected_size=size, displayed_filename=filename)
        if _SHA256.fullmatch(etag) and _sha256(keep) != etag:
            os.remove(keep)
            logger.warning("resumed %s does not match its checksum; downloading it anew", filename)
            return False
        os.replace(keep, blob)
    return True


def _sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def check_free_space(needs: Dict[str, int], what: str) -> None:
    """Refuse to start writing when the disk lacks room: `needs` maps a directory to the bytes that will be
    written there (directories on one filesystem add up)."""
    by_device: Dict[int, list] = {}
    for directory, nbytes in needs.items():
        existing = os.path.abspath(directory)
        while not os.path.exists(existing):
            existing = os.path.dirname(existing)
        entry = by_device.setdefault(os.stat(existing).st_dev, [existing, 0, []])
        entry[1] += max(nbytes, 0)
        entry[2].append(directory)
    for existing, nbytes, directories in by_device.values():
        free = shutil.disk_usage(existing).free
        if free < nbytes:
            raise CheckpointError(f"not enough disk space for {what}: {_gb(nbytes)} needed in {' and '.join(directories)}, "
                                  f"{_gb(free)} free; free some space or point SAT_HOME (checkpoints) and HF_HOME "
                                  "(the download cache) at a larger disk")


@contextlib.contextmanager
def _exclusive(lock_path: str, what: str) -> Iterator[None]:
    lock = FileLock(lock_path, mode=0o664)
    try:
        lock.acquire(timeout=1)
    except Timeout:
        logger.info("waiting for another process %s (lock %s)", what, lock_path)
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


def _offline_reason(local_files_only: bool) -> str:
    return "--local_files_only" if local_files_only else "HF_HUB_OFFLINE=1"


@contextlib.contextmanager
def _hub_errors(context: str, lookup: str, hint: str, not_found: Optional[str] = None) -> Iterator[None]:
    """Library and network errors as one CheckpointError line: what was looked up where, and the way out."""
    endpoint = hub_endpoint()
    try:
        yield
    except CheckpointError:
        raise
    except RepositoryNotFoundError:
        raise CheckpointError(not_found or f"{context}, and {endpoint} has no {lookup} (private or gated repos need "
                                           f"`hf auth login`); {hint}") from None
    except (RevisionNotFoundError, RemoteEntryNotFoundError):
        raise CheckpointError(f"{context}, and {endpoint} has no {lookup}; {hint}") from None
    except (httpx2.TransportError, HfHubHTTPError, LocalEntryNotFoundError) as error:
        raise CheckpointError(f"{context}, and the hub {endpoint} could not be reached for {lookup} "
                              f"({_one_line(error)}); {hint}") from None
    except OSError as error:
        if is_disk_full(error):
            raise CheckpointError(f"no space left while downloading {lookup}; the partial download is kept and "
                                  "resumed next time: free disk space and run again") from None
        raise CheckpointError(f"{context}, and downloading {lookup} from {endpoint} failed ({_one_line(error)}); "
                              f"run again to resume, or {hint}") from None


def _one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}".rstrip(": ")
