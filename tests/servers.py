"""Loopback stand-ins for the download servers, so tests exercise real HTTP without a network.

``FileServer`` serves a folder (the zoo's file host, any checkpoint URL). ``HubServer`` answers the
part of the Hugging Face Hub API that ``hf_hub_download`` and ``HfApi.create_repo`` /
``upload_folder`` use (REFERENCE.md section 5): resolve (HEAD/GET), create repo, preupload and
commit, with every file uploaded inline ("regular" mode). Both run on 127.0.0.1, port 0, in a thread.
"""
from __future__ import annotations

import base64
import functools
import hashlib
import json
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Callable

import yaml

__all__ = ["FileServer", "HubServer"]


class _Quiet:
    def log_message(self, *args) -> None:  # keep pytest output clean
        pass


class _Server:
    """A ThreadingHTTPServer on a free loopback port; use as a context manager."""

    def __init__(self, handler) -> None:
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        if self.thread.is_alive():
            self.httpd.shutdown()
        self.httpd.server_close()


class FileServer(_Server):
    """Serves ``root`` read-only; ``requests`` counts GETs per path (to prove caching).

    Paths in ``truncate`` send only the first half of the file, then close the connection.
    ``framing[path]`` says how a body's end is announced: "length" (Content-Length, the default),
    "chunked" (chunked transfer encoding, whose last chunk a truncated reply never sends) or
    "close" (neither: the body ends when the connection closes). ``slow[path]`` is a delay in
    seconds before each 4 KiB block (to kill a client mid-transfer).
    """

    def __init__(self, root: str | Path) -> None:
        self.requests: dict[str, int] = {}
        self.truncate: set[str] = set()
        self.framing: dict[str, str] = {}
        self.slow: dict[str, float] = {}
        server = self

        class Handler(_Quiet, SimpleHTTPRequestHandler):
            def do_GET(self):
                path = urllib.parse.urlparse(self.path).path
                server.requests[path] = server.requests.get(path, 0) + 1
                if path not in server.truncate | server.framing.keys() | server.slow.keys():
                    return super().do_GET()
                body = (Path(self.directory) / path.lstrip("/")).read_bytes()
                framing = server.framing.get(path, "length")
                self.protocol_version = "HTTP/1.1"  # chunked replies need it
                self.send_response(200)
                if framing == "length":
                    self.send_header("Content-Length", str(len(body)))
                elif framing == "chunked":
                    self.send_header("Transfer-Encoding", "chunked")
                self.send_header("Connection", "close")
                self.end_headers()
                sent = body[: len(body) // 2] if path in server.truncate else body
                for start in range(0, len(sent), 4096):
                    time.sleep(server.slow.get(path, 0.0))
                    block = sent[start:start + 4096]
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(block), block) if framing == "chunked" else block)
                if framing == "chunked" and path not in server.truncate:
                    self.wfile.write(b"0\r\n\r\n")
                self.close_connection = True

        super().__init__(functools.partial(Handler, directory=str(root)))


