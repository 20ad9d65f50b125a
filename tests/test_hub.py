"""Configs of models the bundled catalog lacks: the Hugging Face cache, then the Hub (core/_hub.py).

A local HTTP server on 127.0.0.1 stands in for the Hub through HF_ENDPOINT. It answers the
requests huggingface_hub 2.x makes for hf_hub_download (file_download.py get_hf_file_metadata:
HEAD /{repo}/resolve/{revision}/{file} needs X-Repo-Commit and an ETag (or X-Linked-Etag); then a
GET of the same URL for the bytes), and fails the way the Hub does: 401 with X-Error-Code
GatedRepo for a gated repo without a token, 403 with a token that has no access, 404 with
X-Error-Code RepoNotFound for a repo that does not exist. Nothing here touches the network.
"""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from conftest import tiny_config
from vramplan.cli import main
from vramplan.core import _hub as hub
from vramplan.core._errors import ModelError
from vramplan.core._models import _resolve, resolve, resolve_config

COMMIT = "0123456789abcdef0123456789abcdef01234567"
GOOD_TOKEN = "hf_good"
LLAMA = json.dumps(tiny_config("llama", num_hidden_layers=3)).encode()
REPOS = {
    "tiny-org/tiny-llama": LLAMA,
    "gated-org/gated-llama": LLAMA,
    "tiny-org/broken": b"{ this is not json",
    "tiny-org/a-list": b"[1, 2, 3]",
}
GATED = {"gated-org/gated-llama"}


class FakeHub(BaseHTTPRequestHandler):
    requests: list = []

    def log_message(self, *args):   # keep pytest output clean
        pass

    def do_HEAD(self):
        self._answer(body=False)

    def do_GET(self):
        self._answer(body=True)

    def _answer(self, body: bool):
        FakeHub.requests.append((self.command, self.path, self.headers.get("authorization")))
        parts = self.path.split("?")[0].strip("/").split("/")
        if len(parts) != 5 or parts[2] != "resolve":
            return self._error(404, "EntryNotFound")
        repo, revision, filename = "/".join(parts[:2]), parts[3], parts[4]
        if repo not in REPOS:
            return self._error(404, "RepoNotFound", "Repository not found")
        if repo in GATED:
            auth = self.headers.get("authorization")
            if auth is None:
                return self._error(401, "GatedRepo", "Access to model is restricted")
            if auth == "Bearer hf_revoked":   # a 403 without an error code
                return self._error(403, None, "Forbidden")
            if auth != f"Bearer {GOOD_TOKEN}":   # a token whose account has not accepted the license
                return self._error(403, "GatedRepo", "Access to model is restricted")
        if revision not in ("main", COMMIT) or filename != "config.json":
            return self._error(404, "EntryNotFound", "Entry not found")
        data = REPOS[repo]
        self.send_response(200)
        self.send_header("X-Repo-Commit", COMMIT)
        self.send_header("ETag", f'"{hashlib.sha1(data).hexdigest()}"')
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        if body:
            self.wfile.write(data)

    def _error(self, status: int, code: str | None, message: str = ""):
        self.send_response(status)
        if code:
            self.send_header("X-Error-Code", code)
        if message:
            self.send_header("X-Error-Message", message)
        self.send_header("Content-Length", "0")
        self.end_headers()


