"""Tokenizer, text loader and the download helper (against a local HTTP server)."""

import hashlib
import http.server
import socket
import threading

import pytest
import torch

from common import UserError
from common.data import EOT, TextLoader, download, get_tokenizer, load_text


def test_tokenizer_known_ids():
    enc = get_tokenizer()
    ids = enc.encode("Hello, I'm a language model,")
    assert ids == [15496, 11, 314, 1101, 257, 3303, 2746, 11]
    assert enc.eot_token == EOT == 50256 and enc.n_vocab == 50257


def test_loader_shapes_shift_and_wrap():
    tokens = list(range(100))
    loader = TextLoader(tokens, batch_size=2, seq_len=8)  # 16 tokens a batch
    x, y = loader.next_batch()
    assert x.shape == y.shape == (2, 8) and x.dtype == torch.int64
    assert x[0].tolist() == list(range(8)) and x[1].tolist() == list(range(8, 16))
    assert torch.equal(y, x + 1)  # targets are the inputs shifted by one
    seen = [x[0, 0].item()]
    for _ in range(6):
        x, y = loader.next_batch()
        seen.append(x[0, 0].item())
    # 100 tokens hold 6 full batches (the 6th needs token 96 as its last target); then wrap
    assert seen == [0, 16, 32, 48, 64, 80, 0]
    assert torch.equal(y, x + 1)


def test_loader_too_short_is_user_error():
    with pytest.raises(UserError, match="shorter than one batch"):
        TextLoader(list(range(10)), batch_size=2, seq_len=8)


def test_load_text_missing_file_is_user_error(tmp_path):
    with pytest.raises(UserError, match="input file not found"):
        load_text(tmp_path / "nope.txt")


class _Handler(http.server.SimpleHTTPRequestHandler):
    hits = []

    def do_GET(self):
        _Handler.hits.append(self.path)
        super().do_GET()

    def log_message(self, *args):  # keep test output clean
        pass


@pytest.fixture()
def server(tmp_path):
    """A static file server on 127.0.0.1 serving tmp_path/www, for the download tests."""
    root = tmp_path / "www"
    root.mkdir()
    (root / "data.txt").write_bytes(b"to be or not to be\n" * 1000)
    handler = lambda *a, **kw: _Handler(*a, directory=str(root), **kw)
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    _Handler.hits = []
    yield f"http://127.0.0.1:{httpd.server_address[1]}", root
    httpd.shutdown()
    httpd.server_close()


def test_download_fresh_then_cached(server, tmp_path):
    url, root = server
    sha = hashlib.sha256((root / "data.txt").read_bytes()).hexdigest()
    dest = tmp_path / "cache" / "data.txt"
    assert download(f"{url}/data.txt", dest, sha256=sha) == dest
    assert dest.read_bytes() == (root / "data.txt").read_bytes()
    assert _Handler.hits == ["/data.txt"]
    download(f"{url}/data.txt", dest, sha256=sha)  # second call: from the cache
    assert _Handler.hits == ["/data.txt"]
    assert list(dest.parent.iterdir()) == [dest]  # no temp files left


def test_download_checksum_mismatch_leaves_nothing(server, tmp_path):
    url, _ = server
    dest = tmp_path / "cache" / "data.txt"
    with pytest.raises(UserError, match="checksum mismatch"):
        download(f"{url}/data.txt", dest, sha256="0" * 64)
    assert not dest.exists() and list(dest.parent.iterdir()) == []


def test_download_missing_url_is_user_error(server, tmp_path):
    url, _ = server
    with pytest.raises(UserError, match="could not download"):
        download(f"{url}/absent.txt", tmp_path / "x.txt")
    assert not (tmp_path / "x.txt").exists()


def test_download_unreachable_host_is_user_error(tmp_path):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dest = tmp_path / "x.txt"
    with pytest.raises(UserError, match=f"put the file at {dest}"):
        download(f"http://127.0.0.1:{port}/input.txt", dest, timeout=5)
    assert not dest.exists()


def test_load_text_downloads_tiny_shakespeare_into_cache(
    server, tmp_path, monkeypatch, shakespeare
):
    """The real code path of stages 02-06 with no --input: URL -> cache -> sha256 check
    (served here: the sample of tiny shakespeare under its own checksum)."""
    import common.data as data

    url, root = server
    (root / "input.txt").write_bytes(shakespeare.read_bytes())
    monkeypatch.setenv("GPT_FROM_SCRATCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(data, "TINY_SHAKESPEARE_URL", f"{url}/input.txt")
    monkeypatch.setattr(data, "TINY_SHAKESPEARE_SHA256", data.sha256_of(shakespeare))
    text = load_text()
    assert (
        text == shakespeare.read_text() and (tmp_path / "cache" / "tinyshakespeare.txt").is_file()
    )
