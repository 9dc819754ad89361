"""Structured output (grammar.py): the grammar masks on real tokenizers, the mask and log-probability
kernels on vocabulary slices, the sampler on masked rows; then the default SmolLM2 model under
`mpiexec -n 2 dllama-mpi api` driven by the official openai client (JSON schemas at temperatures 0
and 1, n = 3, streamed and not: every answer ends with "stop" and validates; `.parse()` with a
Pydantic model; hostile schemas refused with a 400; free streams beside constrained ones unchanged),
`inference --json-schema` giving the same tokens at N = 1, N = 2 and with --pp 2, and seeded answers
the same on 1, 2 and 4 ranks with --as-nodes."""

from __future__ import annotations

import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from dllama_mpi.grammar import GrammarError, Grammars, allowed, check_pattern, schema_of
from dllama_mpi.kernels import ffi, lib
from dllama_mpi.sampler import Sampler
from dllama_mpi.tokenizer import Tokenizer

from conftest import default_smollm2_or_skip
from test_api import DLLAMA, MPIEXEC, ROOT, ApiServer

jsonschema = pytest.importorskip("jsonschema")

PERSON = {"type": "object", "additionalProperties": False, "required": ["name", "age", "pets"],
          "properties": {"name": {"type": "string", "maxLength": 12},
                         "age": {"type": "integer", "minimum": 0, "maximum": 120},
                         "pets": {"type": "array", "maxItems": 3, "items": {"enum": ["cat", "dog", "fish"]}}}}

HOSTILE = {   # each must be refused (a 400 over HTTP) before any token
    "deep nesting": {"$comment": "x", **json.loads('{"type":"array","items":' * 80 + '{}' + '}' * 80)},
    "huge enum": {"enum": [f"value number {i}" for i in range(5000)]},
    "recursive $ref": {"$ref": "#/$defs/a", "$defs": {"a": {"$ref": "#/$defs/a"}}},
    "catastrophic regex": {"type": "string", "pattern": "(.*a){1000}"},
    "look-around regex": {"type": "string", "pattern": "(?=a)b+"},
    "unsatisfiable": {"type": "string", "minLength": 5, "maxLength": 2},
    "unknown type": {"type": "banana"},
}


@pytest.fixture(scope="module")
def qwen_grammars(real_tokenizers):
    tok = Tokenizer.load(real_tokenizers["qwen2"])
    return tok, Grammars(tok, tok.vocab_size + 100)   # logits wider than the tokenizer, as Qwen's are


def _mask(m, words) -> np.ndarray:
    out = np.zeros(words, np.int32)
    m.fill(out)
    return out