@pytest.fixture
def fake_hub(tmp_path, monkeypatch):
    """The stand-in Hub, a fresh HF cache, the network settings cleared (CI sets HF_HUB_OFFLINE=1)."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeHub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    FakeHub.requests = []
    url = f"http://127.0.0.1:{server.server_address[1]}"
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_CACHE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", url)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    import huggingface_hub.constants
    # huggingface_hub reads HF_HUB_OFFLINE once at its import (constants.py); this process may
    # have imported it under CI's HF_HUB_OFFLINE=1
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    # and no token stored by `hf auth login` on this machine takes part
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    _resolve.cache_clear()
    yield url
    _resolve.cache_clear()
    server.shutdown()
    server.server_close()


def cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_downloads_config_json_once_then_reads_the_cache(fake_hub, tmp_path):
    spec = resolve("tiny-org/tiny-llama")
    assert (spec.id, spec.model_type, spec.layers, spec.hidden) == ("tiny-org/tiny-llama", "llama", 3, 64)
    assert spec.source.startswith("Hugging Face hub: ")
    cached = tmp_path / "hf-home" / "hub" / "models--tiny-org--tiny-llama" / "snapshots" / COMMIT / "config.json"
    assert json.loads(cached.read_text()) == json.loads(LLAMA)
    # huggingface_hub 2.x may also GET /api/agent-harnesses (utils/_detect_agent.py, a registry it
    # fetches once a day while building headers): not a file of the model
    files = [(method, path) for method, path, _ in FakeHub.requests if not path.startswith("/api/")]
    # a HEAD with a short timeout first (hub._answers), then huggingface_hub's HEAD and GET
    assert files == [("HEAD", "/tiny-org/tiny-llama/resolve/main/config.json"),
                     ("HEAD", "/tiny-org/tiny-llama/resolve/main/config.json"),
                     ("GET", "/tiny-org/tiny-llama/resolve/main/config.json")]   # config.json only

    _resolve.cache_clear()
    FakeHub.requests = []
    again = resolve("tiny-org/tiny-llama")
    assert not [r for r in FakeHub.requests if "/resolve/" in r[1]] and again.source == f"Hugging Face cache: {cached}"


def test_offline_reads_the_cache_and_refuses_the_hub(fake_hub, monkeypatch):
    resolve("tiny-org/tiny-llama")            # now cached
    _resolve.cache_clear()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    FakeHub.requests = []
    assert resolve("tiny-org/tiny-llama").layers == 3
    with pytest.raises(hub.HubOfflineError) as info:
        resolve("tiny-org/never-fetched")
    assert FakeHub.requests == []
    assert str(info.value).startswith("unknown model 'tiny-org/never-fetched': not in the bundled catalog, not a "
                                      "local path, not in the Hugging Face cache (")
    assert str(info.value).endswith("), and HF_HUB_OFFLINE keeps the Hub out (hint: unset HF_HUB_OFFLINE to fetch "
                                    "its config.json, or pass a directory with config.json)")


def test_offline_typo_of_a_bundled_id_suggests_it(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(hub.HubOfflineError) as info:
        resolve("meta-llama/Llama-2-7x-hf")
    assert info.value.hint.startswith("did you mean meta-llama/Llama-2-7b-hf")


def test_cli_errors_are_one_line(fake_hub, capsys, monkeypatch):
    code, out, err = cli(capsys, "estimate", "tiny-org/no-such-model")
    assert (code, out) == (1, "")
    assert err == (f"Error: unknown model 'tiny-org/no-such-model': not in the bundled catalog and not on {fake_hub} "
                   "(hint: check the id (org/name); a private model needs HF_TOKEN; `vramplan models` lists the "
                   "catalog)\n")
    code, _, err = cli(capsys, "estimate", "gated-org/gated-llama")
    assert code == 1 and err == ("Error: gated-org/gated-llama is gated: its config.json needs a Hugging Face token "
                                 f"(hint: accept its license at {fake_hub}/gated-org/gated-llama, then set HF_TOKEN)\n")
    monkeypatch.setenv("HF_TOKEN", "hf_wrong")
    code, _, err = cli(capsys, "estimate", "gated-org/gated-llama")
    assert code == 1 and err == ("Error: gated-org/gated-llama is gated and the Hugging Face token has no access to "
                                 f"it (hint: accept its license at {fake_hub}/gated-org/gated-llama with that "
                                 "account)\n")
    monkeypatch.setenv("HF_TOKEN", "hf_revoked")
    code, _, err = cli(capsys, "estimate", "gated-org/gated-llama")
    assert code == 1 and err == (f"Error: gated-org/gated-llama: {fake_hub} refused access to its config.json (403) "
                                 "(hint: a gated or private model: set HF_TOKEN to a token with access)\n")
    code, _, err = cli(capsys, "estimate", "tiny-org/broken")
    assert code == 1 and err.startswith("Error: config.json of tiny-org/broken is not valid JSON (")
    assert "(hint: delete " in err and err.count("\n") == 1
    code, _, err = cli(capsys, "estimate", "tiny-org/a-list")
    assert code == 1 and err.startswith("Error: config.json of tiny-org/a-list is not a JSON object (hint: delete ")


def test_gated_model_with_a_token(fake_hub, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", GOOD_TOKEN)
    assert resolve("gated-org/gated-llama").layers == 3
    assert all(auth == f"Bearer {GOOD_TOKEN}" for _, path, auth in FakeHub.requests if "/resolve/" in path)


def test_unreachable_endpoint(fake_hub, monkeypatch):
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))     # a port nobody listens on
    port = sock.getsockname()[1]
    sock.close()
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    with pytest.raises(hub.HubOfflineError) as info:
        resolve("acme-org/qqq-model")
    assert str(info.value) == (f"unknown model 'acme-org/qqq-model': not in the bundled catalog, not a local path, "
                               f"not in the Hugging Face cache, and http://127.0.0.1:{port} cannot be reached (hint: "
                               "check the network or HF_ENDPOINT, or pass a directory with config.json)")


@pytest.mark.parametrize("url", ["http://127.0.0.1:99999", "http://", "ftp://mirror.example"])
def test_a_malformed_endpoint_is_one_line(capsys, fake_hub, monkeypatch, url):
    monkeypatch.setenv("HF_ENDPOINT", url)
    code, out, err = cli(capsys, "estimate", "acme-org/qqq-model")
    assert code == 1 and out == ""
    assert err == (f"Error: HF_ENDPOINT={url.rstrip('/')!r} is not an http(s) URL of a Hub (hint: fix or unset "
                   "HF_ENDPOINT (default https://huggingface.co))\n")


def test_a_server_that_fails_or_never_answers_is_an_error_in_seconds(fake_hub, monkeypatch):
    """huggingface_hub retries a timeout or a 5xx five times with back-off: the HEAD before it says so
    at once (hub._answers)."""
    failing = ThreadingHTTPServer(("127.0.0.1", 0), type("Failing", (FakeHub,), {
        "_answer": lambda self, body: self._error(500, None, "boom")}))
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)                  # takes the connection, never answers
    threading.Thread(target=failing.serve_forever, daemon=True).start()
    monkeypatch.setattr(hub, "ANSWER_TIMEOUT_S", 0.5)
    try:
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{failing.server_address[1]}")
        with pytest.raises(hub.HubOfflineError, match=r"config.json: http://127.0.0.1:\d+ answered 500 \(hint: "
                                                      r"the Hub or mirror is failing"):
            resolve("acme-org/qqq-model")
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{silent.getsockname()[1]}")
        with pytest.raises(hub.HubOfflineError, match=r"did not answer within 0.5 s"):
            resolve("acme-org/qqq-model")
    finally:
        failing.shutdown()
        failing.server_close()
        silent.close()


def test_errors_are_model_errors():
    for cls in (hub.HubOfflineError, hub.HubModelNotFoundError, hub.GatedModelError, hub.MalformedConfigError):
        assert issubclass(cls, ModelError)


def test_resolve_config_of_a_type_the_estimator_lacks(fake_hub):
    REPOS["tiny-org/exotic"] = json.dumps(dict(tiny_config("llama"), model_type="no-such-type")).encode()
    try:
        config, model_id, source = resolve_config("tiny-org/exotic")
        assert (config["model_type"], model_id) == ("no-such-type", "tiny-org/exotic")
        with pytest.raises(ModelError, match="is not known to the analytic model"):
            resolve("tiny-org/exotic")
    finally:
        del REPOS["tiny-org/exotic"]


def test_end_to_end_in_a_fresh_process(fake_hub, tmp_path):
    """A real `vramplan estimate` process: settings only from the environment it starts with."""
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TRANSFORMERS_", "HUGGING_FACE_"))}
    env.update(HF_ENDPOINT=fake_hub, HF_HOME=str(tmp_path / "fresh-home"))
    cmd = [sys.executable, "-m", "vramplan.cli", "estimate", "tiny-org/tiny-llama", "--json", "--seq", "64"]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["model"]["num_hidden_layers"] == 3
    env["HF_HUB_OFFLINE"] = "1"        # cached by the first run
    again = subprocess.run(cmd, capture_output=True, text=True, env=env)
    first, second = json.loads(result.stdout), json.loads(again.stdout)
    assert first["model"].pop("source").startswith("Hugging Face hub: ")
    assert second["model"].pop("source").startswith("Hugging Face cache: ")
    assert again.returncode == 0 and second == first


def test_bundled_estimate_never_imports_huggingface_hub():
    code = ("import sys, contextlib, io, vramplan\n"
            "from vramplan.cli import main\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n"
            "    main(['estimate', 'meta-llama/Llama-2-7b-hf', '--json'])\n"
            "print('huggingface_hub' in sys.modules)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


@pytest.mark.parametrize("repo_id", ["org/my model", "org/modél", "a/b..c", "a/b--c", "a/", "a/-b", "[/]",
                                     "a/" + "x" * 97])
def test_a_malformed_hub_id_is_one_line(capsys, monkeypatch, repo_id):
    """huggingface_hub refuses it with HFValidationError, a ValueError (hub._check_id)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, out, err = cli(capsys, "estimate", repo_id)
    assert (code, out) == (1, "")
    assert err == (f"Error: {repo_id!r} is not a valid Hugging Face model id (hint: a Hub id is org/name in "
                   "letters, digits, '-', '_' and '.', without '--' or '..'; `vramplan models` lists the catalog)\n")


