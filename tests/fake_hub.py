"""A local stand-in for the Hugging Face Hub endpoints that `create_repo` and `upload_folder` call.

huggingface_hub is pointed at it with HF_ENDPOINT (and HF_HUB_DISABLE_XET=1, so large files take the
LFS path, which plain HTTP can serve). It speaks just enough of the protocol, as huggingface_hub 1.x/2.x
uses it, and records every request so that tests can check what was sent:

    POST /api/repos/create                          -> {"url"}; 409 when the repo exists
    POST /api/validate-yaml                         -> {} (README front matter check)
    POST /api/models/{repo}/branch/{branch}         -> {}; 409 when it exists
    POST /api/models/{repo}/preupload/{revision}    -> uploadMode per file: lfs for *.safetensors
    POST /{repo}.git/info/lfs/objects/batch         -> a basic-transfer upload href per object
    PUT  /lfs-upload/{oid}                          -> stores the bytes (sha256 checked)
    POST /api/models/{repo}/commit/{revision}       -> NDJSON header/file/lfsFile lines become the repo files
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class Request:
    method: str
    path: str
    headers: dict[str, str]  # lower-case names
    body: bytes


@dataclass
class FakeHub:
    requests: list[Request] = field(default_factory=list)
    repos: dict[str, dict[str, Any]] = field(default_factory=dict)  # repo -> {private, branches: {b: files}}
    lfs: dict[str, bytes] = field(default_factory=dict)
    url: str = ""

    def files(self, repo: str, branch: str = "main") -> dict[str, bytes]:
        return self.repos[repo]["branches"][branch]

    def paths(self) -> list[str]:
        return [f"{r.method} {r.path.split('?')[0]}" for r in self.requests]

    def token_leaks(self, token: str) -> list[str]:
        """Where the token, or any 17 consecutive characters of it, appears in a recorded request other
        than as the value `Bearer <token>` of its Authorization header: the path and query, every other
        header (name and value), the body as sent, and the file contents a commit carries base64-encoded.
        Every request is scanned, /api/ or not (the LFS batch and the LFS PUTs included)."""
        needles = {token[i : i + 17] for i in range(len(token) - 16)} or {token}
        leaks = []
        for r in self.requests:
            where = f"{r.method} {r.path.split('?')[0]}"
            places = {"path": r.path, "body": r.body.decode("latin-1")}
            for name, value in r.headers.items():
                if name == "authorization" and value == f"Bearer {token}":
                    continue
                places[f"header {name}"] = f"{name}: {value}"
            if "/commit/" in r.path:
                for i, line in enumerate(r.body.splitlines()):
                    content = json.loads(line).get("value", {}).get("content")
                    if isinstance(content, str):
                        places[f"commit line {i} (decoded)"] = base64.b64decode(content).decode("latin-1")
            leaks += [
                f"{where}: {place}" for place, text in places.items() if any(n in text for n in needles)
            ]
        return leaks


def _handler(hub: FakeHub, lock: threading.Lock) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: Any) -> None:  # keep pytest output clean
            pass

        def _body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                out = b""
                while True:
                    size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                    if size == 0:
                        self.rfile.readline()
                        return out
                    out += self.rfile.read(size)
                    self.rfile.readline()
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def _send(self, status: int, payload: Any) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_PUT(self) -> None:
            self._dispatch("PUT")

        def do_POST(self) -> None:
            self._dispatch("POST")

        def do_GET(self) -> None:
            self._dispatch("GET")

        def _dispatch(self, method: str) -> None:
            body = self._body()
            with lock:
                hub.requests.append(
                    Request(method, self.path, {k.lower(): v for k, v in self.headers.items()}, body)
                )
                status, payload = self._route(method, self.path.split("?")[0], body)
            self._send(status, payload)

        def _route(self, method: str, path: str, body: bytes) -> tuple[int, Any]:
            if method == "POST" and path == "/api/repos/create":
                req = json.loads(body)
                repo = f"{req['organization']}/{req['name']}"
                if repo in hub.repos:
                    # the real Hub names the existing repo; huggingface_hub 2.x reads "url" from it
                    return 409, {"error": "You already created this model repo", "url": f"{hub.url}/{repo}"}
                hub.repos[repo] = {"private": req.get("visibility") == "private", "branches": {"main": {}}}
                return 200, {"url": f"{hub.url}/{repo}"}
            if method == "POST" and path == "/api/validate-yaml":
                return 200, {}
            if m := re.fullmatch(r"/api/models/([^/]+/[^/]+)/branch/(.+)", path):
                branches = hub.repos[m[1]]["branches"]
                if m[2] in branches:
                    return 409, {"error": "branch exists"}
                branches[m[2]] = dict(branches["main"])
                return 200, {}
            if m := re.fullmatch(r"/api/models/([^/]+/[^/]+)/preupload/(.+)", path):
                files = json.loads(body)["files"]
                modes = [
                    {
                        "path": f["path"],
                        "uploadMode": "lfs" if f["path"].endswith(".safetensors") else "regular",
                        "shouldIgnore": False,
                        "oid": None,
                    }
                    for f in files
                ]
                return 200, {"files": modes}
            if m := re.fullmatch(r"/([^/]+/[^/]+)\.git/info/lfs/objects/batch", path):
                objects = json.loads(body)["objects"]
                return 200, {
                    "transfer": "basic",
                    "objects": [
                        {
                            "oid": o["oid"],
                            "size": o["size"],
                            "actions": {"upload": {"href": f"{hub.url}/lfs-upload/{o['oid']}"}},
                        }
                        for o in objects
                    ],
                }
            if method == "PUT" and (m := re.fullmatch(r"/lfs-upload/([0-9a-f]{64})", path)):
                if hashlib.sha256(body).hexdigest() != m[1]:
                    return 400, {"error": "sha256 mismatch"}
                hub.lfs[m[1]] = body
                return 200, {}
            if m := re.fullmatch(r"/api/models/([^/]+/[^/]+)/commit/(.+)", path):
                repo, branch = m[1], m[2]
                if repo not in hub.repos or branch not in hub.repos[repo]["branches"]:
                    return 404, {"error": "Repository or revision not found"}
                files = hub.repos[repo]["branches"][branch]
                for line in body.splitlines():
                    item = json.loads(line)
                    value = item["value"]
                    if item["key"] == "file":
                        files[value["path"]] = base64.b64decode(value["content"])
                    elif item["key"] == "lfsFile":
                        if value["oid"] not in hub.lfs:
                            return 422, {"error": f"LFS object {value['oid']} was never uploaded"}
                        files[value["path"]] = hub.lfs[value["oid"]]
                oid = hashlib.sha1(body).hexdigest()
                return 200, {"commitUrl": f"{hub.url}/{repo}/commit/{oid}", "commitOid": oid}
            return 404, {"error": f"fake hub: no route for {method} {path}"}

    return Handler


class running_fake_hub:
    """Context manager: a FakeHub served on 127.0.0.1 at a free port, in a daemon thread."""

    def __enter__(self) -> FakeHub:
        self.hub = FakeHub()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self.hub, threading.Lock()))
        self.hub.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        return self.hub

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
