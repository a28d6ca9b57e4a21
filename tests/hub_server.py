"""A small local stand-in for the Hugging Face Hub: the endpoints huggingface_hub calls to create a repo,
commit files (regular uploads, no LFS/Xet), list a repo's tree and download a file. In memory, on
127.0.0.1, for the tests only.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlparse

READ_ONLY_TOKEN = "hf_read_only_token_for_tests"


class FakeHub:
    def __init__(self):
        self.repos: dict[str, dict] = {}  # repo_id -> {"private": bool, "files": {path: bytes}, "commits": int}
        self.requests: list[dict] = []  # method, path, headers, body: to check what left the process
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()

    def _handler(self):
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _body(self) -> bytes:
                length = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(length) if length else b""

            def _json(self, status: int, payload) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _record(self, body: bytes) -> None:
                hub.requests.append(
                    {"method": self.command, "path": self.path, "headers": dict(self.headers), "body": body}
                )

            def _token(self) -> str | None:
                auth = self.headers.get("Authorization", "")
                return auth.removeprefix("Bearer ") if auth.startswith("Bearer ") else None

            def _may_write(self) -> bool:
                token = self._token()
                if token is None:
                    self._json(401, {"error": "Invalid credentials"})
                    return False
                if token == READ_ONLY_TOKEN:
                    self._json(403, {"error": "You don't have the rights to write to this repo"})
                    return False
                return True

            def do_POST(self):
                body = self._body()
                self._record(body)
                path = urlparse(self.path).path
                if path == "/api/repos/create":
                    if not self._may_write():
                        return
                    spec = json.loads(body)
                    repo_id = f"{spec['organization']}/{spec['name']}" if spec.get("organization") else spec["name"]
                    if repo_id in hub.repos:
                        return self._json(
                            409, {"error": "You already created this model repo", "url": f"{hub.url}/{repo_id}"}
                        )
                    private = spec["visibility"] == "private" if "visibility" in spec else spec.get("private")
                    hub.repos[repo_id] = {"private": private, "files": {}, "commits": 0, "head": "0" * 40}
                    return self._json(200, {"url": f"{hub.url}/{repo_id}", "name": repo_id, "id": repo_id})
                if path == "/api/validate-yaml":
                    return self._json(200, {"errors": [], "warnings": []})
                match = re.fullmatch(r"/api/models/(.+)/(preupload|commit)/([^/]+)", path)
                if match:
                    if not self._may_write():
                        return
                    repo_id, action = match.group(1), match.group(2)
                    if repo_id not in hub.repos:
                        return self._json(404, {"error": "Repository not found"})
                    if action == "preupload":
                        files = json.loads(body)["files"]
                        return self._json(
                            200,
                            {
                                "files": [
                                    {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files
                                ]
                            },
                        )
                    repo = hub.repos[repo_id]
                    for line in body.decode().splitlines():
                        item = json.loads(line)
                        if item["key"] == "file":
                            repo["files"][item["value"]["path"]] = base64.b64decode(item["value"]["content"])
                        elif item["key"] == "deletedFile":
                            repo["files"].pop(item["value"]["path"], None)
                    repo["commits"] += 1
                    oid = hashlib.sha1(f"{repo_id}{repo['commits']}{id(hub)}".encode()).hexdigest()
                    repo["head"] = oid
                    return self._json(
                        200,
                        {"commitUrl": f"{hub.url}/{repo_id}/commit/{oid}", "commitOid": oid, "pullRequestUrl": None},
                    )
                self._json(404, {"error": f"unknown endpoint {path}"})

            def _file(self, head: bool):
                self._record(b"")
                path = urlparse(self.path).path
                match = re.fullmatch(r"/(.+?/.+?)/resolve/([^/]+)/(.+)", path)
                tree = re.fullmatch(r"/api/models/(.+?/.+?)/tree/([^/]+)(/.*)?", path)
                info = re.fullmatch(r"/api/models/(.+?/.+?)/revision/([^/]+)", path)
                if info:  # repo_info, as snapshot_download asks for it: the head commit and the file list
                    repo = hub.repos.get(info.group(1))
                    if repo is None:
                        return self._json(404, {"error": "Repository not found"})
                    siblings = [{"rfilename": p} for p in sorted(repo["files"])]
                    return self._json(200, {"id": info.group(1), "sha": repo["head"], "siblings": siblings})
                if tree:
                    repo = hub.repos.get(tree.group(1))
                    if repo is None:
                        return self._json(404, {"error": "Repository not found"})
                    entries = [
                        {"type": "file", "path": p, "size": len(d), "oid": hashlib.sha1(d).hexdigest()}
                        for p, d in sorted(repo["files"].items())
                    ]
                    return self._json(200, entries)
                if not match or match.group(1) not in hub.repos:
                    return self._json(404, {"error": "Entry not found"})
                repo_id, file_path = match.group(1), unquote(match.group(3))
                data = hub.repos[repo_id]["files"].get(file_path)
                if data is None:
                    self.send_response(404)
                    self.send_header("X-Error-Code", "EntryNotFound")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.send_header("ETag", f'"{hashlib.sha1(data).hexdigest()}"')
                self.send_header("X-Repo-Commit", hub.repos[repo_id]["head"])  # a new commit id per commit, as the Hub
                self.end_headers()
                if not head:
                    self.wfile.write(data)

            def do_GET(self):
                self._file(head=False)

            def do_HEAD(self):
                self._file(head=True)

        return Handler
