"""`dllama-mpi batch`: thousands of prompts through the continuous-batching scheduler (the HPC use).

Input: JSONL, one request per line: {"id": ..., "prompt": "..."} or {"id": ..., "messages": [...]}
(rendered with the model's chat template), optionally "max_tokens", "temperature", "top_p", "seed",
"stop" (a string or a list), "response_format" (as in the API: json_object or json_schema; the text
is then a JSON value valid under the schema). The whole file is checked before the model loads, and
its schemas are compiled before the first token: a bad line is one `error:` naming its line number.

Output: one JSON line per request as it finishes (so not in input order): id, text, token counts,
finish_reason, timings. Each line is written whole and flushed; a rerun with the same --out skips
the ids already there (a last line cut short by a kill is dropped first), so a killed job resumes
where it stopped. A progress bar with the aggregate tokens/s goes to stderr.
"""

from __future__ import annotations

import json
import os
import sys
import time

import click

from . import startup
from .errors import ConfigError
from .startup import log, model_options, sampling_options, spec_config, spec_options, spmd, start

FIELDS = {"id", "prompt", "messages", "max_tokens", "temperature", "top_p", "seed", "stop", "response_format"}


def read_requests(path: str) -> list[dict]:
    """The JSONL file's requests, checked; ConfigError naming the line of the first bad one."""
    if not os.path.isfile(path):
        raise ConfigError(f"{path}: prompts file not found")
    out, seen = [], {}
    with open(path, "rb") as f:
        for no, raw in enumerate(f, 1):
            where = f"{path}:{no}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise ConfigError(f"{where}: not UTF-8") from None
            if not line.strip():
                continue
            try:
                d = json.loads(line)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(d, dict):
                raise ConfigError(f"{where}: each line must be a JSON object")
            extra = sorted(set(d) - FIELDS)
            if extra:
                raise ConfigError(f"{where}: unknown field {extra[0]!r} (known: {', '.join(sorted(FIELDS))})")
            rid = d.get("id")
            if not isinstance(rid, (str, int)) or isinstance(rid, bool) or rid == "":
                raise ConfigError(f"{where}: 'id' must be a non-empty string or an integer")
            key = str(rid)
            if key in seen:
                raise ConfigError(f"{where}: id {rid!r} is already used on line {seen[key]}")
            seen[key] = no
            if ("prompt" in d) == ("messages" in d):
                raise ConfigError(f"{where}: give exactly one of 'prompt' and 'messages'")
            if "prompt" in d and (not isinstance(d["prompt"], str) or not d["prompt"]):
                raise ConfigError(f"{where}: 'prompt' must be a non-empty string")
            if "messages" in d:
                from .api import ApiError, parse_messages

                try:
                    d["messages"] = parse_messages(d)
                except ApiError as e:
                    raise ConfigError(f"{where}: {e.message}") from None
            for k, lo, hi in (("temperature", 0, 2), ("top_p", 0, 1)):
                v = d.get(k)
                if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not lo <= v <= hi):
                    raise ConfigError(f"{where}: '{k}' must be a number in [{lo}, {hi}], got {v!r}")
            for k in ("max_tokens", "seed"):
                v = d.get(k)
                if v is not None and (isinstance(v, bool) or not isinstance(v, int) or (k == "max_tokens" and v < 1)):
                    raise ConfigError(f"{where}: '{k}' must be {'a positive' if k == 'max_tokens' else 'an'} integer, "
                                      f"got {v!r}")
            stop = d.get("stop")
            if isinstance(stop, str):
                d["stop"] = [stop]
            elif stop is not None and not (isinstance(stop, list) and all(isinstance(s, str) for s in stop)):
                raise ConfigError(f"{where}: 'stop' must be a string or a list of strings")
            if d.get("response_format") is not None:
                from .grammar import GrammarError, schema_of

                try:
                    schema_of(d["response_format"])
                except GrammarError as e:
                    raise ConfigError(f"{where}: {e}") from None
            d["_line"] = no
            out.append(d)
    if not out:
        raise ConfigError(f"{path}: no requests")
    return out


def done_ids(out_path: str) -> set[str]:
    """Ids already in the results file; a last line without its newline (a kill mid-write) is cut."""
    if not os.path.exists(out_path):
        return set()
    with open(out_path, "rb+") as f:
        data = f.read()
        end = data.rfind(b"\n") + 1
        if end < len(data):
            f.truncate(end)
    ids = set()
    for no, line in enumerate(data[:end].splitlines(), 1):
        try:
            ids.add(str(json.loads(line)["id"]))
        except (ValueError, KeyError, TypeError):
            raise ConfigError(f"{out_path}:{no}: not a result line of dllama-mpi batch") from None
    return ids


@click.command("batch")
@model_options
@sampling_options
@spec_options
@click.option("--prompts", "prompts_path", required=True, type=click.Path(dir_okay=False),
              help="JSONL requests: id, prompt or messages, optional max_tokens/temperature/top_p/seed/stop/response_format.")
@click.option("--out", "out_path", required=True, type=click.Path(dir_okay=False),
              help="JSONL results, appended; ids already there are skipped (resume).")
