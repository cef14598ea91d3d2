"""A small in-memory Hugging Face Hub for tests: the HTTP endpoints huggingface_hub 2.4 uses to create repos,
commit files (regular and LFS) and download them, served on 127.0.0.1 from a thread.

Endpoints (model repos only; `{rev}` is a branch, `refs/pr/N` or a commit id):
    POST /api/repos/create                          create a repo with an initial .gitattributes commit
    POST /api/models/{repo}/branch/{branch}         create a branch from main
    GET  /api/models/{repo}[/revision/{rev}]        repo info: sha, private, siblings
    GET  /api/models/{repo}/tree/{rev}[/{path}]     file listing (?recursive=true)
    POST /api/models/{repo}/preupload/{rev}         upload mode per file ("lfs" / "regular") + remote oid
    POST /{repo}.git/info/lfs/objects/batch         LFS batch API: where to PUT each missing object
    PUT  /lfs-objects/{sha256}                      the LFS "basic" transfer upload
    POST /api/models/{repo}/commit/{rev}            ndjson commit: header, file, lfsFile, deletedFile/Folder
    POST /api/validate-yaml                         README metadata check (YAML parse)
    HEAD|GET /{repo}/resolve/{rev}/{path}           file download with ETag, X-Repo-Commit, Content-Length

Write endpoints (except the LFS PUT, a pre-signed URL on the real Hub) need `Authorization: Bearer <token>`;
private repos are invisible without it. Failures can be injected per route (`fail(route, status, times)`) to
exercise huggingface_hub's retries and error reporting.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import PurePosixPath
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".model", ".h5", ".msgpack")
LFS_MIN_SIZE = 10 * 1024 * 1024
GITATTRIBUTES = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n*.bin filter=lfs diff=lfs merge=lfs -text\n"
REPO = r"(?P<repo>[\w.-]+/[\w.-]+)"


def git_blob_oid(content: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


@dataclass(frozen=True)
class Blob:
    content: bytes
    lfs: bool

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.content).hexdigest()

    @property
    def oid(self) -> str:
        """What preupload reports and the client compares: sha256 for LFS files, git blob sha1 otherwise."""
        return self.sha256 if self.lfs else git_blob_oid(self.content)

    @property
    def etag(self) -> str:
        return self.sha256 if self.lfs else git_blob_oid(self.content)

    def tree_entry(self, path: str) -> dict:
        entry = {"type": "file", "path": path, "size": len(self.content)}
        if self.lfs:
            pointer = lfs_pointer(self.sha256, len(self.content))
            entry |= {"oid": git_blob_oid(pointer), "lfs": {"oid": self.sha256, "size": len(self.content),
                                                           "pointerSize": len(pointer)}}
        else:
            entry["oid"] = git_blob_oid(self.content)
        return entry


@dataclass
class Commit:
    oid: str
    message: str
    files: dict[str, Blob]


@dataclass
class Repo:
    private: bool
    commits: dict[str, Commit] = field(default_factory=dict)
    refs: dict[str, str] = field(default_factory=dict)  # branch or refs/pr/N -> commit oid

    def resolve(self, revision: str) -> Commit | None:
        oid = self.refs.get(revision, revision)
        return self.commits.get(oid)


class HubError(Exception):
    def __init__(self, status: int, code: str | None = None, message: str = "", headers: dict | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers or {}


class FakeHub:
    """Start with ``with FakeHub(token) as hub:``; ``hub.url`` is the endpoint to give huggingface_hub."""

    def __init__(self, token: str):
        self.token = token
        self.repos: dict[str, Repo] = {}
        self.lfs_objects: dict[str, bytes] = {}
        self.requests: list[tuple[str, str]] = []  # (method, path) of every request, in order
        self.unhandled: list[tuple[str, str]] = []
        self.authorizations: set[str] = set()
        self._failures: dict[str, list[int]] = {}
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> "FakeHub":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    # ------------------------------------------------------------------ inspection and fault injection
    def fail(self, route: str, status: int, times: int = 1) -> None:
        """Answer the next ``times`` requests of ``route`` (a handler name, e.g. "preupload") with ``status``."""
        self._failures[route] = [status] * times

    def commit_count(self, repo_id: str) -> int:
        return len(self.repos[repo_id].commits)

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        return {path: blob.content for path, blob in self.repos[repo_id].resolve(revision).files.items()}

    def head(self, repo_id: str, revision: str = "main") -> str:
        return self.repos[repo_id].refs[revision]

    # ------------------------------------------------------------------------------------ repo state
    def _new_commit(self, repo: Repo, files: dict[str, Blob], message: str) -> Commit:
        commit = Commit(uuid.uuid4().hex + uuid.uuid4().hex[:8], message, files)
        repo.commits[commit.oid] = commit
        return commit

    def _repo(self, repo_id: str, authorized: bool) -> Repo:
        repo = self.repos.get(repo_id)
        if repo is None or (repo.private and not authorized):
            raise HubError(404, "RepoNotFound", f"Repository {repo_id} not found")
        return repo

    def _commit_at(self, repo: Repo, revision: str) -> Commit:
        commit = repo.resolve(revision)
        if commit is None:
            raise HubError(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        return commit

    # -------------------------------------------------------------------------------------- endpoints
    def create_repo(self, req: "Request") -> tuple[int, dict]:
        body = req.json()
        repo_id = f"{body['organization']}/{body['name']}" if body.get("organization") else body["name"]
        url = f"{self.url}/{repo_id}"
        if repo_id in self.repos:
            return 409, {"error": "You already created this model repo", "url": url}
        repo = Repo(private=body.get("visibility") == "private" or bool(body.get("private")))
        repo.refs["main"] = self._new_commit(repo, {".gitattributes": Blob(GITATTRIBUTES, False)}, "initial commit").oid
        self.repos[repo_id] = repo
        return 200, {"url": url, "name": repo_id}

    def create_branch(self, req: "Request", repo: str, branch: str) -> tuple[int, dict]:
        r = self._repo(repo, req.authorized)
        if branch in r.refs:
            return 409, {"error": f"Branch {branch} already exists"}
        start = r.resolve(req.json().get("startingPoint") or "main")  # a branch name or a commit id, as the Hub takes
        if start is None:
            raise HubError(404, "RevisionNotFound", f"no revision {req.json()['startingPoint']} to branch from")
        r.refs[branch] = start.oid
        return 200, {}

    def delete_branch(self, req: "Request", repo: str, branch: str) -> tuple[int, dict]:
        r = self._repo(repo, req.authorized)
        if branch == "main" or r.refs.pop(branch, None) is None:
            raise HubError(404, "RevisionNotFound", f"cannot delete branch {branch}")
        return 200, {}

    def repo_info(self, req: "Request", repo: str, revision: str = "main") -> tuple[int, dict]:
        r = self._repo(repo, req.authorized)
        commit = self._commit_at(r, revision)
        siblings = [{"rfilename": path} for path in sorted(commit.files)]
        return 200, {"id": repo, "modelId": repo, "sha": commit.oid, "private": r.private, "siblings": siblings}

    def tree(self, req: "Request", repo: str, revision: str, path: str = "") -> tuple[int, list]:
        commit = self._commit_at(self._repo(repo, req.authorized), revision)
        recursive = req.query.get("recursive", ["false"])[0].lower() == "true"
        prefix = f"{path.strip('/')}/" if path else ""
        entries, folders = [], set()
        for file_path, blob in sorted(commit.files.items()):
            if not file_path.startswith(prefix):
                continue
            rest = file_path[len(prefix):]
            if "/" in rest and not recursive:
                folders.add(prefix + rest.split("/")[0])
                continue
            if recursive:
                folders.update(str(parent) for parent in PurePosixPath(rest).parents if str(parent) != ".")
            entries.append(blob.tree_entry(file_path))
        if prefix and not entries and not folders:
            raise HubError(404, "EntryNotFound", f"{path} does not exist")
        dirs = [{"type": "directory", "path": d, "oid": git_blob_oid(d.encode())} for d in sorted(folders)]
        return 200, dirs + entries

    def preupload(self, req: "Request", repo: str, revision: str) -> tuple[int, dict]:
        r = self._repo(repo, req.authorized)
        current = self._commit_at(r, revision).files
        answer = []
        for item in req.json()["files"]:
            lfs = item["path"].endswith(LFS_SUFFIXES) or item["size"] >= LFS_MIN_SIZE
            existing = current.get(item["path"])
            answer.append({
                "path": item["path"],
                "uploadMode": "lfs" if lfs else "regular",
                "shouldIgnore": False,
                "oid": existing.oid if existing is not None and existing.lfs == lfs else None,
            })
        return 200, {"files": answer, "commitOid": self._commit_at(r, revision).oid}

    def lfs_batch(self, req: "Request", repo: str) -> tuple[int, dict]:
        self._repo(repo, req.authorized)
        body = req.json()
        objects = []
        for obj in body["objects"]:
            entry = {"oid": obj["oid"], "size": obj["size"]}
            if obj["oid"] not in self.lfs_objects:
                entry["actions"] = {"upload": {"href": f"{self.url}/lfs-objects/{obj['oid']}"}}
            objects.append(entry)
        return 200, {"transfer": "basic", "objects": objects}

    def lfs_upload(self, req: "Request", oid: str) -> tuple[int, dict]:
        if hashlib.sha256(req.body).hexdigest() != oid:
            raise HubError(400, None, "LFS object content does not match its sha256")
        self.lfs_objects[oid] = req.body
        return 200, {}

    def commit(self, req: "Request", repo: str, revision: str) -> tuple[int, dict]:
        r = self._repo(repo, req.authorized)
        parent = self._commit_at(r, revision)
        files = dict(parent.files)
        header = {}
        for line in req.body.decode().splitlines():
            item = json.loads(line)
            key, value = item["key"], item["value"]
            if key == "header":
                header = value
            elif key == "file":
                files[value["path"]] = Blob(base64.b64decode(value["content"]), lfs=False)
            elif key == "lfsFile":
                if value["oid"] not in self.lfs_objects:
                    raise HubError(422, None, f"LFS object {value['oid']} was never uploaded")
                files[value["path"]] = Blob(self.lfs_objects[value["oid"]], lfs=True)
            elif key == "deletedFile":
                if files.pop(value["path"], None) is None:
                    raise HubError(404, "EntryNotFound", "A file with this name doesn't exist")
            elif key == "deletedFolder":
                files = {p: b for p, b in files.items() if not p.startswith(value["path"].rstrip("/") + "/")}
            else:
                raise HubError(400, None, f"unknown commit operation {key!r}")
        if header.get("parentCommit") and header["parentCommit"] != parent.oid:
            raise HubError(412, None, "A commit has happened since. Please refresh and try again.")
        commit = self._new_commit(r, files, header.get("summary", ""))
        answer = {"commitOid": commit.oid, "commitUrl": f"{self.url}/{repo}/commit/{commit.oid}"}
        if req.query.get("create_pr") == ["1"]:
            number = 1 + sum(ref.startswith("refs/pr/") for ref in r.refs)
            r.refs[f"refs/pr/{number}"] = commit.oid
            answer["pullRequestUrl"] = f"{self.url}/{repo}/discussions/{number}"
        else:
            r.refs[unquote(revision)] = commit.oid
        return 200, answer

    def validate_yaml(self, req: "Request") -> tuple[int, dict]:
        content = req.json()["content"]
        match = re.match(r"^---\n(.*?)\n---\n", content, re.S)
        try:
            yaml.safe_load(match.group(1) if match else "")
        except yaml.YAMLError as error:
            return 400, {"errors": [{"message": str(error)}], "warnings": []}
        return 200, {"errors": [], "warnings": []}

    def resolve(self, req: "Request", repo: str, revision: str, path: str) -> tuple[int, bytes]:
        commit = self._commit_at(self._repo(repo, req.authorized), revision)
        blob = commit.files.get(path)
        if blob is None:
            raise HubError(404, "EntryNotFound", f"{path} does not exist", {"X-Repo-Commit": commit.oid})
        req.headers_out.update({"ETag": f'"{blob.etag}"', "X-Repo-Commit": commit.oid})
        if blob.lfs:
            req.headers_out.update({"X-Linked-Etag": f'"{blob.sha256}"', "X-Linked-Size": str(len(blob.content))})
        return 200, blob.content

    # --------------------------------------------------------------------------------------- routing
    ROUTES = [
        ("POST", r"/api/repos/create", "create_repo"),
        ("POST", r"/api/validate-yaml", "validate_yaml"),
        ("POST", rf"/api/models/{REPO}/branch/(?P<branch>.+)", "create_branch"),
        ("DELETE", rf"/api/models/{REPO}/branch/(?P<branch>.+)", "delete_branch"),
        ("GET", rf"/api/models/{REPO}/revision/(?P<revision>[^/]+)", "repo_info"),
        ("GET", rf"/api/models/{REPO}/tree/(?P<revision>[^/]+)(?:/(?P<path>.+))?", "tree"),
        ("GET", rf"/api/models/{REPO}", "repo_info"),
        ("POST", rf"/api/models/{REPO}/preupload/(?P<revision>[^/]+)", "preupload"),
        ("POST", rf"/api/models/{REPO}/commit/(?P<revision>[^/]+)", "commit"),
        ("POST", rf"/{REPO}\.git/info/lfs/objects/batch", "lfs_batch"),
        ("PUT", r"/lfs-objects/(?P<oid>[0-9a-f]{64})", "lfs_upload"),
        ("GET", rf"/{REPO}/resolve/(?P<revision>[^/]+)/(?P<path>.+)", "resolve"),
    ]
    # lfs_upload stands for the pre-signed storage URL that lfs_batch hands out: the client sends no token there.
    WRITES = {"create_repo", "create_branch", "delete_branch", "preupload", "lfs_batch", "commit"}

    def handle(self, req: "Request") -> tuple[int, object]:
        method = "GET" if req.method == "HEAD" else req.method
        for route_method, pattern, name in self.ROUTES:
            match = re.fullmatch(pattern, req.path)
            if route_method == method and match:
                break
        else:
            self.unhandled.append((req.method, req.path))
            raise HubError(404, None, f"fake hub: no route for {req.method} {req.path}")
        if self._failures.get(name):
            raise HubError(self._failures[name].pop(0), None, f"injected failure of {name}")
        if name in self.WRITES and not req.authorized:
            raise HubError(401, None, "Invalid credentials in Authorization header")
        kwargs = {k: unquote(v) for k, v in match.groupdict().items() if v is not None}
        with self._lock:
            return getattr(self, name)(req, **kwargs)


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, list[str]]
    body: bytes
    authorized: bool
    headers_out: dict[str, str] = field(default_factory=dict)

    def json(self):
        return json.loads(self.body or b"{}")


def _handler_for(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as the client expects

        def log_message(self, *args) -> None:  # quiet test output
            pass

        def _body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                chunks = []
                while size := int(self.rfile.readline().strip() or b"0", 16):
                    chunks.append(self.rfile.read(size))
                    self.rfile.readline()
                self.rfile.readline()
                return b"".join(chunks)
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def _serve(self) -> None:
            url = urlsplit(self.path)
            auth = self.headers.get("Authorization", "")
            if auth:
                hub.authorizations.add(auth)
            req = Request(self.command, url.path, parse_qs(url.query), self._body(), auth == f"Bearer {hub.token}")
            hub.requests.append((self.command, req.path))
            try:
                status, payload = hub.handle(req)
            except HubError as error:
                status, payload = error.status, {"error": error.message}
                req.headers_out.update(error.headers)
                if error.code:
                    req.headers_out["X-Error-Code"] = error.code
                req.headers_out["X-Error-Message"] = error.message
            body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/octet-stream" if isinstance(payload, bytes)
                             else "application/json")
            self.send_header("Content-Length", str(len(body)))
            for key, value in req.headers_out.items():
                self.send_header(key, value)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = _serve

    return Handler
