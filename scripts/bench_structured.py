#!/usr/bin/env python3
"""What structured output costs: for each model, `mpiexec -n RANKS dllama-mpi api --parallel 8` on
127.0.0.1, then rounds of S concurrent streamed chat requests (S in --streams), free and with a JSON
schema (response_format json_schema, bounded so every answer finishes), alternating. Reports:

- decode tok/s per stream (tokens after the first / time from the first to the last token, mean over
  the streams of a configuration) and in all (every stream's tokens / the round's wall time);
- the mask cost per token: every constrained answer's tokens (returned as ids) replayed offline
  through a fresh matcher of the same schema, timing the mask before each token (grammar.Matcher.fill,
  what rank 0 computes while the pass runs): mean and p99 in microseconds.

    nice -n 19 .venv/bin/python scripts/bench_structured.py [--models smollm2,gemma3] [--ranks 2]
        [--streams 1,8] [--rounds 3] [--max-tokens 64] [--schema person|long] [--json OUT]

A quick check of the script itself: --models smollm2 --streams 1,2 --rounds 1 --max-tokens 8.
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

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
DLLAMA = [str(BIN / "dllama-mpi")] if (BIN / "dllama-mpi").exists() else [sys.executable, "-m", "dllama_mpi.cli"]
MPIEXEC = str(BIN / "mpiexec") if (BIN / "mpiexec").exists() else "mpiexec"

PERSON = {"type": "object", "additionalProperties": False, "required": ["name", "age", "city", "pets"],
          "properties": {"name": {"type": "string", "maxLength": 16},
                         "age": {"type": "integer", "minimum": 0, "maximum": 120},
                         "city": {"type": "string", "maxLength": 16},
                         "pets": {"type": "array", "maxItems": 3, "items": {"enum": ["cat", "dog", "fish"]}}}}
# --schema long: a string no answer can close within max_tokens, so that constrained and free answers
# decode the same number of tokens (both end with "length") and their speeds compare like for like
LONG = {"type": "object", "additionalProperties": False, "required": ["story"],
        "properties": {"story": {"type": "string", "minLength": 4000}}}
SCHEMAS = {"person": PERSON, "long": LONG}
RESPONSE_FORMAT = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
PROMPT = "Describe a person you made up: name, age, city and pets."


def models(names: list[str]) -> list[tuple[str, str, str | None, list[str]]]:
    """(name, model, tokenizer, extra api options) of each model asked for."""
    out = []
    for name in names:
        if name == "smollm2":
            from dllama_mpi.convert.smollm2 import default_models_dir, ensure_default_model

            m, t = ensure_default_model(default_models_dir())
            out.append((name, str(m), str(t) if t else None, []))
        elif name == "gemma3":
            from dllama_mpi.convert.gemma3 import ensure_gemma3

            out.append((name, str(ensure_gemma3(quiet=True)[0]), None, ["--chat-template", "gemma3"]))
        else:
            sys.exit(f"unknown model {name!r} (smollm2, gemma3)")
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model, tokenizer, extra, ranks: int, log) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [MPIEXEC, "-n", str(ranks), *DLLAMA, "api", "--model", model, *(["--tokenizer", tokenizer] if tokenizer
                                                                          else []),
           "--port", str(port), "--parallel", "8", "--no-web-ui", *extra]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=ROOT,
                            env=dict(os.environ, PYTHONPATH=str(ROOT)), start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 300
    while time.time() < deadline:
        if proc.poll() is not None:
            sys.exit(f"the server exited with {proc.returncode} (log: {log.name})")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2):
                return proc, url
        except OSError:
            time.sleep(0.2)
    stop_server(proc)
    sys.exit(f"the server did not answer /health (log: {log.name})")


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def one_stream(client, model_id: str, constrained: bool, max_tokens: int, seed: int) -> dict:
    """One streamed request: its token ids and the times of its first and last tokens."""
    kw = dict(model=model_id, messages=[{"role": "user", "content": PROMPT}], max_tokens=max_tokens,
              temperature=1.0, seed=seed, stream=True, logprobs=True,
              extra_body={"return_tokens_as_token_ids": True})
    if constrained:
        kw["response_format"] = RESPONSE_FORMAT
    ids, times, finish = [], [], None
    for chunk in client.chat.completions.create(**kw):
        for c in chunk.choices:
            for lp in (c.logprobs.content if c.logprobs and c.logprobs.content else []):
                ids.append(int(lp.token.split(":")[1]))
                times.append(time.perf_counter())
            finish = c.finish_reason or finish
    rate = (len(ids) - 1) / (times[-1] - times[0]) if len(ids) > 1 and times[-1] > times[0] else float("nan")
    return {"ids": ids, "tok_s": rate, "finish": finish}


def mask_costs(tokenizer, answers: list[list[int]]) -> list[float]:
    """Seconds of each mask along the constrained answers, replayed through fresh matchers."""
    from dllama_mpi.grammar import Grammars

    gs = Grammars(tokenizer, tokenizer.vocab_size)
    g = gs.compile(RESPONSE_FORMAT)
    out, mask = [], np.zeros(gs.words, np.int32)
    for ids in answers:
        m = g.matcher()
        for t in ids:
            t0 = time.perf_counter()
            m.fill(mask)
            out.append(time.perf_counter() - t0)
            if not m.consume(t):
                break
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="smollm2,gemma3")
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--streams", default="1,8", help="concurrent streams, comma-separated")
    ap.add_argument("--rounds", type=int, default=3, help="rounds per configuration (free / schema alternate)")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--schema", choices=sorted(SCHEMAS), default="person",
                    help="person: a bounded object (answers close early); long: answers run to --max-tokens on both sides")
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("--log", default="/tmp/bench_structured.log", help="the servers' output")
    args = ap.parse_args()
    global RESPONSE_FORMAT
    RESPONSE_FORMAT = {"type": "json_schema", "json_schema": {"name": args.schema, "schema": SCHEMAS[args.schema],
                                                             "strict": True}}
    import openai

    from dllama_mpi.startup import load_tokenizer

    streams = [int(x) for x in args.streams.split(",")]
    results = []
    with open(args.log, "wb") as log:
        for name, model, tokenizer, extra in models(args.models.split(",")):
            proc, url = start_server(model, tokenizer, extra, args.ranks, log)
            try:
                client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=600)
                model_id = client.models.list().data[0].id
                one_stream(client, model_id, True, 4, 0)   # warm-up (the llguidance tokenizer is built)
                runs = {(s, c): [] for s in streams for c in (False, True)}
                walls = {k: [] for k in runs}
                seed = 1
                for _ in range(args.rounds):
                    for s in streams:
                        for constrained in (False, True):
                            t0 = time.perf_counter()
                            with ThreadPoolExecutor(s) as pool:
                                got = list(pool.map(lambda k: one_stream(client, model_id, constrained,
                                                                         args.max_tokens, seed + k), range(s)))
                            walls[(s, constrained)].append((sum(len(r["ids"]) for r in got),
                                                            time.perf_counter() - t0))
                            runs[(s, constrained)].extend(got)
                            seed += s
            finally:
                stop_server(proc)
            tok = load_tokenizer(model, tokenizer)
            for s in streams:
                costs = np.array(mask_costs(tok, [r["ids"] for r in runs[(s, True)]])) * 1e6
                row = {"model": name, "ranks": args.ranks, "streams": s, "schema": args.schema}
                for constrained in (False, True):
                    key = "schema" if constrained else "free"
                    rates = [r["tok_s"] for r in runs[(s, constrained)] if np.isfinite(r["tok_s"])]
                    tokens, wall = map(sum, zip(*walls[(s, constrained)]))
                    row[f"{key}_stream_tok_s"] = round(float(np.mean(rates)), 2) if rates else None
                    row[f"{key}_total_tok_s"] = round(tokens / wall, 2)
                    row[f"{key}_finish"] = sorted({r["finish"] for r in runs[(s, constrained)]})
                row["schema_vs_free"] = (round(row["schema_stream_tok_s"] / row["free_stream_tok_s"], 3)
                                         if row["free_stream_tok_s"] and row["schema_stream_tok_s"] else None)
                row["mask_us_mean"] = round(float(costs.mean()), 1) if costs.size else None
                row["mask_us_p99"] = round(float(np.percentile(costs, 99)), 1) if costs.size else None
                row["masks"] = int(costs.size)
                results.append(row)
                print(json.dumps(row), flush=True)
    print("\n| model | ranks | streams | free tok/s (per stream / all) | schema tok/s (per stream / all) | "
          "schema / free | mask µs mean | mask µs p99 |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['model']} | {r['ranks']} | {r['streams']} | {r['free_stream_tok_s']} / {r['free_total_tok_s']} | "
              f"{r['schema_stream_tok_s']} / {r['schema_total_tok_s']} | {r['schema_vs_free']} | "
              f"{r['mask_us_mean']} | {r['mask_us_p99']} |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