@click.option("--parallel", type=int, default=8, show_default=True, help="Sequences decoded together.")
@click.option("--max-tokens", type=int, default=256, show_default=True, help="Default per request.")
@click.option("--chat-template", default=None, help="Override the tokenizer's chat template (for 'messages').")
@spmd
def batch(comm, model_path, tokenizer_path, nthreads, buffer_float_type, max_seq_len, sync_scheme, load, max_batch,
          temperature, topp, seed, prompts_path, out_path, parallel, max_tokens, chat_template):
    """Run a JSONL file of prompts, writing one result line per prompt as it finishes."""
    todo = []
    if comm.is_root:
        spec = spec_config()
        if max_tokens < 1:
            raise ConfigError(f"--max-tokens must be >= 1, got {max_tokens}")
        requests = read_requests(prompts_path)
        skip = done_ids(out_path)
        todo = [d for d in requests if str(d["id"]) not in skip]
        log(f"{len(requests)} requests in {prompts_path}, {len(requests) - len(todo)} already in {out_path}, "
            f"{len(todo)} to run")
    engine, tokenizer = start(comm, model_path, tokenizer_path, nthreads, buffer_float_type, max_seq_len,
                              sync_scheme, load, max_batch, n_slots=parallel)
    if not comm.is_root:
        engine.serve()
        return
    try:
        _run(engine, tokenizer, todo, out_path, parallel,
             {"max_tokens": max_tokens, "temperature": temperature, "top_p": topp, "seed": seed}, chat_template, spec)
    finally:
        engine.stop_workers()


def _run(engine, tokenizer, todo, out_path, parallel, defaults, chat_template, spec=None) -> None:
    from tqdm import tqdm

    from .chat import render_prompt, template_for
    from .sampler import Sampler
    from .scheduler import Request, RequestError, Scheduler

    sched = Scheduler(engine, tokenizer, spec=spec)
    grammars = _compile_formats(engine, tokenizer, todo)
    template = None
    bar = tqdm(total=len(todo), unit="req", file=sys.stderr, dynamic_ncols=True,
               disable=None if sys.stderr.isatty() else True)
    t0 = time.perf_counter()
    counts = {"done": 0, "tokens": 0}
    startup.sigterm_note = lambda: (f"{counts['done']} result(s) written to {out_path} in this run, "
                                    f"{len(todo) - counts['done']} to go: rerun with the same --out to resume")
    with open(out_path, "a", encoding="utf-8") as out:
        def finished(d, req, st):
            line = json.dumps({
                "id": d["id"], "text": "".join(req.pieces), "prompt_tokens": st.prompt_tokens,
                "completion_tokens": st.generated_tokens,
                "cached_tokens": st.prompt_tokens - st.evaluated_prompt_tokens,
                "finish_reason": st.finish_reason,
                "timings": {"queue_s": round(st.queue_seconds, 4), "prompt_s": round(st.prompt_seconds, 4),
                            "generate_s": round(st.generate_seconds, 4),
                            "time_to_first_token_s": round(st.ttft_seconds, 4),
                            "generation_tokens_per_s": round(st.generate_tps, 3),
                            "tokens_per_pass": round(st.tokens_per_pass, 4), "acceptance": round(st.acceptance, 4)}},
                ensure_ascii=False) + "\n"
            with startup.output_lock:   # a SIGTERM waits for the whole line
                out.write(line)
                out.flush()
                counts["done"] += 1
            counts["tokens"] += st.generated_tokens
            bar.update(1)
            bar.set_postfix_str(f"{counts['tokens'] / (time.perf_counter() - t0):.1f} tok/s")

        def make(d):
            nonlocal template
            if "messages" in d:
                if template is None:
                    template = template_for(tokenizer, chat_template)
                ids = tokenizer.encode(render_prompt(template, d["messages"], f"line {d['_line']}"), add_bos=False)
            else:
                ids = tokenizer.encode(d["prompt"])
            get = lambda k: d[k] if d.get(k) is not None else defaults[k]  # noqa: E731
            g = grammars.get(d["_line"])
            req = Request(ids, get("max_tokens"), Sampler(tokenizer.vocab_size, get("temperature"), get("top_p"),
                                                          get("seed")), d.get("stop") or (),
                          grammar=g.matcher() if g is not None else None)
            req.pieces = []

            def sink(kind, value, d=d, req=req):
                if kind == "piece":
                    req.pieces.append(value.text)
                else:
                    finished(d, req, value)
            req.sink = sink
            return req

        pending = list(reversed(todo))
        while pending or sched.busy:
            # keep the queue short: a request is tokenized when a slot is about to need it
            while pending and len(sched.waiting) < parallel:
                d = pending.pop()
                req = make(d)
                try:
                    sched.submit(req)
                except RequestError as e:
                    raise ConfigError(f"line {d['_line']}: {e}") from None
            sched.step()
    bar.close()
    dt = time.perf_counter() - t0
    log(f"{counts['done']} requests, {counts['tokens']} tokens in {dt:.1f} s "
        f"({counts['tokens'] / dt if dt else 0:.1f} tok/s) -> {out_path}")


def _compile_formats(engine, tokenizer, todo) -> dict:
    """line -> compiled grammar of every line with a response_format (each distinct one compiled
    once), before any token; ConfigError naming the first line whose schema cannot be compiled."""
    from .grammar import GrammarError, Grammars

    out, seen, grammars = {}, {}, None
    for d in todo:
        rf = d.get("response_format")
        if rf is None:
            continue
        grammars = grammars or Grammars(tokenizer, engine.h.vocab_size)
        key = json.dumps(rf, sort_keys=True)
        try:
            if key not in seen:
                seen[key] = grammars.compile(rf)
        except GrammarError as e:
            raise ConfigError(f"line {d['_line']}: {e}") from None
        if seen[key] is not None:
            out[d["_line"]] = seen[key]
    return out


def register(group) -> None:
    group.add_command(batch)
