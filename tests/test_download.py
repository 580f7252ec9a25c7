"""The download path and running without a network (issue 16).

`-m org/name` downloads through huggingface_hub from a hub served here: a threaded
http.server in the hub's API layout (/api/models/{id}/revision/{rev}, /api/models/{id}/tree/
{sha}, /{id}/resolve/{rev}/{file} with ETag, X-Repo-Commit and Content-Length, ranges for
resuming), holding a tiny random GPT-2 saved by transformers. Some repositories misbehave: a
connection dropped mid-file once or every time, a file whose bytes do not match its
checksum, a file shorter than announced, a repository that does not exist.

huggingface_hub reads HF_ENDPOINT and HF_HUB_OFFLINE at import, so the downloads run in one
subprocess (`downloads` below), which then stops the server and runs every model again with
sockets blocked. A second subprocess runs every command with HF_HUB_OFFLINE=1 and sockets
blocked on local files. Without huggingface_hub, one line says how to install it.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from typer.testing import CliRunner

transformers = pytest.importorskip("transformers")
pytest.importorskip("huggingface_hub")

from test_convert import build  # noqa: E402

from llmcli.cli import app  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHA = "0123456789abcdef0123456789abcdef01234567"
CHAT_TEMPLATE = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:"
# repository -> what goes wrong with its model.safetensors
REPOS = {"org/tiny": None, "org/drop-once": "drop-once", "org/drop-always": "drop-always", "org/corrupt": "corrupt",
         "org/short": "short"}  # fmt: skip
MISSING = "org/no-such-model"


def tiny_gpt2(directory: Path) -> Path:
    """A tiny random GPT-2 and its tokenizer, saved by transformers, with a chat template."""
    build("gpt2", directory)
    config = directory / "tokenizer_config.json"
    config.write_text(json.dumps(json.loads(config.read_text()) | {"chat_template": CHAT_TEMPLATE}))
    (directory / "README.md").write_text("# tiny\n")  # on the hub, but not downloaded: nothing llmcli reads
    return directory


# --- the hub -----------------------------------------------------------------------------------


def _git_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class FakeHub:
    """The hub's API for `REPOS`, every repository holding the files of `model_dir`."""

    def __init__(self, model_dir: Path):
        self.files = {p.name: p.read_bytes() for p in sorted(model_dir.iterdir()) if p.is_file()}
        self.requests: list[str] = []
        self.gets: dict[str, int] = {}  # GETs of each file, for dropping the first
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_HEAD(self):
                hub.serve(self, body=False)

            def do_GET(self):
                hub.serve(self, body=True)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def entry(self, name: str) -> dict:
        data = self.files[name]
        entry = {"type": "file", "path": name, "size": len(data), "oid": _git_sha1(data)}
        if name.endswith(".safetensors"):
            entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
        return entry

    def serve(self, h: BaseHTTPRequestHandler, body: bool) -> None:
        path = h.path.split("?")[0]
        self.requests.append(f"{h.command} {h.path} {h.headers.get('Range', '')}".strip())
        if path == "/__stop__":
            self._send(h, 200, b"stopping", {}, body)
            threading.Thread(target=self.stop).start()
            return
        for repo, fault in REPOS.items():
            if path == f"/api/models/{repo}/revision/main":
                siblings = [{"rfilename": name} for name in self.files]
                return self._json(h, {"id": repo, "modelId": repo, "sha": SHA, "private": False, "siblings": siblings}, body)
            if path == f"/api/models/{repo}/tree/{SHA}":
                return self._json(h, [self.entry(name) for name in self.files], body)
            for revision in ("main", SHA):
                prefix = f"/{repo}/resolve/{revision}/"
                if path.startswith(prefix) and path[len(prefix) :] in self.files:
                    return self._file(h, path[len(prefix) :], fault, body)
        self._send(h, 404, b'{"error": "Repository not found"}', {"X-Error-Code": "RepoNotFound"}, body)

    def _json(self, h, value, body: bool) -> None:
        self._send(h, 200, json.dumps(value).encode(), {"Content-Type": "application/json"}, body)

    def _file(self, h, name: str, fault: str | None, body: bool) -> None:
        data = self.files[name]
        entry = self.entry(name)
        etag = entry["lfs"]["oid"] if "lfs" in entry else entry["oid"]
        headers = {"ETag": f'"{etag}"', "X-Repo-Commit": SHA, "Accept-Ranges": "bytes"}
        if fault is None or name != "model.safetensors" or not body:
            return self._send(h, 200, data, headers, body, ranged=True)
        if fault == "corrupt":  # the same size, one byte changed
            return self._send(h, 200, data[:-1] + bytes([data[-1] ^ 1]), headers, body, ranged=True)
        if fault == "short":  # fewer bytes than HEAD announced
            return self._send(h, 200, data[: len(data) // 2], headers, body)
        self.gets[h.path] = self.gets.get(h.path, 0) + 1
        if fault == "drop-always" or (fault == "drop-once" and self.gets[h.path] == 1):
            # Announce the whole file, send half of it, close the connection.
            h.send_response(200)
            for key, value in headers.items():
                h.send_header(key, value)
            h.send_header("Content-Length", str(len(data)))
            h.end_headers()
            h.wfile.write(data[: len(data) // 2])
            h.wfile.flush()
            h.close_connection = True
            return
        self._send(h, 200, data, headers, body, ranged=True)

    def _send(self, h, status: int, data: bytes, headers: dict, body: bool, ranged: bool = False) -> None:
        spec = h.headers.get("Range") if ranged else None
        if spec and status == 200:
            start = int(spec.removeprefix("bytes=").split("-")[0])
            headers = headers | {"Content-Range": f"bytes {start}-{len(data) - 1}/{len(data)}"}
            data, status = data[start:], 206
        h.send_response(status)
        for key, value in headers.items():
            h.send_header(key, value)
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        if body:
            h.wfile.write(data)


# --- subprocesses: isolated caches, sockets blocked on demand ------------------------------------

SITECUSTOMIZE = """
import os, socket

_connect = socket.socket.connect


def _blocked(self, address):
    if self.family in (socket.AF_INET, socket.AF_INET6) and os.environ.get("BLOCK_SOCKETS_LOG"):
        with open(os.environ["BLOCK_SOCKETS_LOG"], "a") as log:
            log.write(repr(address) + "\\n")
        raise OSError(101, "Network is unreachable (sockets blocked by the test)")
    return _connect(self, address)


socket.socket.connect = _blocked
"""


def env_for(tmp: Path, **extra: str) -> dict:
    site = tmp / "site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "LLMCLI_", "BLOCK_SOCKETS"))}
    env.update(PYTHONPATH=f"{site}{os.pathsep}{REPO}", HF_HOME=str(tmp / "hf-home"), HF_HUB_CACHE=str(tmp / "hub"),
               LLMCLI_CACHE=str(tmp / "llmcli"), XDG_CONFIG_HOME=str(tmp / "config"), HF_HUB_DISABLE_TELEMETRY="1",
               HF_HUB_DISABLE_PROGRESS_BARS="1", NO_COLOR="1", **extra)  # fmt: skip
    return env


def run_script(script: str, env: dict, *args: str, timeout: float = 240) -> dict:
    command = [sys.executable, "-c", textwrap.dedent(script), *args]
    proc = subprocess.run(command, capture_output=True, env=env, timeout=timeout)
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]
    return json.loads(proc.stdout.decode().strip().splitlines()[-1])


# Each command through CliRunner, its exit code, stdout and stderr kept.
RUNNER = """
import json, os, sys
from typer.testing import CliRunner
from llmcli.cli import app

def cli(*args, input=None):
    r = CliRunner().invoke(app, list(args), input=input)
    out = {"exit": r.exit_code, "stdout": r.stdout, "stderr": r.stderr}
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        out["exception"] = repr(r.exception)
    return out
"""

DOWNLOADS = (
    RUNNER
    + """
import time, urllib.request
time.sleep = lambda seconds: None  # huggingface_hub waits 1 s before each retry
ids = json.loads(sys.argv[1])
online = {i: cli("info", "-m", i, "--json") for i in ids}
urllib.request.urlopen(os.environ["HF_ENDPOINT"] + "/__stop__").read()
log = os.environ["BLOCK_SOCKETS_LOG"] = sys.argv[2]
again = {}
for i in ids:
    open(log, "w").close()
    again[i] = cli("info", "-m", i, "--json")
    again[i]["connects"] = open(log).read().splitlines()
os.environ["HF_HUB_OFFLINE"] = "1"  # llmcli reads it at each run (huggingface_hub at import: the cache needs no network)
open(log, "w").close()
offline = {i: cli("info", "-m", i, "--json") for i in ("org/tiny", "org/drop-always")}
offline["connects"] = open(log).read().splitlines()
print(json.dumps({"online": online, "again": again, "offline": offline}))
"""
)


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> Path:
    return tiny_gpt2(tmp_path_factory.mktemp("served"))


@pytest.fixture(scope="module")
def downloads(served, tmp_path_factory):
    """Every repository downloaded once through `info -m`, then the server stopped and each run
    again with sockets blocked (HF_HUB_OFFLINE unset)."""
    tmp = tmp_path_factory.mktemp("downloads")
    hub = FakeHub(served)
    log = tmp / "blocked.log"
    ids = [*REPOS, MISSING]
    env = env_for(tmp, HF_ENDPOINT=hub.url)
    try:
        result = run_script(DOWNLOADS, env, json.dumps(ids), str(log))
    finally:
        hub.stop()  # the script stopped it already, unless it failed first
    result.update(tmp=tmp, hub=hub, env=env, log=log)
    return result


def snapshot(tmp: Path, repo: str) -> Path:
    return tmp / "hub" / ("models--" + repo.replace("/", "--")) / "snapshots" / SHA


def error_line(run: dict) -> str:
    """The one error line of a failed run; besides it only llmcli's "downloading" line."""
    assert run["exit"] == 2, run
    assert run["stdout"] == "" and "exception" not in run, run
    lines = run["stderr"].strip().splitlines()
    if lines and lines[0].startswith("llmcli: downloading "):
        lines = lines[1:]
    assert len(lines) == 1 and lines[0].startswith("llmcli: error: "), run["stderr"]
    return lines[0]


def test_download_lands_in_the_standard_cache(downloads, served):
    run = downloads["online"]["org/tiny"]
    assert run["exit"] == 0, run
    info = json.loads(run["stdout"])
    assert info["architecture"] == "decoder-only"
    snap = snapshot(downloads["tmp"], "org/tiny")
    repo = snap.parents[1]
    assert (repo / "refs" / "main").read_text() == SHA
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (snap / name).is_symlink() and (snap / name).read_bytes() == (served / name).read_bytes()
    assert not (snap / "README.md").exists()  # only what a conversion reads
    sha256 = hashlib.sha256((served / "model.safetensors").read_bytes()).hexdigest()
    assert (repo / "blobs" / sha256).is_file()
    assert not list(repo.rglob("*.incomplete"))


def test_second_run_is_offline_with_the_server_stopped(downloads):
    again = downloads["again"]["org/tiny"]
    assert again["exit"] == 0, again
    assert json.loads(again["stdout"]) == json.loads(downloads["online"]["org/tiny"]["stdout"])
    assert again["connects"] == []  # none was tried
    offline = downloads["offline"]
    assert offline["org/tiny"]["exit"] == 0 and offline["org/tiny"]["stdout"] == again["stdout"]
    assert "HF_HUB_OFFLINE is set, so it was not downloaded" in error_line(offline["org/drop-always"])
    assert offline["connects"] == []


def test_a_dropped_connection_resumes(downloads, served):
    run = downloads["online"]["org/drop-once"]
    assert run["exit"] == 0, run
    # Fetched again after the drop (from the start: huggingface_hub resumes with a Range only
    # past its first 10 MB chunk), and whole.
    gets = [r for r in downloads["hub"].requests if r.startswith("GET /org/drop-once/resolve/") and "safetensors" in r]
    assert len(gets) == 2
    snap = snapshot(downloads["tmp"], "org/drop-once")
    assert (snap / "model.safetensors").read_bytes() == (served / "model.safetensors").read_bytes()


@pytest.mark.parametrize("repo, reason", [("org/drop-always", "connection"), ("org/short", "size"),
                                          ("org/corrupt", "checksum")])  # fmt: skip
def test_a_broken_download_is_one_line_and_leaves_nothing_to_load(downloads, repo, reason):
    line = error_line(downloads["online"][repo])
    assert repo in line and reason in line, line
    snap = snapshot(downloads["tmp"], repo)
    assert not (snap / "model.safetensors").exists()
    blobs = snap.parents[1] / "blobs"
    assert not list(blobs.glob("*.incomplete"))
    # The next run (server gone, sockets blocked) must not load what is left: one line again.
    again = error_line(downloads["again"][repo])
    assert "unreachable" in again or "network" in again, again


def test_a_missing_model_is_one_line(downloads):
    assert "no such model on the hub" in error_line(downloads["online"][MISSING])
    assert "unreachable" in error_line(downloads["again"][MISSING])


def test_without_huggingface_hub_one_line_says_how_to_install_it(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # `import huggingface_hub` raises ImportError
    monkeypatch.setitem(sys.modules, "huggingface_hub.errors", None)
    monkeypatch.delenv("HF_HUB_OFFLINE")
    result = CliRunner().invoke(app, ["info", "-m", "org/not-cached"])
    assert result.exit_code == 2 and result.stdout == ""
    assert result.stderr.count("\n") == 1
    assert "pip install 'llmcli[hub]'" in result.stderr and result.stderr.startswith("llmcli: error: org/not-cached")


# --- every command with HF_HUB_OFFLINE=1 and sockets blocked -------------------------------------

COMMANDS = (
    RUNNER
    + """
d = json.loads(sys.argv[1])
runs = {
    "translate": cli("translate", "-m", d["s2s"], d["text"], "--max-len", "4"),
    "summarize": cli("summarize", "-m", d["s2s"], d["text"], "--max-len", "4"),
    "qa": cli("qa", "-m", d["s2s"], d["qa"], "--max-len", "4"),
    "generate": cli("generate", "-m", d["lm"], "the cat", "--max-new-tokens", "3", "--greedy"),
    "chat": cli("chat", "-m", d["lm"], "--max-new-tokens", "3", "--greedy", "-q", input="hello\\n"),
    "generate from the hub cache": cli("generate", "-m", "org/tiny", "the cat", "--max-new-tokens", "3", "--greedy"),
    "eval": cli("eval", d["text"], "--ref", d["text"], "--json"),
    "eval perplexity": cli("eval", d["text"], "--metric", "perplexity", "-m", d["lm"], "--json"),
    "convert": cli("convert", d["lm"], d["out"], "-q"),
    "info": cli("info", "-m", d["out"], "--json"),
    "models": cli("models", "--json"),
}
print(json.dumps(runs))
"""
)


@pytest.mark.slow  # about 10 s: two conversions and every command, in a subprocess
def test_every_command_without_a_network(downloads, served, tmp_path):
    """One subprocess, every command on local files: the Hugging Face cache of `downloads`
    (org/tiny), Hugging Face directories (GPT-2, BART), an llmcli directory."""
    bart = tmp_path / "bart"
    bart.mkdir()
    build("bart", bart)
    text = tmp_path / "in.txt"
    text.write_text("the cat sat\n\nthe dog ran on the mat\n", encoding="utf-8")
    qa = tmp_path / "qa.jsonl"
    qa.write_text(json.dumps({"question": "who sat?", "context": "the cat sat"}) + "\n", encoding="utf-8")
    paths = {"s2s": str(bart), "lm": str(served), "text": str(text), "qa": str(qa), "out": str(tmp_path / "converted")}
    log = tmp_path / "blocked.log"
    env = dict(downloads["env"], HF_HUB_OFFLINE="1", BLOCK_SOCKETS_LOG=str(log))
    env.pop("HF_ENDPOINT")
    runs = run_script(COMMANDS, env, json.dumps(paths))
    for name, run in runs.items():
        assert run["exit"] == 0 and "exception" not in run, (name, run)
        assert run["stdout"].strip() or name == "convert", (name, run)
    assert runs["convert"]["stdout"] == "" and (tmp_path / "converted" / "model.safetensors").is_file()
    assert json.loads(runs["info"]["stdout"])["architecture"] == "decoder-only"
    for name in ("translate", "summarize"):
        assert len(runs[name]["stdout"].split("\n")) == 4 and runs[name]["stdout"].split("\n")[1] == ""  # 3 lines
    assert json.loads(runs["eval"]["stdout"])["score"] == pytest.approx(100)
    listed = [json.loads(line) for line in runs["models"]["stdout"].splitlines()]
    assert any("org/tiny" in json.dumps(m) for m in listed), listed
    assert not log.exists() or log.read_text() == "", log.read_text()
