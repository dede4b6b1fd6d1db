"""A stand-in for the Hugging Face hub's file endpoints, on 127.0.0.1, for the download tests.

It speaks enough of the protocol for huggingface_hub 2.4's `hf_hub_download` / `snapshot_download` /
`get_hf_file_metadata` / `HfApi.repo_info` / `HfApi.list_repo_tree`:

    HEAD|GET /{owner}/{name}/resolve/{revision}/{path}   ETag, X-Repo-Commit, Content-Length, Range -> 206
    GET      /api/models/{owner}/{name}[/revision/{revision}]   {"id", "sha", "siblings"}
    GET      /api/models/{owner}/{name}/tree/{revision}         [{"type": "file", "path", "size", "oid", "lfs"}]

Large files (.zip, .safetensors) are served as LFS files (ETag = their sha256, as the hub does); an unknown
repo answers 404 RepoNotFound and an unknown file 404 EntryNotFound. Every request is recorded in
`requests` (method, path, Range header), so a test can count full transfers, Range requests or any request
at all. Test knobs: `stall_after[path] = n` sends the first n bytes of a full GET of `path` and then holds
the connection until `release()`; `hold()` makes every file body wait until `let_go()`; `hang` accepts
connections and never answers (an unreachable hub).
"""
import hashlib
import http.server
import json
import re
import threading
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional
from urllib.parse import unquote, urlsplit

LFS_SUFFIXES = (".zip", ".safetensors")
_RESOLVE = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)$")
_API = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)(?:/revision/(?P<rev>[^/]+))?$")
_TREE = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)/tree/(?P<rev>[^/]+)$")


@dataclass
class Request:
    method: str
    path: str
    range: Optional[str]


@dataclass
class _Repo:
    files: Dict[str, bytes] = field(default_factory=dict)

    @property
    def commit(self) -> str:
        digest = hashlib.sha1()
        for name in sorted(self.files):
            digest.update(name.encode() + hashlib.sha1(self.files[name]).digest())
        return digest.hexdigest()


def _is_lfs(path: str) -> bool:
    return path.endswith(LFS_SUFFIXES)


def _git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _etag(path: str, data: bytes) -> str:
    """The hub's ETag: an LFS file's sha256, else its git blob id."""
    return hashlib.sha256(data).hexdigest() if _is_lfs(path) else _git_blob_id(data)


