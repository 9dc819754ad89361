#!/usr/bin/env python3
"""Failover soak for `dllama-mpi serve`: K concurrent greedy streams, the worker SIGKILLed mid-stream,
again and again; every stream must complete with the text of an undisturbed run.

    .venv/bin/python scripts/failover_soak.py [--kills 20] [--streams 4] [--max-tokens 40] [--ranks 2]
        [--model M --tokenizer T] [--json out.json]

First one undisturbed round of the K streams (the reference), then --kills rounds: start the K
streams, wait until every one has streamed a few chunks, SIGKILL rank 1 (the worker), and wait for
all K to finish. Per kill it records the pause each stream saw (kill -> its next chunk, the largest
of the K: "kill -> next token"), when the supervisor logged the loss and the recovery (seconds after
the kill), the relaunched job's model load time, and whether every stream's text, finish reason and
token count equal the reference. Prints one line per kill and a JSON summary (stdout; --json also
writes it to a file). Exit status 1 if any request was lost or differs.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
BIN = ROOT / ".venv" / "bin"

PROMPTS = ["Write a long story about a lighthouse keeper and a storm.",
           "Explain in detail how a steam engine works.",
           "Describe a walk through a busy market in the morning.",
           "Tell me everything you know about the history of bread.",
           "Write a letter to a friend about a trip to the mountains.",
           "Describe how bees make honey, step by step.",
           "Tell a story about a robot learning to paint.",
           "Explain how a city's water supply works."]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, args):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [str(BIN / "dllama-mpi"), "serve", "-n", str(args.ranks), "--parallel", str(max(4, args.streams)),
               "--port", str(self.port), "--no-web-ui", "--max-restarts", str(args.kills + 5)]
        if args.model:
            cmd += ["--model", args.model, "--tokenizer", args.tokenizer]
        self.lines: list[tuple[float, str]] = []
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                                     start_new_session=True)
        threading.Thread(target=self._pump, daemon=True).start()
        deadline = time.time() + 300
        while time.time() < deadline:
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    h = json.loads(r.read())
                    if h.get("status") == "ok":
                        self.model = h["model"]
                        return
            except OSError:
                pass
            if self.proc.poll() is not None:
                break
            time.sleep(0.1)
        self.stop()
        raise SystemExit("serve did not come up:\n" + "\n".join(l for _, l in self.lines[-30:]))

    def _pump(self):
        for raw in iter(self.proc.stderr.readline, b""):
            self.lines.append((time.monotonic(), raw.decode("utf-8", "replace").rstrip()))

    def worker_pid(self) -> int:
        from procs import descendants, environ

        for pid in descendants(self.proc.pid):
            if environ(pid).get("PMI_RANK") == "1":
                return pid
        raise RuntimeError("no rank 1 process")

    def line_after(self, t: float, pattern: str, timeout: float = 120) -> tuple[float, str] | None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for tl, line in list(self.lines):
                if tl >= t and re.search(pattern, line):
                    return tl, line
            time.sleep(0.02)
        return None

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def run_round(client, model, prompts, max_tokens, kill=None, after_chunks=6):
    """Returns (texts, finishes, tokens, kill time, pause) for one round of concurrent streams."""
    chunks = [[] for _ in prompts]
    finish, tokens, errors = [None] * len(prompts), [None] * len(prompts), []

    def one(i):
        try:
            for ch in client.chat.completions.create(model=model, messages=[{"role": "user", "content": prompts[i]}],
                                                     max_tokens=max_tokens, temperature=0, stream=True,
                                                     stream_options={"include_usage": True}):
                if ch.usage is not None:
                    tokens[i] = ch.usage.completion_tokens
                if ch.choices:
                    if ch.choices[0].delta.content:
                        chunks[i].append((time.monotonic(), ch.choices[0].delta.content))
                    if ch.choices[0].finish_reason:
                        finish[i] = ch.choices[0].finish_reason
        except Exception as e:  # noqa: BLE001
            errors.append(f"stream {i}: {type(e).__name__}: {e}")

    threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(len(prompts))]
    for t in threads:
        t.start()
    t_kill = None
    if kill is not None:
        while not all(len(c) >= after_chunks for c in chunks) and not errors and None in finish:
            time.sleep(0.005)
        t_kill = time.monotonic()
        kill()
    for t in threads:
        t.join(600)
    texts = ["".join(x for _, x in c) for c in chunks]
    pause = None
    if t_kill is not None:
        nxt = [next((t for t, _ in c if t > t_kill), None) for c in chunks]
        pause = max(t - t_kill for t in nxt if t is not None) if any(t is not None for t in nxt) else None
    return texts, finish, tokens, errors, t_kill, pause


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kills", type=int, default=20)
    ap.add_argument("--streams", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=40)
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--model")
    ap.add_argument("--tokenizer")
    ap.add_argument("--json")
    args = ap.parse_args()
    import openai

    prompts = (PROMPTS * 4)[:args.streams]
    srv = Server(args)
    try:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0, timeout=600)
        ref = run_round(client, srv.model, prompts, args.max_tokens)
        if ref[3]:
            raise SystemExit(f"the reference round failed: {ref[3]}")
        loads = [float(m) for _, l in srv.lines for m in re.findall(r"loaded in ([\d.]+) s", l)]
        rows = []
        for k in range(args.kills):
            pid = srv.worker_pid()
            texts, finish, tokens, errors, t_kill, pause = run_round(
                client, srv.model, prompts, args.max_tokens, kill=lambda: os.kill(pid, signal.SIGKILL))
            lost = srv.line_after(t_kill, r"^serve: lost the MPI job")
            rec = srv.line_after(t_kill, r"^serve: recovered in")
            load = srv.line_after(t_kill, r"\bloaded in [\d.]+ s$")
            same = texts == ref[0] and finish == ref[1] and tokens == ref[2]
            row = {"kill": k + 1, "completed": sum(f is not None for f in finish) if not errors else 0,
                   "identical": same, "errors": errors, "kill_to_next_token_s": pause,
                   "kill_to_loss_logged_s": lost[0] - t_kill if lost else None,
                   "kill_to_recovered_logged_s": rec[0] - t_kill if rec else None,
                   "load_s": float(re.search(r"loaded in ([\d.]+) s", load[1]).group(1)) if load else None}
            rows.append(row)
            print(f"kill {k + 1}: {row['completed']}/{len(prompts)} streams complete, identical {same}, "
                  f"kill -> next token {pause:.2f} s (loss logged +{row['kill_to_loss_logged_s']:.2f} s, recovered "
                  f"+{row['kill_to_recovered_logged_s']:.2f} s, load {row['load_s']} s)", file=sys.stderr, flush=True)
        pauses = [r["kill_to_next_token_s"] for r in rows if r["kill_to_next_token_s"] is not None]
        summary = {"kills": args.kills, "streams": args.streams, "max_tokens": args.max_tokens, "ranks": args.ranks,
                   "model": srv.model, "requests": args.kills * len(prompts),
                   "lost_requests": sum(len(prompts) - r["completed"] for r in rows),
                   "differing_rounds": sum(not r["identical"] for r in rows),
                   "kill_to_next_token_s": {"median": statistics.median(pauses), "max": max(pauses),
                                            "min": min(pauses)} if pauses else None,
                   "load_s": {"first": loads[0] if loads else None,
                              "median_relaunch": statistics.median([r["load_s"] for r in rows if r["load_s"]])
                              if rows else None},
                   "rounds": rows}
        out = json.dumps(summary, indent=1)
        print(out)
        if args.json:
            Path(args.json).write_text(out)
        return 0 if summary["lost_requests"] == 0 and summary["differing_rounds"] == 0 else 1
    finally:
        srv.stop()


if __name__ == "__main__":
    sys.exit(main())
