"""A small local HTTP server that answers the Hugging Face hub's routes that ``snapshot_download``
uses, so the real download code runs in tests without the real hub.

Routes: ``GET /api/models/{repo}/revision/{rev}`` (repo info: the commit sha),
``GET /api/models/{repo}/tree/{sha}`` (the file list), ``HEAD``/``GET /{repo}/resolve/{sha}/{file}``
(a file, with the commit and etag headers the client reads). Errors carry the ``X-Error-Code``
header the client turns into ``RepositoryNotFoundError``, ``RevisionNotFoundError`` or
``GatedRepoError``.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


@dataclass
class FakeRepo:
    revisions: dict[str, dict[str, bytes]]  # revision name -> {file name: content}
    token: str | None = None  # gated: only this bearer token may read it
    truncate: set[str] = field(default_factory=set)  # files served cut short (a dropped connection)

    def sha(self, revision: str) -> str | None:
        if revision in self.revisions:
            return hashlib.sha1(revision.encode()).hexdigest()
        return revision if any(self.sha(name) == revision for name in self.revisions) else None

    def files(self, sha: str) -> dict[str, bytes]:
        return next(files for name, files in self.revisions.items() if self.sha(name) == sha)


def repo_from_dir(directory: Path, **revisions: dict[str, bytes]) -> dict[str, dict[str, bytes]]:
    """``{"main": files of directory, **revisions}``."""
    main = {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}
    return {"main": main, **revisions}


class FakeHub:
    def __init__(self, repos: dict[str, FakeRepo]) -> None:
        self.repos = repos
        self.requests: list[str] = []  # "METHOD path" of every request seen
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                hub._answer(self, body=True)

            def do_HEAD(self) -> None:
                hub._answer(self, body=False)

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def __enter__(self) -> FakeHub:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    # -- routing ------------------------------------------------------------------------

    def _answer(self, h: BaseHTTPRequestHandler, body: bool) -> None:
        path = h.path.split("?")[0]
        self.requests.append(f"{h.command} {path}")
        for pattern, route in (
            (r"/api/models/(.+?)/revision/(.+)", self._info),
            (r"/api/models/(.+?)/tree/([^/]+)", self._tree),
            (r"/(.+?)/resolve/([^/]+)/(.+)", self._file),
        ):
            match = re.fullmatch(pattern, path)
            if match:
                return route(h, body, *match.groups())
        self._error(h, 404, "EntryNotFound", f"no route {path}")

    def _repo(self, h: BaseHTTPRequestHandler, name: str) -> FakeRepo | None:
        repo = self.repos.get(name)
        if repo is None:
            self._error(h, 404, "RepoNotFound", f"Repository {name} not found")
            return None
        if repo.token is not None and h.headers.get("Authorization") != f"Bearer {repo.token}":
            self._error(
                h,
                401 if h.headers.get("Authorization") is None else 403,
                "GatedRepo",
                f"Access to model {name} is restricted",
            )
            return None
        return repo

    def _sha(self, h: BaseHTTPRequestHandler, repo: FakeRepo, revision: str) -> str | None:
        sha = repo.sha(revision)
        if sha is None:
            self._error(h, 404, "RevisionNotFound", f"Invalid rev id: {revision}")
        return sha

    def _info(self, h: BaseHTTPRequestHandler, body: bool, name: str, revision: str) -> None:
        repo = self._repo(h, name)
        sha = repo and self._sha(h, repo, revision)
        if sha:
            siblings = [{"rfilename": f} for f in sorted(repo.files(sha))]
            self._json(h, {"id": name, "modelId": name, "sha": sha, "private": False, "siblings": siblings})

    def _tree(self, h: BaseHTTPRequestHandler, body: bool, name: str, revision: str) -> None:
        repo = self._repo(h, name)
        sha = repo and self._sha(h, repo, revision)
        if sha:
            entries = [
                {"type": "file", "oid": _etag(data), "size": len(data), "path": f}
                for f, data in sorted(repo.files(sha).items())
            ]
            self._json(h, entries)

    def _file(self, h: BaseHTTPRequestHandler, body: bool, name: str, revision: str, filename: str) -> None:
        repo = self._repo(h, name)
        sha = repo and self._sha(h, repo, revision)
        if not sha:
            return
        data = repo.files(sha).get(filename)
        if data is None:
            return self._error(h, 404, "EntryNotFound", f"{filename} not found")
        h.send_response(200)
        h.send_header("Content-Type", "application/octet-stream")
        h.send_header("Content-Length", str(len(data)))
        h.send_header("ETag", f'"{_etag(data)}"')
        h.send_header("X-Repo-Commit", sha)
        h.end_headers()
        if body:
            h.wfile.write(data[: len(data) // 2] if filename in repo.truncate else data)
            if filename in repo.truncate:
                h.close_connection = True

    @staticmethod
    def _json(h: BaseHTTPRequestHandler, payload) -> None:
        raw = json.dumps(payload).encode()
        h.send_response(200)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(raw)))
        h.end_headers()
        h.wfile.write(raw)

    @staticmethod
    def _error(h: BaseHTTPRequestHandler, status: int, code: str, message: str) -> None:
        raw = json.dumps({"error": message}).encode()
        h.send_response(status)
        h.send_header("Content-Type", "application/json")
        h.send_header("X-Error-Code", code)
        h.send_header("X-Error-Message", message)
        h.send_header("Content-Length", str(len(raw)))
        h.end_headers()
        if h.command != "HEAD":
            h.wfile.write(raw)


def _etag(data: bytes) -> str:
    return hashlib.sha1(data).hexdigest()