@pytest.mark.parametrize("family", ["qwen2", "llama3"])
def test_a_valid_value_walks_through_the_masks_and_ends_the_grammar(real_tokenizers, family):
    tok = Tokenizer.load(real_tokenizers[family])
    gs = Grammars(tok, tok.vocab_size)
    g = gs.compile({"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON, "strict": True}})
    m = g.matcher()
    ids = tok.encode('{"name": "Ada", "age": 36, "pets": ["cat", "fish"]}', add_bos=False)
    for i, t in enumerate(ids):
        mask = _mask(m, gs.words)
        assert allowed(mask, t), tok.decode(ids[:i + 1])
        assert not any(allowed(mask, e) for e in tok.eos_ids)       # EOS only once the value is complete
        assert not any(allowed(mask, s) for s in tok.special_ids[:50] if s not in tok.eos_ids)
        assert m.consume(t)
    assert m.accepting and m.stopped
    assert np.flatnonzero(np.unpackbits(_mask(m, gs.words).view(np.uint8), bitorder="little")).tolist() == \
        sorted(set(tok.eos_ids) & set(range(tok.vocab_size)))
    # a wrong value is refused at its first wrong token, and rollback undoes tokens
    m2 = g.matcher()
    bad = tok.encode('{"name": "Ada", "age": 360', add_bos=False)
    ok = [m2.consume(t) for t in bad]
    assert not all(ok) and m2.error
    m3 = g.matcher()
    assert all(m3.consume(t) for t in ids[:5]) and m3.rollback(5)
    assert np.array_equal(_mask(m3, gs.words), _mask(g.matcher(), gs.words))


def test_response_formats_and_their_errors(qwen_grammars):
    tok, gs = qwen_grammars
    assert gs.compile({"type": "text"}) is None
    m = gs.compile({"type": "json_object"}).matcher()
    first = _mask(m, gs.words)
    assert allowed(first, tok.encode("{", add_bos=False)[0]) and not allowed(first, tok.encode("[", add_bos=False)[0])
    assert first.size == (tok.vocab_size + 100 + 31) // 32 and not first[-2:].any()   # padding ids never allowed
    for bad, words in [({"type": "xml"}, "response_format.type"), ("json", "must be an object"),
                       ({"type": "json_schema"}, "json_schema"),
                       ({"type": "json_schema", "json_schema": {"name": 3, "schema": {}}}, "name"),
                       ({"type": "json_schema", "json_schema": {"name": "x", "schema": []}}, "must be an object")]:
        with pytest.raises(GrammarError, match=words):
            gs.compile(bad)


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_schemas_are_refused_with_a_reason(qwen_grammars, case):
    _, gs = qwen_grammars
    with pytest.raises(GrammarError) as e:
        gs.compile_schema(HOSTILE[case])
    assert str(e.value) and "\n" not in str(e.value)


def test_pattern_caps_leave_ordinary_patterns_alone():
    for p in (r"^[a-z]+(\.[a-z]+)*@[a-z]+\.[a-z]{2,6}$", r"[0-9]{4}-[0-9]{2}-[0-9]{2}", r"(ab|cd){1,30}x*"):
        check_pattern(p)
    for p in ("(x+){33}", "((a{1,1000}){1000})"):
        with pytest.raises(GrammarError):
            check_pattern(p)
    assert schema_of({"type": "json_schema", "json_schema": {"name": "x", "schema": True}}) == {}


def test_mask_kernel_on_slices_is_the_whole_mask():
    """Each rank masks its own vocabulary slice (slices need not start at a multiple of 32)."""
    rng = np.random.default_rng(0)
    V = 1000
    words = rng.integers(-2**31, 2**31, (V + 31) // 32, dtype=np.int64).astype(np.int32)
    logits = rng.standard_normal(V).astype(np.float32)
    bits = np.unpackbits(words.view(np.uint8), bitorder="little")[:V].astype(bool)
    want = np.where(bits, logits, -np.inf).astype(np.float32)
    got = logits.copy()
    for lo, hi in [(0, 333), (333, 667), (667, 1000)]:
        lib.dl_apply_token_mask(ffi.cast("float *", got[lo:].ctypes.data), hi - lo,
                                ffi.cast("uint32_t *", words.ctypes.data), lo)
    assert np.array_equal(got, want)


def test_stats_of_a_fully_masked_slice_are_not_nan():
    """A rank whose whole slice is masked out contributes nothing (log-sum-exp -inf), not NaN."""
    from dllama_mpi.engine import STATS_LEN, _merge_stats

    x = np.full(64, -np.inf, np.float32)
    rec = np.empty(STATS_LEN, np.float64)
    lib.dl_logit_stats(ffi.cast("double *", rec.ctypes.data), ffi.cast("float *", x.ctypes.data), 64, 1.0, 3, 20)
    assert rec[1] == -np.inf and not np.isnan(rec).any()
    other = np.empty(STATS_LEN, np.float64)
    y = np.array([1.0, 2.0], np.float32)
    lib.dl_logit_stats(ffi.cast("double *", other.ctypes.data), ffi.cast("float *", y.ctypes.data), 2, 1.0, -1, 20)
    other[4::2][other[4::2] >= 0] += 64
    st = _merge_stats(np.stack([rec, other]), True)
    assert st.argmax == 65 and [i for i, _ in st.top] == [65, 64] and st.target == -np.inf
    assert abs(np.logaddexp(st.top[0][1], st.top[1][1])) < 1e-6


def test_sampler_never_picks_a_masked_token():
    rng = np.random.default_rng(1)
    V = 5000
    for topp in (0.9, 1.0):
        s = Sampler(V, 1.0, topp, seed=3)
        for _ in range(200):
            x = rng.standard_normal(V).astype(np.float32) * 3
            keep = rng.choice(V, 3, replace=False)
            masked = np.full(V, -np.inf, np.float32)
            masked[keep] = x[keep]
            assert s.sample(masked) in keep
    s = Sampler(4, 1.0, 1.0, seed=3)
    s.random_f32 = lambda: 1.0   # past the rounded total: the last token with a probability
    assert s.sample(np.array([0.0, 1.0, -np.inf, -np.inf], np.float32)) == 1


# ------------------------------------------------------------------------------------------------
# the default model behind `mpiexec -n 2 dllama-mpi api`

SCHEMAS = {
    "object with enum and bounded integer": {
        "type": "object", "additionalProperties": False, "required": ["answer", "confidence"],
        "properties": {"answer": {"enum": ["yes", "no", "maybe"]},
                       "confidence": {"type": "integer", "minimum": 0, "maximum": 100}}},
    "array of bounded integers": {"type": "array", "items": {"type": "integer", "minimum": 1, "maximum": 9},
                                  "minItems": 1, "maxItems": 4},
    "nested object": {
        "type": "object", "additionalProperties": False, "required": ["city", "visited"],
        "properties": {"city": {"type": "object", "additionalProperties": False, "required": ["name", "country"],
                                "properties": {"name": {"type": "string", "maxLength": 10},
                                               "country": {"enum": ["France", "Japan", "Peru"]}}},
                       "visited": {"type": "boolean"}}},
    "optional fields": {
        "type": "object", "additionalProperties": False, "required": ["title"],
        "properties": {"title": {"type": "string", "minLength": 1, "maxLength": 12},
                       "year": {"type": "integer", "minimum": 1900, "maximum": 2030},
                       "tags": {"type": "array", "maxItems": 2, "items": {"type": "string", "maxLength": 6}}}},
    "bounded number": {"type": "object", "additionalProperties": False, "required": ["celsius"],
                       "properties": {"celsius": {"type": "number", "minimum": -50, "maximum": 50,
                                                  "multipleOf": 0.5}}},
    "top-level enum": {"enum": ["red", "green", "blue"]},
}
MAX_TOKENS = 60


@pytest.fixture(scope="module")
def smollm2_api(tmp_path_factory):
    model, tokenizer = default_smollm2_or_skip()
    s = ApiServer(tmp_path_factory.mktemp("structured") / "server.log", model=model, tokenizer=tokenizer,
                  extra=["--parallel", "8", "--no-web-ui"])
    openai = pytest.importorskip("openai")
    c = openai.OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0, timeout=300)
    s.model_id = c.models.list().data[0].id
    s.client = c
    s.model = model
    yield s
    s.stop()


def _ask(s, name, schema, temperature, stream, seed):
    """(finish reasons, texts) of one request with n = 3."""
    msgs = [{"role": "user", "content": f"Answer in JSON ({name})."}]
    rf = {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": True}}
    kw = dict(model=s.model_id, messages=msgs, max_tokens=MAX_TOKENS, temperature=temperature, n=3, seed=seed,
              response_format=rf)
    if not stream:
        r = s.client.chat.completions.create(**kw)
        return [c.finish_reason for c in r.choices], [c.message.content for c in r.choices]
    texts, reasons = [""] * 3, [None] * 3
    for chunk in s.client.chat.completions.create(stream=True, **kw):
        for c in chunk.choices:
            texts[c.index] += c.delta.content or ""
            reasons[c.index] = c.finish_reason or reasons[c.index]
    return reasons, texts


def test_every_answer_ends_with_stop_and_validates(smollm2_api):
    """6 schemas x (temperature 0, temperature 1 with two seeds) x streamed or not, n = 3, 8 requests
    at a time: 36 requests, 108 answers."""
    jobs = [(name, schema, t, stream, 100 * i + seed + stream)
            for i, (name, schema) in enumerate(SCHEMAS.items()) for t, seed in ((0.0, 0), (1.0, 10), (1.0, 20))
            for stream in (False, True)]
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda j: _ask(smollm2_api, *j), jobs))
    for (name, schema, t, stream, _), (reasons, texts) in zip(jobs, results):
        for reason, text in zip(reasons, texts):
            assert reason == "stop", (name, t, stream, text)
            jsonschema.validate(json.loads(text), schema)
    # greedy choices of one request are the same answer; streamed or not, the same text
    by_key = {(j[0], j[2], j[3]): r[1] for j, r in zip(jobs, results)}
    for name in SCHEMAS:
        assert len(set(by_key[(name, 0.0, False)])) == 1
        assert by_key[(name, 0.0, False)] == by_key[(name, 0.0, True)]


def test_json_object_completions_logprobs_and_parse(smollm2_api):
    s, c = smollm2_api, smollm2_api.client
    r = c.completions.create(model=s.model_id, prompt="A JSON object describing a cat:", max_tokens=MAX_TOKENS,
                             temperature=0, logprobs=2, extra_body={"response_format": {"type": "json_object"}})
    # json_object admits any object: it may run to max_tokens, but what it wrote is a JSON prefix
    text = r.choices[0].text
    assert text.startswith("{") and r.choices[0].logprobs.tokens[0] in ("{", '{"')
    assert all(np.isfinite(v) for v in r.choices[0].logprobs.token_logprobs)
    assert all(np.isfinite(v) for top in r.choices[0].logprobs.top_logprobs for v in top.values())
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(text), dict)

    from typing import Literal

    from pydantic import BaseModel, Field

    class City(BaseModel):
        name: str = Field(max_length=12)
        country: Literal["France", "Italy", "Spain"]
        population_millions: int = Field(ge=0, le=40)

    for t in (0.0, 1.0):
        p = c.chat.completions.parse(model=s.model_id, messages=[{"role": "user", "content": "Tell me about Paris."}],
                                     max_tokens=MAX_TOKENS, temperature=t, seed=7, response_format=City)
        assert p.choices[0].finish_reason == "stop" and isinstance(p.choices[0].message.parsed, City)
    # logprobs of a constrained chat answer: the forced first token is certain, nothing is -inf
    r = c.chat.completions.create(model=s.model_id, messages=[{"role": "user", "content": "Colour?"}],
                                  max_tokens=MAX_TOKENS, temperature=1, seed=3, logprobs=True, top_logprobs=5,
                                  response_format={"type": "json_schema", "json_schema": {
                                      "name": "c", "schema": SCHEMAS["top-level enum"]}})
    lps = r.choices[0].logprobs.content
    assert json.loads(r.choices[0].message.content) in ("red", "green", "blue")
    assert lps[0].logprob == 0.0 and all(np.isfinite(x.logprob) for x in lps)
    assert all(np.isfinite(t.logprob) and t.logprob > -1e30 for x in lps for t in x.top_logprobs)


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_schema_is_a_400_and_the_server_goes_on(smollm2_api, case):
    openai = pytest.importorskip("openai")
    s, c = smollm2_api, smollm2_api.client
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model=s.model_id, messages=[{"role": "user", "content": "x"}], max_tokens=5,
                                  stream=True, response_format={"type": "json_schema", "json_schema": {
                                      "name": "h", "schema": HOSTILE[case]}})
    assert e.value.body["param"] == "response_format" and e.value.body["message"]
    r = c.chat.completions.create(model=s.model_id, messages=[{"role": "user", "content": "Hi"}], max_tokens=3)
    assert r.choices[0].message.content