class Misbehaving(FakeHub):
    """A HEAD that promises a 1 MB config.json, then a GET that redirects to itself, or that drips
    a byte at a time, or that never answers, until `stop` is set."""
    mode = "loop"
    stop = threading.Event()

    def _answer(self, body: bool):
        if self.mode == "loop":
            self.send_response(302)
            self.send_header("Location", self.path)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if body and self.mode == "silent":
            self.stop.wait()
            return
        self.send_response(200)
        self.send_header("X-Repo-Commit", COMMIT)
        self.send_header("ETag", '"0123"')
        self.send_header("Content-Length", str(1_000_000))
        self.end_headers()
        while body and not self.stop.is_set():
            self.wfile.write(b" ")
            self.wfile.flush()
            self.stop.wait(0.2)


@pytest.fixture
def misbehaving(fake_hub, monkeypatch):
    Misbehaving.stop.clear()
    server = ThreadingHTTPServer(("127.0.0.1", 0), Misbehaving)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.server_address[1]}")
    yield server
    Misbehaving.stop.set()          # lets the download left behind past its deadline end
    server.shutdown()
    server.server_close()


def test_a_redirect_loop_is_one_error(misbehaving, monkeypatch):
    monkeypatch.setattr(Misbehaving, "mode", "loop")
    with pytest.raises(hub.HubOfflineError, match=r"^cannot fetch acme-org/qqq-model/config.json from "
                                                  r"http://127.0.0.1:\d+: Exceeded \d+ redirects .* \(hint: check the "
                                                  r"network or HF_ENDPOINT, or pass a directory with config.json\)$"):
        resolve("acme-org/qqq-model")


