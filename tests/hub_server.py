"""A small Hub-compatible HTTP server for tests: enough of the Hugging Face Hub API for the real `huggingface_hub`
client to create repos, commit files, list them and download them, on 127.0.0.1 and in memory.

Implemented (model repos only, the shapes `huggingface_hub` 2.x parses):

| request | used by |
|---|---|
| `POST /api/repos/create` | `create_repo` (409 with the repo url when it exists) |
| `GET /api/whoami-v2` | `whoami` |
| `POST /api/validate-yaml` | `create_commit` when it commits a `README.md` |
| `GET /api/models/{ns}/{name}[/revision/{rev}][?blobs=1]` | `repo_info` / `model_info` (with `blobs`: each sibling's `blobId`, `size`, `lfs`), `snapshot_download` |
| `GET /api/models/{ns}/{name}/tree/{rev}[/{path}]` | `list_repo_tree`, `list_repo_files`, `snapshot_download` |
| `POST /api/models/{ns}/{name}/preupload/{rev}` | `create_commit`: every file is `"regular"` (no LFS/Xet), with the git oid of the file already at that path so unchanged files are skipped |
| `POST /api/models/{ns}/{name}/commit/{rev}` | `create_commit` (ndjson: header, file, deletedFile, deletedFolder) |
| `HEAD`/`GET /{ns}/{name}/resolve/{rev}/{path}` | `hf_hub_download` (ETag, X-Repo-Commit, Content-Length; never Xet headers) |

Auth: `Authorization: Bearer <token>`; tokens map to a user who may write to its own namespace and to its orgs.
A write without a token is a 401, with an unknown token a 401, to a namespace the user does not own a 403.
Private repos are visible only to the namespace's members (404 `RepoNotFound` for everyone else).

Fault injection: [`LocalHub.fail`] makes the next `times` requests whose path matches a regex answer a status (500,
429 with `Retry-After`, 403...) or reset the connection, before or after the request is applied.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import socket
import struct
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

GITATTRIBUTES = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n*.bin filter=lfs diff=lfs merge=lfs -text\n"
_LAST_MODIFIED = "2024-01-01T00:00:00.000Z"


def git_blob_oid(data: bytes) -> str:
    """The git object id of a blob holding `data` (what the Hub reports as a regular file's `oid`)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Commit:
    oid: str
    message: str
    files: dict[str, bytes]


@dataclass
class Repo:
    repo_id: str
    private: bool
    commits: list[Commit] = field(default_factory=list)

    @property
    def head(self) -> Commit:
        return self.commits[-1]

    def at(self, revision: str) -> Commit | None:
        if revision == "main":
            return self.head
        return next((c for c in self.commits if c.oid == revision), None)


@dataclass
class Fault:
    pattern: re.Pattern
    method: str | None
    status: int | None  # None: reset the connection
    times: int
    headers: dict[str, str]
    after: bool  # apply the request first, then fail (a lost response)


@dataclass
class RequestRecord:
    method: str
    path: str
    status: int  # 0: connection reset
    authenticated: bool


class _HttpError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, headers: dict | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, headers or {}


class LocalHub:
    """An in-memory Hub on `http://127.0.0.1:<port>`; use as a context manager or call `start()`/`stop()`.

    Args:
        tokens: `{token: user}`; each user owns the namespace of its name.
        orgs: `{user: [org, ...]}`: further namespaces a user may write to.
    """

    def __init__(self, tokens: dict[str, str] | None = None, orgs: dict[str, list[str]] | None = None) -> None:
        self.tokens = dict(tokens or {})
        self.orgs = {u: set(v) for u, v in (orgs or {}).items()}
        self.repos: dict[str, Repo] = {}
        self.requests: list[RequestRecord] = []
        self.faults: list[Fault] = []
        self.lock = threading.RLock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._counter = 0
        self.lfs_suffixes: tuple[str, ...] = ()  # tree listings show these files as LFS pointers (like the Hub)

    # ------------------------------------------------------------------ lifecycle

    @property
    def url(self) -> str:
        assert self._server is not None, "server not started"
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> LocalHub:
        hub = self

        class Handler(_Handler):
            server_hub = hub

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="local-hub", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> LocalHub:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # ------------------------------------------------------------------ test helpers

    def fail(
        self,
        path_regex: str,
        *,
        status: int | None = 500,
        times: int = 1,
        method: str | None = None,
        headers: dict[str, str] | None = None,
        after: bool = False,
    ) -> None:
        """The next `times` requests whose path matches `path_regex` (and `method`, if given) answer `status` with
        `headers`, or reset the connection when `status` is None. With `after=True` the request is applied first and
        only its response is replaced (a commit that happened but whose answer was lost)."""
        with self.lock:
            self.faults.append(Fault(re.compile(path_regex), method, status, times, dict(headers or {}), after))

    def clear_faults(self) -> None:
        with self.lock:
            self.faults.clear()

    def count(self, method: str | None = None, path_regex: str | None = None) -> int:
        """How many requests were received (matching `method` and `path_regex`, if given)."""
        with self.lock:
            return sum(
                1
                for r in self.requests
                if (method is None or r.method == method) and (path_regex is None or re.search(path_regex, r.path))
            )

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        """The files of `repo_id` at `revision` (a copy)."""
        with self.lock:
            commit = self.repos[repo_id].at(revision)
            assert commit is not None, revision
            return dict(commit.files)

    def all_stored_blobs(self) -> list[bytes]:
        """Every file content of every commit of every repo."""
        with self.lock:
            return [data for repo in self.repos.values() for c in repo.commits for data in c.files.values()]

    # ------------------------------------------------------------------ internals used by the handler

    def _take_fault(self, method: str, path: str) -> Fault | None:
        with self.lock:
            for fault in self.faults:
                if fault.times > 0 and (fault.method in (None, method)) and fault.pattern.search(path):
                    fault.times -= 1
                    return fault
        return None

    def _new_commit(self, repo: Repo, message: str, files: dict[str, bytes]) -> Commit:
        self._counter += 1
        parent = repo.head.oid if repo.commits else ""
        digest = hashlib.sha1(f"{repo.repo_id}\n{parent}\n{message}\n{self._counter}".encode())
        for path in sorted(files):
            digest.update(path.encode() + b"\0" + git_blob_oid(files[path]).encode())
        commit = Commit(digest.hexdigest(), message, files)
        repo.commits.append(commit)
        return commit

    def _user(self, headers) -> str | None:
        auth = headers.get("Authorization")
        if not auth:
            return None
        token = auth.removeprefix("Bearer ").strip()
        if token not in self.tokens:
            raise _HttpError(401, "Invalid credentials in Authorization header")
        return self.tokens[token]

    def _can_write(self, user: str | None, namespace: str) -> None:
        if user is None:
            raise _HttpError(401, "You must be authenticated to write to a repository.")
        if namespace != user and namespace not in self.orgs.get(user, set()):
            raise _HttpError(403, f"You don't have the rights to write to the namespace {namespace}")

    def _readable_repo(self, user: str | None, repo_id: str) -> Repo:
        repo = self.repos.get(repo_id)
        namespace = repo_id.split("/")[0]
        if repo is None or (
            repo.private and (user is None or (namespace != user and namespace not in self.orgs.get(user, set())))
        ):
            raise _HttpError(404, "Repository not found", "RepoNotFound")
        return repo


def _revision(repo: Repo, rev: str) -> Commit:
    commit = repo.at(unquote(rev))
    if commit is None:
        raise _HttpError(404, f"Invalid rev id: {rev}", "RevisionNotFound")
    return commit


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_hub: LocalHub

    def log_message(self, format: str, *args: Any) -> None:  # keep test output quiet
        pass

    def do_GET(self) -> None:
        self._handle("GET")

    def do_HEAD(self) -> None:
        self._handle("HEAD")

    def do_POST(self) -> None:
        self._handle("POST")

    # ------------------------------------------------------------------ plumbing

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().strip() or b"0", 16)
                if size == 0:
                    self.rfile.readline()
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            return b"".join(chunks)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _handle(self, method: str) -> None:
        hub = self.server_hub
        split = urlsplit(self.path)
        path, query = unquote(split.path), parse_qs(split.query)
        body = self._read_body()
        fault = hub._take_fault(method, path)
        if fault is not None and not fault.after:
            self._answer_fault(method, path, fault)
            return
        try:
            with hub.lock:
                status, headers, payload = self._route(method, path, query, body)
        except _HttpError as err:
            status, payload = err.status, json.dumps({"error": err.message}).encode()
            headers = {"Content-Type": "application/json", "X-Error-Message": err.message, **err.headers}
            if err.code:
                headers["X-Error-Code"] = err.code
        if fault is not None:
            self._answer_fault(method, path, fault)
            return
        self._record(method, path, status)
        self._send(method, status, headers, payload)

    def _answer_fault(self, method: str, path: str, fault: Fault) -> None:
        if fault.status is None:
            self._record(method, path, 0)
            # SO_LINGER 0: closing sends a TCP RST, the client sees "connection reset by peer"
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.close_connection = True
            self.connection.close()
            return
        self._record(method, path, fault.status)
        payload = json.dumps({"error": f"injected {fault.status}"}).encode()
        self._send(method, fault.status, {"Content-Type": "application/json", **fault.headers}, payload)

    def _record(self, method: str, path: str, status: int) -> None:
        with self.server_hub.lock:
            authenticated = self.headers.get("Authorization") is not None
            self.server_hub.requests.append(RequestRecord(method, path, status, authenticated))

    def _send(self, method: str, status: int, headers: dict[str, str], payload: bytes) -> None:
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if method != "HEAD":
            self.wfile.write(payload)

    @staticmethod
    def _json(obj: Any, status: int = 200, headers: dict | None = None) -> tuple[int, dict, bytes]:
        return status, {"Content-Type": "application/json", **(headers or {})}, json.dumps(obj).encode()

    # ------------------------------------------------------------------ routes

    def _route(self, method: str, path: str, query: dict, body: bytes) -> tuple[int, dict, bytes]:
        hub = self.server_hub
        user = hub._user(self.headers)
        if method == "POST" and path == "/api/repos/create":
            return self._create(user, json.loads(body or b"{}"))
        if method == "GET" and path == "/api/whoami-v2":
            if user is None:
                raise _HttpError(401, "Unauthorized")
            orgs = [{"name": o, "type": "org"} for o in sorted(hub.orgs.get(user, ()))]
            return self._json({"type": "user", "name": user, "orgs": orgs, "auth": {"type": "access_token"}})
        if method == "POST" and path == "/api/validate-yaml":
            return self._json({"errors": [], "warnings": []})
        m = re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/revision/([^/]+))?", path)
        if m and method == "GET":
            repo = hub._readable_repo(user, m.group(1))
            commit = _revision(repo, m.group(2) or "main")
            return self._json(
                {
                    "id": repo.repo_id,
                    "modelId": repo.repo_id,
                    "author": repo.repo_id.split("/")[0],
                    "sha": commit.oid,
                    "private": repo.private,
                    "disabled": False,
                    "gated": False,
                    "lastModified": _LAST_MODIFIED,
                    "tags": [],
                    "downloads": 0,
                    "likes": 0,
                    "siblings": [
                        _sibling(p, commit.files[p], "blobs" in query, hub.lfs_suffixes) for p in sorted(commit.files)
                    ],
                }
            )
        m = re.fullmatch(r"/api/models/([^/]+/[^/]+)/tree/([^/]+)(?:/(.+))?", path)
        if m and method == "GET":
            repo = hub._readable_repo(user, m.group(1))
            commit = _revision(repo, m.group(2))
            recursive = query.get("recursive", ["False"])[0].lower() in ("1", "true")
            return self._json(_tree(commit.files, m.group(3) or "", recursive, hub.lfs_suffixes))
        m = re.fullmatch(r"/api/models/([^/]+/[^/]+)/preupload/([^/]+)", path)
        if m and method == "POST":
            repo = hub._readable_repo(user, m.group(1))
            hub._can_write(user, repo.repo_id.split("/")[0])
            commit = _revision(repo, m.group(2))
            files = json.loads(body)["files"]
            out = []
            for f in files:
                existing = commit.files.get(f["path"])
                out.append(
                    {
                        "path": f["path"],
                        "uploadMode": "regular",
                        "shouldIgnore": False,
                        "oid": git_blob_oid(existing) if existing is not None else None,
                    }
                )
            return self._json({"files": out, "commitOid": commit.oid})
        m = re.fullmatch(r"/api/models/([^/]+/[^/]+)/commit/([^/]+)", path)
        if m and method == "POST":
            return self._commit(user, m.group(1), m.group(2), body)
        m = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
        if m and method in ("GET", "HEAD"):
            repo = hub._readable_repo(user, m.group(1))
            commit = _revision(repo, m.group(2))
            data = commit.files.get(m.group(3))
            if data is None:
                raise _HttpError(404, "Entry not found", "EntryNotFound", {"X-Repo-Commit": commit.oid})
            headers = {
                "Content-Type": "application/octet-stream",
                "ETag": f'"{git_blob_oid(data)}"',
                "X-Repo-Commit": commit.oid,
                "Accept-Ranges": "bytes",
            }
            rng = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", ""))
            if rng and method == "GET":
                start = int(rng.group(1))
                headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
                return 206, headers, data[start:]
            return 200, headers, data
        raise _HttpError(404, f"no route for {method} {path}")

    def _create(self, user: str | None, payload: dict) -> tuple[int, dict, bytes]:
        hub = self.server_hub
        if user is None:
            raise _HttpError(401, "You must be authenticated to create a repository.")
        if payload.get("type", "model") != "model":
            raise _HttpError(400, "this test server only hosts model repos")
        namespace = payload.get("organization") or user
        repo_id = f"{namespace}/{payload['name']}"
        url = f"{self._base()}/{repo_id}"
        hub._can_write(user, namespace)
        if repo_id in hub.repos:
            return self._json({"error": "You already created this model repo", "url": url}, status=409)
        private = payload.get("visibility") == "private" or bool(payload.get("private"))
        repo = Repo(repo_id, private)
        hub._new_commit(repo, "initial commit", {".gitattributes": GITATTRIBUTES})
        hub.repos[repo_id] = repo
        return self._json({"url": url, "name": repo_id, "id": repo_id})

    def _commit(self, user: str | None, repo_id: str, rev: str, body: bytes) -> tuple[int, dict, bytes]:
        hub = self.server_hub
        repo = hub._readable_repo(user, repo_id)
        hub._can_write(user, repo_id.split("/")[0])
        if unquote(rev) != "main":
            raise _HttpError(400, "this test server only commits to main")
        files = dict(repo.head.files)
        message = ""
        for line in body.splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            key, value = item["key"], item["value"]
            if key == "header":
                message = value.get("summary", "")
                parent = value.get("parentCommit")
                if parent is not None and parent != repo.head.oid:
                    raise _HttpError(412, "parent commit is not the head of main")
            elif key == "file":
                if value.get("encoding") != "base64":
                    raise _HttpError(400, "only base64 file content is supported")
                files[value["path"]] = base64.b64decode(value["content"])
            elif key == "deletedFile":
                if value["path"] not in files:
                    raise _HttpError(404, "A file with this name doesn't exist", "EntryNotFound")
                del files[value["path"]]
            elif key == "deletedFolder":
                prefix = value["path"].rstrip("/") + "/"
                files = {p: d for p, d in files.items() if not p.startswith(prefix)}
            else:
                raise _HttpError(400, f"unsupported commit operation {key!r} (this server has no LFS)")
        if not message:
            raise _HttpError(400, "commit summary is empty")
        commit = hub._new_commit(repo, message, files)
        return self._json(
            {"success": True, "commitOid": commit.oid, "commitUrl": f"{self._base()}/{repo_id}/commit/{commit.oid}"}
        )

    def _base(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"


def _tree(files: dict[str, bytes], prefix: str, recursive: bool, lfs_suffixes: tuple[str, ...] = ()) -> list[dict]:
    prefix = prefix.strip("/")
    base = prefix + "/" if prefix else ""
    entries, folders = [], set()
    for path in sorted(files):
        if not path.startswith(base):
            continue
        rest = path[len(base) :]
        if "/" in rest and not recursive:
            folders.add(base + rest.split("/")[0])
            continue
        if recursive:
            parts = rest.split("/")[:-1]
            folders.update(base + "/".join(parts[: i + 1]) for i in range(len(parts)))
        data = files[path]
        entry = {"type": "file", "oid": git_blob_oid(data), "size": len(data), "path": path}
        if lfs_suffixes and path.endswith(lfs_suffixes):
            sha256 = hashlib.sha256(data).hexdigest()
            pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {len(data)}\n".encode()
            entry.update(
                oid=git_blob_oid(pointer), lfs={"oid": sha256, "size": len(data), "pointerSize": len(pointer)}
            )
        entries.append(entry)
    folder_entries = [
        {"type": "directory", "oid": hashlib.sha1(f.encode()).hexdigest(), "size": 0, "path": f}
        for f in sorted(folders)
    ]
    return folder_entries + entries


def _sibling(path: str, data: bytes, blobs: bool, lfs_suffixes: tuple[str, ...]) -> dict:
    """A `siblings` entry of a repo's info; with `blobs` (`files_metadata=True`) its blob id, size and LFS info, as
    the tree listing reports them."""
    if not blobs:
        return {"rfilename": path}
    (entry,) = _tree({path: data}, "", True, lfs_suffixes)
    out = {"rfilename": path, "blobId": entry["oid"], "size": entry["size"]}
    if "lfs" in entry:
        out["lfs"] = {"sha256": entry["lfs"]["oid"], "size": entry["size"], "pointerSize": entry["lfs"]["pointerSize"]}
    return out
