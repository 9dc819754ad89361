#!/usr/bin/env python3
"""Soak the API server: N short requests (default 1000) to `mpiexec -n 2 dllama-mpi api` on
127.0.0.1 with the tiny Qwen3 model, a few clients at a time; samples the RSS of every rank (the
processes under mpiexec, from /proc) at the start, every 100 requests and at the end, and prints
the numbers. Bounded: at most --requests requests and --max-seconds seconds.

    .venv/bin/python scripts/api_soak.py [--requests 1000] [--clients 4] [--nodes 2]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
TINY = ROOT / "tests" / "data" / "tiny"
sys.path.insert(0, str(ROOT / "tests"))
from procs import descendants  # noqa: E402  (the tests' /proc helpers)


def rank_rss(mpiexec_pid: int) -> dict[int, int]:
    """{rank: RSS in KiB} of the ranks under mpiexec (PMI_RANK in their environment)."""
    out = {}
    for pid in descendants(mpiexec_pid):
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            rank = next((int(e[9:]) for e in env if e.startswith(b"PMI_RANK=")), None)
            if rank is None:
                continue
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    out[rank] = int(line.split()[1])
        except (OSError, ValueError):
            pass
    return dict(sorted(out.items()))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--nodes", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--max-seconds", type=float, default=600)
    args = ap.parse_args()
    if not 0 < args.requests <= 100000:
        ap.error("--requests must be in 1..100000")

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    dllama = [str(BIN / "dllama-mpi")] if (BIN / "dllama-mpi").exists() else [sys.executable, "-m", "dllama_mpi.cli"]
    cmd = [str(BIN / "mpiexec"), "-n", str(args.nodes), *dllama, "api", "--host", "127.0.0.1", "--port", str(port),
           "--model", str(TINY / "m" / "dllama_model_tiny_qwen3_q40.m"),
           "--tokenizer", str(TINY / "t" / "dllama_tokenizer_tiny_qwen3.t")]
    log = open(os.devnull, "w")
    server = subprocess.Popen(cmd, stdout=log, stderr=log, stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 60
        while True:
            try:
                with urllib.request.urlopen(url + "/health", timeout=1):
                    break
            except OSError:
                if time.time() > deadline or server.poll() is not None:
                    print("server did not start", file=sys.stderr)
                    return 1
                time.sleep(0.1)

        def one(i: int) -> bool:
            body = {"messages": [{"role": "user", "content": f"request {i}: say something"}],
                    "max_tokens": args.max_tokens, "temperature": 0.7, "seed": i}
            req = urllib.request.Request(url + "/v1/chat/completions", data=json.dumps(body).encode(),
                                         method="POST", headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(req, timeout=60) as r:
                    return r.status == 200 and json.loads(r.read())["choices"][0]["message"] is not None
            except OSError:
                return False

        samples = [(0, rank_rss(server.pid))]
        print(f"start: RSS KiB per rank {samples[0][1]}", flush=True)
        ok = failed = done = 0
        t0 = time.time()
        with ThreadPoolExecutor(args.clients) as ex:
            while done < args.requests and time.time() - t0 < args.max_seconds:
                n = min(100, args.requests - done)
                for good in ex.map(one, range(done, done + n)):
                    ok += good
                    failed += not good
                done += n
                samples.append((done, rank_rss(server.pid)))
                print(f"{done:6d} requests ({ok} ok, {failed} failed), {time.time() - t0:6.1f} s, "
                      f"RSS KiB {samples[-1][1]}", flush=True)
        dt = time.time() - t0
        first, last = samples[0][1], samples[-1][1]
        print(f"done: {done} requests, {ok} ok, {failed} failed in {dt:.1f} s ({done / dt:.1f} req/s)")
        for r in sorted(first):
            print(f"rank {r}: RSS {first[r]} KiB at start -> {last.get(r, 0)} KiB at end "
                  f"({last.get(r, 0) - first[r]:+d} KiB)")
        return 0 if failed == 0 and done == args.requests else 1
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()


if __name__ == "__main__":
    sys.exit(main())