class HubStub:
    def __init__(self):
        self.repos: Dict[str, _Repo] = {}
        self.requests: List[Request] = []
        self.stall_after: Dict[str, int] = {}
        self.hang = False
        self._released = threading.Event()
        self._gate = threading.Event()
        self._gate.set()
        self._lock = threading.Lock()
        self._server: Optional[http.server.ThreadingHTTPServer] = None

    # setup ---------------------------------------------------------------------------------
    def add_file(self, repo_id: str, path: str, data: bytes) -> None:
        self.repos.setdefault(repo_id, _Repo()).files[path] = data

    def etag(self, repo_id: str, path: str) -> str:
        return _etag(path, self.repos[repo_id].files[path])

    def commit(self, repo_id: str) -> str:
        return self.repos[repo_id].commit

    def start(self) -> "HubStub":
        stub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_HEAD(self):
                stub._handle(self, body=False)

            def do_GET(self):
                stub._handle(self, body=True)

            def log_message(self, *args):
                pass

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def release(self) -> None:
        """Let stalled transfers end (their connection is closed, the rest never sent)."""
        self._released.set()

    def hold(self) -> None:
        """File bodies wait (headers not yet sent) until `let_go()`."""
        self._gate.clear()

    def let_go(self) -> None:
        self._gate.set()

    def stop(self) -> None:
        self.release()
        self.let_go()
        self.hang = False
        self._server.shutdown()
        self._server.server_close()

    # what the tests count ------------------------------------------------------------------
    def file_gets(self, path: str) -> List[Request]:
        with self._lock:
            return [r for r in self.requests if r.method == "GET" and "/resolve/" in r.path and r.path.endswith("/" + path)]

    def full_transfers(self, path: str) -> int:
        return sum(1 for r in self.file_gets(path) if r.range is None)

    def range_requests(self, path: str) -> List[str]:
        return [r.range for r in self.file_gets(path) if r.range is not None]

    # protocol ------------------------------------------------------------------------------
    def _handle(self, handler, body: bool) -> None:
        path = unquote(urlsplit(handler.path).path)
        with self._lock:
            self.requests.append(Request(handler.command, path, handler.headers.get("Range")))
        if self.hang:
            while self.hang:
                time.sleep(0.05)
            return
        match = _RESOLVE.match(path)
        if match:
            return self._resolve(handler, match["repo"], match["rev"], match["path"], body)
        match = _TREE.match(path)
        if match and handler.command == "GET":
            return self._tree(handler, match["repo"], match["rev"])
        match = _API.match(path)
        if match and handler.command == "GET":
            return self._repo_info(handler, match["repo"], match["rev"] or "main")
        self._send(handler, 404, {"X-Error-Code": "RepoNotFound"}, b'{"error": "not found"}', body)

    def _repo(self, handler, repo_id: str, rev: str, body: bool) -> Optional[_Repo]:
        repo = self.repos.get(repo_id)
        if repo is None:
            self._send(handler, 404, {"X-Error-Code": "RepoNotFound"}, b'{"error": "Repository not found"}', body)
            return None
        if rev not in ("main", repo.commit):
            self._send(handler, 404, {"X-Error-Code": "RevisionNotFound"}, b'{"error": "Invalid rev id"}', body)
            return None
        return repo

    def _repo_info(self, handler, repo_id: str, rev: str) -> None:
        repo = self._repo(handler, repo_id, rev, True)
        if repo is not None:
            info = {"id": repo_id, "sha": repo.commit, "siblings": [{"rfilename": name} for name in sorted(repo.files)]}
            self._send_json(handler, info)

    def _tree(self, handler, repo_id: str, rev: str) -> None:
        repo = self._repo(handler, repo_id, rev, True)
        if repo is None:
            return
        entries = []
        for name in sorted(repo.files):
            data = repo.files[name]
            entry = {"type": "file", "path": name, "size": len(data), "oid": _git_blob_id(data)}
            if _is_lfs(name):
                entry["lfs"] = {"oid": _etag(name, data), "size": len(data), "pointerSize": 134}
            entries.append(entry)
        self._send_json(handler, entries)

    def _resolve(self, handler, repo_id: str, rev: str, path: str, body: bool) -> None:
        repo = self._repo(handler, repo_id, rev, body)
        if repo is None:
            return
        if path not in repo.files:
            self._send(handler, 404, {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": repo.commit},
                       b'{"error": "Entry not found"}', body)
            return
        data = repo.files[path]
        headers = {"ETag": f'"{_etag(path, data)}"', "X-Repo-Commit": repo.commit, "Accept-Ranges": "bytes",
                   "Content-Type": "application/octet-stream"}
        start = _range_start(handler.headers.get("Range"))
        if start is not None and start >= len(data):
            self._send(handler, 416, {**headers, "Content-Range": f"bytes */{len(data)}"}, b"", body)
            return
        status, payload = 200, data
        if start is not None:
            status, payload = 206, data[start:]
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        if not body:
            self._send(handler, status, headers, payload, body=False)
            return
        self._gate.wait()
        stall = self.stall_after.get(path) if start is None else None
        if stall is None:
            self._send(handler, status, headers, payload, body=True)
            return
        self._send_headers(handler, status, headers, len(payload))
        try:
            handler.wfile.write(payload[:stall])
            handler.wfile.flush()
            self._released.wait()
        except (BrokenPipeError, ConnectionResetError):
            pass
        handler.close_connection = True

    # sending -------------------------------------------------------------------------------
    def _send_json(self, handler, obj) -> None:
        self._send(handler, 200, {"Content-Type": "application/json"}, json.dumps(obj).encode(), True)

    @staticmethod
    def _send_headers(handler, status: int, headers: Dict[str, str], length: int) -> None:
        handler.send_response(status)
        for key, value in headers.items():
            handler.send_header(key, value)
        handler.send_header("Content-Length", str(length))
        handler.end_headers()

    def _send(self, handler, status: int, headers: Dict[str, str], payload: bytes, body: bool) -> None:
        try:
            self._send_headers(handler, status, headers, len(payload))
            if body:
                handler.wfile.write(payload)
        except (BrokenPipeError, ConnectionResetError):
            handler.close_connection = True


def _range_start(header: Optional[str]) -> Optional[int]:
    """The first byte of a `bytes=N-` Range header (the only form huggingface_hub sends), else None."""
    if not header:
        return None
    match = re.fullmatch(r"bytes=(\d+)-", header.strip())
    return int(match.group(1)) if match else None