def test_a_dripping_download_ends_at_the_deadline_and_leaves_no_partial_file(misbehaving, monkeypatch, tmp_path):
    monkeypatch.setattr(Misbehaving, "mode", "drip")
    monkeypatch.setattr(hub, "DOWNLOAD_DEADLINE_S", 1.0)
    with pytest.raises(hub.HubOfflineError) as info:
        resolve("acme-org/qqq-model")
    assert str(info.value) == (f"cannot fetch acme-org/qqq-model/config.json from {hub.endpoint()}: it did not "
                               "arrive whole within 1 s (hint: the Hub or mirror is stalling: try again later, or "
                               "pass a directory with config.json)")
    cache = tmp_path / "hf-home" / "hub"
    assert list(cache.rglob("*.incomplete")) == [] and list(cache.rglob("config.json")) == []


def test_a_silent_download_is_one_line_in_a_fresh_process(misbehaving, monkeypatch, tmp_path):
    """huggingface_hub's warnings of each retry (HF_HUB_DOWNLOAD_TIMEOUT apart) stay off stderr."""
    import os

    monkeypatch.setattr(Misbehaving, "mode", "silent")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TRANSFORMERS_", "HUGGING_FACE_"))}
    env.update(HF_ENDPOINT=os.environ["HF_ENDPOINT"], HF_HOME=str(tmp_path / "fresh-home"),
               HF_HUB_DOWNLOAD_TIMEOUT="1")
    code = ("import sys; from vramplan.core import _hub; _hub.DOWNLOAD_DEADLINE_S = 3.5\n"
            "from vramplan.cli import main; sys.exit(main(['estimate', 'acme-org/qqq-model']))\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert (result.returncode, result.stdout) == (1, "")
    assert result.stderr == (f"Error: cannot fetch acme-org/qqq-model/config.json from {os.environ['HF_ENDPOINT']}: "
                             "it did not arrive whole within 3.5 s (hint: the Hub or mirror is stalling: try again "
                             "later, or pass a directory with config.json)\n")
    assert list((tmp_path / "fresh-home").rglob("*.incomplete")) == []
