"""`ft push` against a local stand-in for the Hub's HTTP API (127.0.0.1, records every request)."""

from __future__ import annotations

import base64
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from export_fixtures import fake_run

from ft.cli import main

TOKEN = "hf_standin_secret_token_123"


class _Hub(BaseHTTPRequestHandler):
    log: list[dict] = []

    def log_message(self, *args):  # quiet
        pass

    def _reply(self, obj, code=200):
        body = json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _record(self):
        n = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(n) if n else b""
        self.log.append(
            {
                "method": self.command,
                "path": self.path,
                "auth": self.headers.get("Authorization"),
                "body": body,
            }
        )
        return body

    def do_POST(self):
        body = self._record()
        if self.path == "/api/repos/create":
            req = json.loads(body)
            repo = f"{req['organization']}/{req['name']}"
            return self._reply(
                {"url": f"http://127.0.0.1:{self.server.server_address[1]}/{repo}", "name": repo}
            )
        if self.path == "/api/validate-yaml":  # the model card's metadata block
            return self._reply({"errors": [], "warnings": []})
        if "/preupload/" in self.path:
            files = json.loads(body)["files"]
            return self._reply(
                {
                    "files": [
                        {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files
                    ]
                }
            )
        if "/commit/" in self.path:
            repo = self.path.split("/api/models/")[1].split("/commit/")[0]
            url = f"http://127.0.0.1:{self.server.server_address[1]}/{repo}/commit/{'a' * 40}"
            return self._reply({"commitUrl": url, "commitOid": "a" * 40, "pullRequestUrl": None})
        return self._reply({"error": "unexpected"}, 404)

    def do_GET(self):
        self._record()
        return self._reply({"error": "not found"}, 404)


@pytest.fixture
def hub(monkeypatch):
    _Hub.log = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Hub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.server_address[1]}")
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    # The suite runs offline (conftest); only this stand-in on 127.0.0.1 is reachable, so let the Hub client talk.
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    yield _Hub.log
    server.shutdown()


@pytest.fixture(scope="module")
def bundle(tmp_path_factory, ft_cache):
    from ft.bundle import package

    work = tmp_path_factory.mktemp("push")
    return package(fake_run(work), work / "bundles", archive=False)


def _uploaded(log) -> dict[str, bytes]:
    commit = next(r for r in log if "/commit/" in r["path"])
    files = {}
    for line in commit["body"].splitlines():
        item = json.loads(line)
        if item["key"] == "file":
            files[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
    return files


def test_push_uploads_adapter_and_model_card(hub, bundle, capsys):
    assert main(["push", str(bundle), "--repo", "user/tiny-tickets"]) == 0
    paths = [r["path"] for r in hub]
    assert paths[0] == "/api/repos/create"
    assert any("/api/models/user/tiny-tickets/commit/main" in p for p in paths)
    assert all(r["auth"] == f"Bearer {TOKEN}" for r in hub)
    files = _uploaded(hub)
    assert "adapter_config.json" in files and "adapter_model.safetensors" in files
    card = files["README.md"].decode()
    assert "base_model: builtin:tiny-qwen2" in card and "| metric | base | tuned |" in card
    assert "## Recipe" in card and "## Data" in card and "sha256" in card
    for content in files.values():
        assert TOKEN.encode() not in content
    out = capsys.readouterr()
    assert TOKEN not in out.out + out.err
    # never written anywhere in the bundle either
    assert not any(TOKEN.encode() in p.read_bytes() for p in bundle.rglob("*") if p.is_file())


def test_push_without_token_is_one_line(hub, bundle, monkeypatch, capsys):
    monkeypatch.delenv("HF_TOKEN")
    assert main(["push", str(bundle), "--repo", "user/x"]) == 2
    assert capsys.readouterr().err.strip().count("\n") == 0
    assert hub == []


def test_push_merged_needs_an_export(hub, bundle, capsys):
    assert main(["push", str(bundle), "--repo", "user/x", "--what", "merged"]) == 2
    assert "ft export" in capsys.readouterr().err