def test_free_streams_beside_constrained_ones_are_unchanged(smollm2_api):
    """The same free requests alone and amid constrained ones: the same tokens and log-probabilities."""
    s, c = smollm2_api, smollm2_api.client

    def free(i):
        r = c.chat.completions.create(model=s.model_id, messages=[{"role": "user", "content": f"Count to {i + 3}."}],
                                      max_tokens=24, temperature=1, seed=i, logprobs=True)
        return [(x.token, x.logprob) for x in r.choices[0].logprobs.content]

    with ThreadPoolExecutor(3) as pool:
        alone = list(pool.map(free, range(3)))
    with ThreadPoolExecutor(6) as pool:
        constrained = [pool.submit(_ask, s, n, SCHEMAS[n], 1.0, False, 5) for n in list(SCHEMAS)[:3]]
        together = list(pool.map(free, range(3)))
        for f in constrained:
            assert f.result()[0] == ["stop"] * 3
    assert together == alone


def test_four_ranks_schemas_tool_calls_and_the_same_seeded_tokens_on_one_two_and_four(tmp_path):
    """`mpiexec -n 4 api` (vocabulary slices masked on four ranks): schema answers at temperatures 0
    and 1, n = 3, streamed and not, all end with stop and validate; a required tool call validates
    and streams as it answers. With --as-nodes 4 the 4-, 2- and 1-rank servers compute the same bits,
    so every answer, greedy and seeded (temperature 1), streamed or not, with its log-probabilities
    and the tool calls, is the same on all three."""
    model, tokenizer = default_smollm2_or_skip()
    openai = pytest.importorskip("openai")
    tools = [{"type": "function", "function": {
        "name": "add", "parameters": {"type": "object", "additionalProperties": False, "required": ["a", "b"],
                                      "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}}}}]
    names = list(SCHEMAS)[:3]
    got = {}
    for ranks in (4, 2, 1):
        s = ApiServer(tmp_path / f"server{ranks}.log", model=model, tokenizer=tokenizer, ranks=ranks,
                      extra=["--parallel", "4", "--no-web-ui", "--as-nodes", "4"])
        try:
            s.client = openai.OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0, timeout=300)
            s.model_id = s.client.models.list().data[0].id
            answers = [_ask(s, n, SCHEMAS[n], 0.0, False, 0) for n in names]
            answers += [_ask(s, n, SCHEMAS[n], 1.0, stream, 40 + i) for i, n in enumerate(names) for stream in (False, True)]
            r = s.client.chat.completions.create(model=s.model_id, messages=[{"role": "user", "content": "Hi!"}],
                                                 max_tokens=24, temperature=1, seed=5, logprobs=True, top_logprobs=3)
            answers.append([(x.token, x.logprob, [(t.token, t.logprob) for t in x.top_logprobs])
                            for x in r.choices[0].logprobs.content])
            calls = []
            for stream, t in ((False, 0), (True, 0), (False, 1), (True, 1)):
                kw = dict(model=s.model_id, messages=[{"role": "user", "content": "What is 2 + 3?"}], tools=tools,
                          tool_choice="required", max_tokens=MAX_TOKENS, temperature=t, seed=9)
                if not stream:
                    c = s.client.chat.completions.create(**kw).choices[0]
                    assert c.finish_reason == "tool_calls"
                    calls.append((c.message.tool_calls[0].function.name, c.message.tool_calls[0].function.arguments))
                else:
                    name, args, reason = None, "", None
                    for chunk in s.client.chat.completions.create(stream=True, **kw):
                        for d in chunk.choices[0].delta.tool_calls or []:
                            name = name or d.function.name
                            args += d.function.arguments or ""
                        reason = chunk.choices[0].finish_reason or reason
                    assert reason == "tool_calls"
                    calls.append((name, args))
            assert calls[0] == calls[1] and calls[2] == calls[3] and calls[0][0] == "add"
            for _, a in calls:
                jsonschema.validate(json.loads(a), tools[0]["function"]["parameters"])
            got[ranks] = answers + calls
        finally:
            s.stop()
    for (reasons, texts), n in zip(got[4][:9], names + [n for n in names for _ in (0, 1)]):
        assert reasons == ["stop"] * 3, (n, texts)
        for t in texts:
            jsonschema.validate(json.loads(t), SCHEMAS[n])
    assert got[4] == got[2] == got[1]


def _inference(model, schema_path, n, temperature, *extra):
    cmd = [*DLLAMA, "inference", "--model", str(model), "--json", "--json-schema", str(schema_path), "--steps",
           str(MAX_TOKENS), "--temperature", str(temperature), "--seed", "11", "--prompt",
           "<|im_start|>user\nDescribe a person.<|im_end|>\n<|im_start|>assistant\n", *extra]
    if n > 1:
        cmd = [MPIEXEC, "-n", str(n), *cmd]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_inference_json_schema_same_tokens_on_one_rank_two_ranks_and_two_stages(smollm2_api, tmp_path):
    """Greedy: the same tokens on 1 rank, 2 ranks (vocabulary slices masked on each rank) and 2
    pipeline stages (masks sent from rank 0 to the last stage). Sampling (temperature 1, same seed):
    the same tokens on 1 rank and 2 stages with f32 buffers, whose arithmetic is the same, and on 1
    and 2 tensor-parallel ranks with --as-nodes 2 (without it 2 ranks round their partial sums
    differently, so draws may part where two tokens are nearly equally likely)."""
    path = tmp_path / "person.json"
    path.write_text(json.dumps(PERSON))
    m = smollm2_api.model
    greedy = [_inference(m, path, 1, 0), _inference(m, path, 2, 0), _inference(m, path, 2, 0, "--pp", "2")]
    for r in greedy:
        assert r["finish_reason"] == "stop"
        jsonschema.validate(json.loads(r["text"]), PERSON)
    assert [r["generated_ids"] for r in greedy[1:]] == [greedy[0]["generated_ids"]] * 2
    f32 = ("--buffer-float-type", "f32")
    sampled = [_inference(m, path, 1, 1, *f32), _inference(m, path, 2, 1, "--pp", "2", *f32)]
    assert sampled[0]["generated_ids"] == sampled[1]["generated_ids"] != greedy[0]["generated_ids"]
    as2 = ("--as-nodes", "2")
    tp = [_inference(m, path, 1, 1, *as2), _inference(m, path, 2, 1, *as2)]
    assert tp[0]["generated_ids"] == tp[1]["generated_ids"] != greedy[0]["generated_ids"]
    jsonschema.validate(json.loads(sampled[0]["text"]), PERSON)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(HOSTILE["recursive $ref"]))
    out = subprocess.run([*DLLAMA, "inference", "--model", str(m), "--prompt", "x", "--json-schema", str(bad)],
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 2 and "--json-schema" in out.stderr and "admits no value" in out.stderr


def test_batch_lines_with_response_format(smollm2_api, tmp_path):
    """A batch file mixing constrained and free lines: the constrained results validate; a line whose
    schema cannot be compiled stops the job before any token, naming its line."""
    rf = {"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON}}
    lines = [{"id": "a", "messages": [{"role": "user", "content": "A person?"}], "response_format": rf,
              "temperature": 1, "seed": 4},
             {"id": "b", "prompt": "Once upon a time", "max_tokens": 8},
             {"id": "c", "prompt": "Colour:", "response_format": {"type": "json_schema", "json_schema": {
                 "name": "c", "schema": SCHEMAS["top-level enum"]}}, "temperature": 0}]
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text("".join(json.dumps(x) + "\n" for x in lines))
    cmd = [*DLLAMA, "batch", "--model", str(smollm2_api.model), "--prompts", str(src), "--out", str(out),
           "--max-tokens", str(MAX_TOKENS)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    got = {d["id"]: d for d in map(json.loads, out.read_text().splitlines())}
    assert got["a"]["finish_reason"] == got["c"]["finish_reason"] == "stop"
    jsonschema.validate(json.loads(got["a"]["text"]), PERSON)
    assert json.loads(got["c"]["text"]) in ("red", "green", "blue")
    assert got["b"]["completion_tokens"] == 8
    lines[1]["response_format"] = {"type": "json_schema", "json_schema": {"name": "h", "schema": HOSTILE["unknown type"]}}
    src.write_text("".join(json.dumps(x) + "\n" for x in lines))
    out.unlink()
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 2 and "line 2" in r.stderr and "banana" in r.stderr and not out.exists()
    src.write_text(json.dumps({"id": 1, "prompt": "x", "response_format": {"type": "yaml"}}) + "\n")
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 2 and "in.jsonl:1" in r.stderr and "response_format.type" in r.stderr


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