class HubServer(_Server):
    """An in-memory Hub: ``repos[repo_id] = {"refs": {branch: sha}, "commits": {sha: {path: bytes}}}``.

    ``after_download`` runs as each file is served (its bytes already chosen), e.g. to move a branch
    between two requests.
    """

    def __init__(self) -> None:
        self.repos: dict[str, dict] = {}
        self.lock = threading.Lock()
        self.after_download: Callable[[str, str], None] | None = None  # (repo_id, path) of each file GET
        super().__init__(self._handler())

    def commit(self, repo_id: str, files: dict[str, bytes], branch: str = "main") -> str:
        """Add a commit holding ``files`` on top of ``branch``; returns its 40-hex sha."""
        with self.lock:
            repo = self.repos.setdefault(repo_id, {"refs": {}, "commits": {}})
            parent = repo["commits"].get(repo["refs"].get(branch), {})
            tree = {**parent, **files}
            digests = sorted((path, hashlib.sha256(data).hexdigest()) for path, data in tree.items())
            sha = hashlib.sha1(repr((repo_id, len(repo["commits"]), digests)).encode()).hexdigest()
            repo["commits"][sha] = tree
            repo["refs"][branch] = sha
            return sha

    def add_folder(self, repo_id: str, folder: str | Path) -> str:
        return self.commit(repo_id, {p.name: p.read_bytes() for p in Path(folder).iterdir() if p.is_file()})

    @staticmethod
    def validate_card(content: str) -> list[str]:
        """The Hub's README check, reduced to what matters here: YAML metadata with a licence."""
        head, sep, _ = content.removeprefix("---\n").partition("\n---\n")
        if not content.startswith("---\n") or not sep:
            return ["README.md has no YAML front matter"]
        meta = yaml.safe_load(head)
        return [f"missing {key}" for key in ("license", "library_name", "tags") if key not in meta]

    def _resolve(self, repo_id: str, revision: str):
        repo = self.repos.get(repo_id)
        if repo is None:
            return None, None
        sha = repo["refs"].get(revision, revision)
        return sha, repo["commits"].get(sha)

    def _handler(self):
        hub = self

        class Handler(_Quiet, BaseHTTPRequestHandler):
            def _reply(self, code: int, body: bytes = b"", headers: dict | None = None, head: bool = False):
                self.send_response(code)
                for key, value in {"Content-Length": str(len(body)), **(headers or {})}.items():
                    self.send_header(key, value)
                self.end_headers()
                if not head:
                    self.wfile.write(body)

            def _json(self, code: int, obj) -> None:
                self._reply(code, json.dumps(obj).encode(), {"Content-Type": "application/json"})

            def _error(self, code: int, error_code: str, head: bool = False) -> None:
                self._reply(code, json.dumps({"error": error_code}).encode(),
                            {"X-Error-Code": error_code, "Content-Type": "application/json"}, head)

            def _file(self, head: bool) -> None:
                parts = [urllib.parse.unquote(p) for p in urllib.parse.urlparse(self.path).path.split("/")]
                if len(parts) < 6 or parts[3] != "resolve":
                    return self._error(404, "RepoNotFound", head)
                repo_id, revision, name = f"{parts[1]}/{parts[2]}", parts[4], "/".join(parts[5:])
                sha, tree = hub._resolve(repo_id, revision)
                if sha is None:
                    return self._error(404, "RepoNotFound", head)
                if tree is None:
                    return self._error(404, "RevisionNotFound", head)
                if name not in tree:
                    return self._error(404, "EntryNotFound", head)
                body = tree[name]
                headers = {"X-Repo-Commit": sha, "ETag": f'"{hashlib.sha256(body).hexdigest()}"'}
                if not head and hub.after_download is not None:  # before the reply: the client waits for it
                    hub.after_download(repo_id, name)
                self._reply(200, body, headers, head)

            def do_HEAD(self):
                self._file(head=True)

            def do_GET(self):
                self._file(head=False)

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                path = urllib.parse.unquote(urllib.parse.urlparse(self.path).path)
                if path == "/api/repos/create":
                    payload = json.loads(body)
                    repo_id = f"{payload['organization']}/{payload['name']}" if payload.get("organization") \
                        else payload["name"]
                    if repo_id in hub.repos:
                        return self._error(409, "RepoExists")
                    with hub.lock:
                        hub.repos[repo_id] = {"refs": {}, "commits": {}}
                    return self._json(200, {"url": f"{hub.url}/{repo_id}"})
                if path == "/api/validate-yaml":
                    errors = hub.validate_card(json.loads(body)["content"])
                    return self._json(400 if errors else 200, {"errors": [{"message": e} for e in errors]})
                parts = path.split("/")  # /api/models/org/name/(preupload|commit)/revision
                repo_id, action, revision = f"{parts[3]}/{parts[4]}", parts[5], parts[6]
                if repo_id not in hub.repos:
                    return self._error(404, "RepoNotFound")
                if action == "preupload":
                    files = json.loads(body)["files"]
                    return self._json(200, {"files": [{"path": f["path"], "uploadMode": "regular",
                                                       "shouldIgnore": False} for f in files]})
                items = [json.loads(line) for line in body.splitlines() if line.strip()]
                files = {i["value"]["path"]: base64.b64decode(i["value"]["content"])
                         for i in items if i["key"] == "file"}
                sha = hub.commit(repo_id, files, branch=revision)
                return self._json(200, {"commitUrl": f"{hub.url}/{repo_id}/commit/{sha}", "commitOid": sha})

        return Handler
