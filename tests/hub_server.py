"""A Hugging Face Hub on 127.0.0.1 for the tests: the few HTTP endpoints huggingface_hub's own client
calls to create a repository, commit files to it, resolve a revision, list its files and download
them. With HF_ENDPOINT pointing here, `captioner push` and `Captioner.from_pretrained("org/name")`
run huggingface_hub's real upload and download code, and its cache is laid out by huggingface_hub
itself. Files are committed inline ("regular" upload mode), so no LFS or Xet storage is needed."""

from __future__ import annotations

import base64
import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

import yaml


def git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class Repository:
    def __init__(self):
        self.commits: dict[str, dict[str, bytes]] = {}  # commit -> path -> content
        self.refs: dict[str, str] = {}  # branch -> commit

    def resolve(self, revision: str) -> str | None:
        return self.refs.get(revision) or (revision if revision in self.commits else None)

    def commit(self, branch: str, files: dict[str, bytes]) -> str:
        tree = {**self.commits.get(self.refs.get(branch, ""), {}), **files}
        sha = hashlib.sha1(json.dumps({p: git_blob_id(d) for p, d in sorted(tree.items())}).encode()
                           + str(len(self.commits)).encode()).hexdigest()
        self.commits[sha] = tree
        self.refs[branch] = sha
        return sha


class LocalHub:
    """`with LocalHub() as hub:` serves on `hub.url`; `hub.requests` records (method, path) of every call."""

    def __init__(self):
        self.repos: dict[str, Repository] = {}
        self.requests: list[tuple[str, str]] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _reply(self, status: int, body: bytes = b"", headers: dict | None = None, send_body: bool = True):
                self.send_response(status)
                for name, value in {"Content-Length": str(len(body)), **(headers or {})}.items():
                    self.send_header(name, value)
                self.end_headers()
                if send_body:
                    self.wfile.write(body)

            def _json(self, status: int, value, headers: dict | None = None):
                self._reply(status, json.dumps(value).encode(), {"Content-Type": "application/json", **(headers or {})})

            def _not_found(self, what: str):
                # huggingface_hub reads these headers to tell a missing repository from a missing file
                code = "RepoNotFound" if what == "repository" else "EntryNotFound" if what == "file" else "RevisionNotFound"
                self._json(404, {"error": f"{what} not found"}, {"X-Error-Code": code, "X-Error-Message": f"{what} not found"})

            def _route(self, send_body: bool = True):
                path = urlsplit(self.path).path
                hub.requests.append((self.command, path))
                parts = [unquote(p) for p in path.strip("/").split("/")]
                if parts[:2] == ["api", "models"] and len(parts) >= 6:
                    repo_id, action, revision = "/".join(parts[2:4]), parts[4], parts[5]
                    repo = hub.repos.get(repo_id)
                    if repo is None:
                        return self._not_found("repository")
                    if self.command == "POST":
                        return self._post(repo_id, repo, action, revision)
                    commit = repo.resolve(revision)
                    if commit is None:
                        return self._not_found("revision")
                    files = repo.commits[commit]
                    if action == "revision":
                        return self._json(200, {"id": repo_id, "modelId": repo_id, "sha": commit, "private": False,
                                                "siblings": [{"rfilename": p} for p in sorted(files)]})
                    if action == "tree":
                        return self._json(200, [{"type": "file", "path": p, "size": len(d), "oid": git_blob_id(d)}
                                                for p, d in sorted(files.items())])
                if len(parts) >= 5 and parts[2] == "resolve":
                    repo = hub.repos.get("/".join(parts[:2]))
                    if repo is None:
                        return self._not_found("repository")
                    commit = repo.resolve(parts[3])
                    if commit is None:
                        return self._not_found("revision")
                    data = repo.commits[commit].get("/".join(parts[4:]))
                    if data is None:
                        return self._not_found("file")
                    return self._reply(200, data, {"X-Repo-Commit": commit, "ETag": f'"{git_blob_id(data)}"',
                                                   "Content-Type": "application/octet-stream"}, send_body)
                if parts == ["api", "validate-yaml"] and self.command == "POST":
                    # the model card's metadata block (between its first two '---' lines) must be a YAML
                    # mapping, as the Hub checks it
                    content = json.loads(self._body())["content"]
                    head, sep, rest = content.partition("---\n")
                    try:
                        metadata = yaml.safe_load(rest.partition("\n---")[0]) if not head and sep else None
                    except yaml.YAMLError as err:
                        return self._json(400, {"errors": [{"message": str(err)}], "warnings": []})
                    if not isinstance(metadata, dict):
                        return self._json(400, {"errors": [{"message": "metadata is not a mapping"}], "warnings": []})
                    return self._json(200, {"errors": [], "warnings": []})
                if parts == ["api", "repos", "create"] and self.command == "POST":
                    body = json.loads(self._body() or b"{}")
                    repo_id = f"{body.get('organization')}/{body['name']}" if body.get("organization") else body["name"]
                    hub.repos.setdefault(repo_id, Repository())
                    return self._json(200, {"url": f"{hub.url}/{repo_id}", "name": repo_id})
                self._json(404, {"error": f"no route {self.command} {path}"})

            def _body(self) -> bytes:
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _post(self, repo_id: str, repo: Repository, action: str, revision: str):
                body = self._body()
                if action == "preupload":
                    files = json.loads(body)["files"]
                    return self._json(200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                                      for f in files]})
                if action == "commit":
                    files = {}
                    for line in body.decode().splitlines():
                        entry = json.loads(line)
                        if entry["key"] == "file":
                            files[entry["value"]["path"]] = base64.b64decode(entry["value"]["content"])
                    commit = repo.commit(revision, files)
                    return self._json(200, {"commitOid": commit, "commitUrl": f"{hub.url}/{repo_id}/commit/{commit}",
                                            "success": True})
                self._json(404, {"error": f"no route POST {action}"})

            def do_GET(self):
                self._route()

            def do_HEAD(self):
                self._route(send_body=False)

            def do_POST(self):
                self._route()

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> "LocalHub":
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
