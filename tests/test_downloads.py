"""Feature-network files fetched on first use from a local HTTP server on 127.0.0.1: verified before they
are moved in (the Inception weights by the hash prefix in their name, ADM's graph by importing it), nothing
left behind by a bad or failed download, and one line naming the URL and the flag when offline."""

from __future__ import annotations

import functools
import hashlib
import http.server
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from evaluations import inception
from evaluations.downloads import DownloadError, fetch_verified
from evaluations.inception import InceptionV3FID, load_inception

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def server(tmp_path):
    """An HTTP server on 127.0.0.1 serving tmp_path/www; yields (folder, base URL)."""
    folder = tmp_path / "www"
    folder.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield folder, f"http://127.0.0.1:{httpd.server_address[1]}/"
    httpd.shutdown()
    httpd.server_close()


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


def test_fetch_verifies_before_moving_in_and_leaves_nothing_on_failure(server, tmp_path):
    folder, url = server
    (folder / "good.bin").write_bytes(b"x" * 1000)
    cache = tmp_path / "cache"

    def at_least_1000_bytes(path: Path) -> None:
        if path.stat().st_size < 1000:
            raise ValueError(f"{path.stat().st_size} bytes")

    got = fetch_verified(url + "good.bin", cache / "good.bin", at_least_1000_bytes, "--flag")
    assert got.read_bytes() == b"x" * 1000 and _leftovers(cache) == ["good.bin"]
    (folder / "short.bin").write_bytes(b"x" * 10)
    with pytest.raises(DownloadError, match=r"short\.bin.*\(10 bytes\); download it by hand and pass --flag"):
        fetch_verified(url + "short.bin", cache / "short.bin", at_least_1000_bytes, "--flag")
    with pytest.raises(DownloadError, match="missing.bin"):
        fetch_verified(url + "missing.bin", cache / "missing.bin", at_least_1000_bytes, "--flag")
    assert _leftovers(cache) == ["good.bin"]


def test_inception_weights_download_on_first_use_and_are_hash_checked(server, tmp_path, monkeypatch):
    folder, url = server
    torch.manual_seed(0)
    served = folder / inception.WEIGHTS_NAME
    torch.save(InceptionV3FID().state_dict(), served)
    digest = hashlib.sha256(served.read_bytes()).hexdigest()
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv(inception.WEIGHTS_ENV, raising=False)
    monkeypatch.setenv(inception.WEIGHTS_URL_ENV, url + inception.WEIGHTS_NAME)
    cache = tmp_path / "home" / ".cache" / "guided_diffusion"
    monkeypatch.setattr(inception, "WEIGHTS_SHA256_PREFIX", "00000000")  # the served file is not the real one
    with pytest.raises(DownloadError, match=rf"SHA-256 {digest[:8]}.*--inception_path"):
        load_inception()
    assert _leftovers(cache) == []
    monkeypatch.setattr(inception, "WEIGHTS_SHA256_PREFIX", digest[:8])
    net = load_inception()
    assert _leftovers(cache) == [inception.WEIGHTS_NAME]
    assert torch.equal(net.fc.weight, torch.load(served, weights_only=True)["fc.weight"])


def test_offline_is_one_line_naming_the_url_and_the_flag(tmp_path, monkeypatch):
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv(inception.WEIGHTS_ENV, raising=False)
    monkeypatch.setenv(inception.WEIGHTS_URL_ENV, f"http://127.0.0.1:{port}/{inception.WEIGHTS_NAME}")
    with pytest.raises(DownloadError) as info:
        load_inception()
    message = str(info.value)
    assert "\n" not in message and f"127.0.0.1:{port}" in message and "--inception_path" in message


def test_adm_graph_downloads_when_no_tf_graph_is_given(server, tmp_path):
    """`evaluator.py REF SAMPLE --features tf` without --tf_graph: ADM's graph is fetched (here a small
    stand-in graph with its tensor names), imported as a check, kept in the cache and used; a file that is
    not a graph is refused and not kept. TensorFlow runs in a child process, as in test_evaluator_tf."""
    folder, url = server
    oracle = [sys.executable, str(ROOT / "tests" / "tf_adm_oracle.py"), "build"]
    subprocess.run([*oracle, str(folder / "classify_image_graph_def.pb")], check=True, capture_output=True,
                   timeout=300)
    (folder / "broken.pb").write_bytes(b"<html>not found</html>")
    rng = np.random.default_rng(2)
    for name in ("ref.npz", "sample.npz"):
        np.savez(tmp_path / name, rng.integers(0, 256, (8, 32, 32, 3), dtype=np.uint8))
    env = {**os.environ, "HOME": str(tmp_path / "home"), "GD_TF_GRAPH_URL": url + "broken.pb"}
    cmd = [sys.executable, str(ROOT / "evaluations" / "evaluator.py"), str(tmp_path / "ref.npz"),
           str(tmp_path / "sample.npz"), "--features", "tf"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    cache = tmp_path / "home" / ".cache" / "guided_diffusion"
    assert proc.returncode == 2 and "--tf_graph" in proc.stderr.strip().splitlines()[-1], proc.stderr[-2000:]
    assert _leftovers(cache) == []
    env["GD_TF_GRAPH_URL"] = url + "classify_image_graph_def.pb"
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "FID:" in proc.stdout, proc.stderr[-2000:]
    assert _leftovers(cache) == ["classify_image_graph_def.pb"]


def test_a_truncated_download_is_one_line_and_leaves_nothing(tmp_path):
    """The server promises 1000 bytes and closes after 10: no half file in the cache, one line."""

    class Truncating(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's name)
            self.send_response(200)
            self.send_header("Content-Length", "1000")
            self.end_headers()
            self.wfile.write(b"x" * 10)
            self.wfile.flush()
            self.connection.close()

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Truncating)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{httpd.server_address[1]}/weights.pth"
    cache = tmp_path / "cache"
    try:
        with pytest.raises(DownloadError) as info:
            fetch_verified(url, cache / "weights.pth", lambda path: None, "--inception_path")
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert "\n" not in str(info.value) and url in str(info.value)
    assert _leftovers(cache) == []
