"""Tests for porting.hub: cache paths and verified, atomic downloads from a local server."""

from __future__ import annotations

import hashlib
import http.server
import os
import socket
import threading
from pathlib import Path

import pytest

from porting import hub

PAYLOAD = os.urandom(3 * (1 << 20) + 123)  # more than one read chunk
SHA = hashlib.sha256(PAYLOAD).hexdigest()


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 (http.server's naming)
        if self.path.startswith("/missing"):
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(PAYLOAD)))
        self.end_headers()
        if self.path.startswith("/cut"):
            # Half the promised body, then the connection drops.
            self.wfile.write(PAYLOAD[: len(PAYLOAD) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(PAYLOAD)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def server():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def closed_port_url(name: str) -> str:
    """A URL on a port nothing listens on (connection refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/{name}"


def test_torch_home_follows_torch_rules(monkeypatch, tmp_path):
    monkeypatch.delenv("TORCH_HOME", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert hub.torch_home() == Path(os.path.expanduser("~/.cache/torch"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert hub.hub_checkpoints_dir() == tmp_path / "xdg" / "torch" / "hub" / "checkpoints"
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    assert hub.hub_checkpoints_dir() == tmp_path / "th" / "hub" / "checkpoints"


def test_download_verifies_and_lands_in_cache(server, tmp_path):
    name = f"model-{SHA[:8]}.pth"
    path = hub.cached_download(f"{server}/{name}", SHA[:8], progress=False, directory=tmp_path)
    assert path == tmp_path / name
    assert path.read_bytes() == PAYLOAD
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # not tempfile's 0600


def test_hash_mismatch_leaves_nothing(server, tmp_path):
    with pytest.raises(hub.DownloadError, match="hash mismatch") as e:
        hub.cached_download(f"{server}/model-deadbeef.pth", "deadbeef", progress=False,
                            directory=tmp_path)
    assert f"{server}/model-deadbeef.pth" in str(e.value)
    assert list(tmp_path.iterdir()) == []


def test_connection_refused_names_url_and_destination(tmp_path):
    url = closed_port_url("model-0123abcd.pth")
    with pytest.raises(hub.DownloadError) as e:
        hub.cached_download(url, "0123abcd", progress=False, directory=tmp_path)
    msg = str(e.value)
    assert url in msg and str(tmp_path / "model-0123abcd.pth") in msg
    assert "\n" not in msg
    assert list(tmp_path.iterdir()) == []


def test_interrupted_transfer_leaves_nothing(server, tmp_path):
    # No hash given, so only the length check can catch the short body.
    with pytest.raises(hub.DownloadError) as e:
        hub.cached_download(f"{server}/cut-1234.pth", None, progress=False, directory=tmp_path)
    assert f"{server}/cut-1234.pth" in str(e.value)
    assert list(tmp_path.iterdir()) == []


def test_http_error_leaves_nothing(server, tmp_path):
    with pytest.raises(hub.DownloadError, match="404"):
        hub.cached_download(f"{server}/missing-1234.pth", None, progress=False,
                            directory=tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_cache_hit_needs_no_network(tmp_path):
    url = closed_port_url("model-0123abcd.pth")
    (tmp_path / "model-0123abcd.pth").write_bytes(b"cached")
    assert hub.cached_download(url, "0123abcd", directory=tmp_path).read_bytes() == b"cached"
