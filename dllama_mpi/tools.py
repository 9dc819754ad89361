"""Tool calls on /v1/chat/completions: OpenAI's `tools`, `tool_choice`, `parallel_tool_calls`.

A request's tools become (1) a prompt, through the model's own chat template where it knows tools,
(2) a grammar (grammar.py, llguidance's Lark dialect with the call objects as an inlined JSON
schema) that makes every call valid, and (3) a parser that splits the constrained answer into text
and calls as it streams. The call's markup is the model family's own (`format_for` reads it from
the template, as llama.cpp does):

- hermes (Qwen 2.5 / 3, any template that writes `<tool_call>`): `<tool_call>\\n{"name": "f",
  "arguments": {...}}\\n</tool_call>`, one block per call, separated by a newline;
- llama3 (a template with the `ipython` role): the whole answer is `{"name": "f", "parameters":
  {...}}`, one call per turn (the template renders no more);
- generic (SmolLM2, Gemma 3 and every other template): the tool list goes into the system prompt
  (`GENERIC_PROMPT`, SmolLM2's function-calling prompt in our words), the answer is
  `<tool_call>[{"name": "f", "arguments": {...}}, ...]</tool_call>`; earlier calls are rendered as
  that text, tool results as a user turn `<tool_response>\\n...\\n</tool_response>` (consecutive
  results in one turn, so that templates whose roles must alternate accept them).

tool_choice: `required` or a named function force the call from the first token; `auto` lets the
model write text or, once it writes the call's opening (`<tool_call>`; llama3: `{` as the first
byte), forces a valid call (llama.cpp's lazy grammar, here one grammar: free text that cannot
contain the opening, or text up to the opening followed by the calls); `none` sends no tools and
no grammar. `parallel_tool_calls: false` admits one call. JSON is written as json.dumps writes it
(grammar.JSON_OPTIONS), so the parser follows it byte for byte.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass

from .errors import DllamaError
from .grammar import JSON_OPTIONS, GrammarError, check_schema

NAME_RE = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")   # OpenAI's rule for function names
MAX_TOOLS = 128


class ToolError(DllamaError):
    """A request's tools, tool_choice or tool messages that cannot be served (`param` names the field)."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


@dataclass
class ToolRequest:
    tools: list            # OpenAI's shape: [{"type": "function", "function": {name, description?, parameters}}]
    named: str | None      # tool_choice names this function (forced)
    required: bool         # a call is forced from the first token (required or named)
    parallel: bool         # several calls may follow each other

    @property
    def offered(self) -> list:
        """The functions the grammar lets the model call."""
        return [t["function"] for t in self.tools if self.named is None or t["function"]["name"] == self.named]


def parse_tools(body: dict) -> ToolRequest | None:
    """The request's tools and tool_choice, checked (ToolError naming the field); None when no call
    may be made (no tools, or tool_choice "none")."""
    tools, choice, parallel = body.get("tools"), body.get("tool_choice"), body.get("parallel_tool_calls")
    if parallel is not None and not isinstance(parallel, bool):
        raise ToolError("'parallel_tool_calls' must be a boolean", "parallel_tool_calls")
    if tools is None or tools == []:
        if choice not in (None, "none", "auto"):
            raise ToolError("'tool_choice' needs 'tools'", "tool_choice")
        return None
    if not isinstance(tools, list):
        raise ToolError("'tools' must be a list", "tools")
    if len(tools) > MAX_TOOLS:
        raise ToolError(f"'tools' has {len(tools)} tools; at most {MAX_TOOLS} are accepted", "tools")
    checked, names = [], set()
    for i, t in enumerate(tools):
        where = f"tools[{i}]"
        if not isinstance(t, dict) or t.get("type") != "function" or not isinstance(t.get("function"), dict):
            raise ToolError(f"{where} must be {{'type': 'function', 'function': {{...}}}} (only function tools "
                            f"are supported)", where)
        f = t["function"]
        name = f.get("name")
        if not isinstance(name, str) or not NAME_RE.match(name):
            raise ToolError(f"{where}.function.name must be 1 to 64 letters, digits, '_' or '-', got {name!r}",
                            f"{where}.function.name")
        if name in names:
            raise ToolError(f"{where}.function.name {name!r} is given twice", f"{where}.function.name")
        names.add(name)
        desc = f.get("description")
        if desc is not None and not isinstance(desc, str):
            raise ToolError(f"{where}.function.description must be a string", f"{where}.function.description")
        params = f.get("parameters")
        if params is None:
            params = {"type": "object", "properties": {}}
        if not isinstance(params, dict) or params.get("type", "object") != "object":
            raise ToolError(f"{where}.function.parameters must be a JSON schema of type 'object'",
                            f"{where}.function.parameters")
        try:
            check_schema(params, f"{where}.function.parameters")
        except GrammarError as e:
            raise ToolError(str(e), f"{where}.function.parameters") from None
        fn = {k: v for k, v in f.items() if k in ("name", "description", "strict")}
        fn["parameters"] = params
        checked.append({"type": "function", "function": fn})
    named = None
    if choice is None:
        choice = "auto"
    if isinstance(choice, dict):
        fn = choice.get("function")
        if choice.get("type") != "function" or not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise ToolError("'tool_choice' must be none, auto, required or {'type': 'function', 'function': "
                            "{'name': ...}}", "tool_choice")
        named = fn["name"]
        if named not in names:
            raise ToolError(f"'tool_choice' names the function {named!r}, which is not in 'tools'", "tool_choice")
    elif choice == "none":
        return None
    elif choice not in ("auto", "required"):
        raise ToolError(f"'tool_choice' must be none, auto, required or a named function, got {choice!r}",
                        "tool_choice")
    return ToolRequest(checked, named, named is not None or choice == "required",
                       True if parallel is None else parallel)


def parse_tool_message(i: int, m: dict, out: dict) -> None:
    """An assistant message's `tool_calls` and a tool message's `tool_call_id` into `out` (the message
    the template gets): arguments parsed into objects, as templates expect them (Llama's and
    Qwen 2.5's apply tojson to them)."""
    calls = m.get("tool_calls")
    if m["role"] == "assistant" and calls is not None:
        if not isinstance(calls, list):
            raise ToolError(f"messages[{i}].tool_calls must be a list", f"messages[{i}].tool_calls")
        out_calls = []
        for k, c in enumerate(calls):
            where = f"messages[{i}].tool_calls[{k}]"
            f = c.get("function") if isinstance(c, dict) else None
            if not isinstance(f, dict) or not isinstance(f.get("name"), str):
                raise ToolError(f"{where} must be {{'type': 'function', 'function': {{'name', 'arguments'}}}}", where)
            args = f.get("arguments", "{}")
            if isinstance(args, str):
                try:
                    args = json.loads(args) if args.strip() else {}
                except ValueError:
                    raise ToolError(f"{where}.function.arguments is not JSON: {args[:60]!r}",
                                    f"{where}.function.arguments") from None
            call = {"type": "function", "function": {"name": f["name"], "arguments": args}}
            if isinstance(c.get("id"), str):
                call = {"id": c["id"], **call}
            out_calls.append(call)
        if out_calls:
            out["tool_calls"] = out_calls
    if m["role"] == "tool":
        tid = m.get("tool_call_id")
        if tid is not None and not isinstance(tid, str):
            raise ToolError(f"messages[{i}].tool_call_id must be a string", f"messages[{i}].tool_call_id")
        if tid is not None:
            out["tool_call_id"] = tid
        if isinstance(m.get("name"), str):
            out["name"] = m["name"]


# ------------------------------------------------------------------------------------------------
# formats

@dataclass(frozen=True)
class ToolFormat:
    name: str
    trigger: str        # the text that opens the calls in free text ("": a call is the whole answer)
    open: str           # before the first call object
    sep: str            # between call objects
    close: str          # after the last one
    args_key: str       # the call object's key for the arguments
    native: bool        # the chat template renders tools, calls and results itself
    single: bool        # one call per answer at most


HERMES = ToolFormat("hermes", "<tool_call>", "<tool_call>\n", "\n</tool_call>\n<tool_call>\n", "\n</tool_call>",
                    "arguments", True, False)
LLAMA3 = ToolFormat("llama3", "", "", "", "", "parameters", True, True)
GENERIC = ToolFormat("generic", "<tool_call>", "<tool_call>[", ", ", "]</tool_call>", "arguments", False, False)


def format_for(template) -> ToolFormat:
    """The tool-call format of a chat template, from its source (llama.cpp's rule)."""
    src = template.source
    if "<tool_call>" in src:
        return HERMES
    if "<|start_header_id|>ipython<|end_header_id|>" in src:
        return LLAMA3
    return GENERIC


GENERIC_PROMPT = (
    "You are an expert in composing functions. You are given a question and a set of possible functions. "
    "Based on the question, you may make one or more function calls to achieve the purpose. If none of the "
    "functions fits, answer in plain text.\n\n"
    "You have access to the following tools:\n<tools>{tools}</tools>\n\n"
    "To call functions, answer with nothing but the calls, in this format:\n"
    '<tool_call>[{{"name": "func_name1", "arguments": {{"argument1": "value1", "argument2": "value2"}}}}, '
    "... (more calls as required)]</tool_call>")


def prompt_messages(fmt: ToolFormat, messages: list[dict], req: ToolRequest | None) -> tuple[list[dict], dict]:
    """(messages, template variables) for the chat template: a native template gets `tools` and the
    messages as they are; for the generic format, calls and results become text and the tools a
    system prompt."""
    if fmt.native:
        return messages, ({"tools": req.tools} if req is not None else {})
    out = []
    for m in messages:
        if m["role"] == "assistant" and m.get("tool_calls"):
            calls = ", ".join(json.dumps({"name": c["function"]["name"], "arguments": c["function"]["arguments"]},
                                         ensure_ascii=False) for c in m["tool_calls"])
            text = (m["content"] + "\n" if m["content"] else "") + f"{GENERIC.open}{calls}{GENERIC.close}"
            out.append({"role": "assistant", "content": text})
        elif m["role"] == "tool":
            resp = f"<tool_response>\n{m['content']}\n</tool_response>"
            if out and out[-1].get("tool_results"):
                out[-1]["content"] += "\n" + resp
            else:
                out.append({"role": "user", "content": resp, "tool_results": True})
        else:
            out.append(m)
    out = [{k: v for k, v in m.items() if k != "tool_results"} for m in out]
    if req is not None:
        prompt = GENERIC_PROMPT.format(tools=json.dumps([t["function"] for t in req.tools], ensure_ascii=False))
        if out[0]["role"] == "system":
            out[0] = {**out[0], "content": out[0]["content"] + "\n\n" + prompt}
        else:
            out.insert(0, {"role": "system", "content": prompt})
    return out, {}


# ------------------------------------------------------------------------------------------------
# the grammar

def _lit(s: str) -> str:
    return json.dumps(s)


def _regex_escape(s: str) -> str:
    return "".join("\\" + c if c in "\\.+*?()|[]{}^$#&-~/" else c for c in s)


def call_schema(fmt: ToolFormat, req: ToolRequest) -> dict:
    """The JSON schema of one call object: {"name": <an offered function>, <args_key>: <its parameters>}."""
    branches = [{"type": "object", "additionalProperties": False, "required": ["name", fmt.args_key],
                 "properties": {"name": {"const": f["name"]}, fmt.args_key: f["parameters"]}}
                for f in req.offered]
    schema = branches[0] if len(branches) == 1 else {"anyOf": branches}
    return {**schema, "x-guidance": JSON_OPTIONS}


def grammar_text(fmt: ToolFormat, req: ToolRequest) -> str:
    """The Lark grammar of an answer: the calls alone (required, named), or text without the opening
    or text up to the opening then the calls (auto)."""
    calls = "call (sep call)*" if req.parallel and not fmt.single else "call"
    rules = [f"call: %json {json.dumps(call_schema(fmt, req), ensure_ascii=False)}"]
    if fmt.sep:
        rules.append(f"sep: {_lit(fmt.sep)}")
    close = f" {_lit(fmt.close)}" if fmt.close else ""
    if req.required:
        start = f"start: {_lit(fmt.open) + ' ' if fmt.open else ''}{calls}{close}"
    elif fmt.trigger:
        t = _regex_escape(fmt.trigger)
        rest = fmt.open[len(fmt.trigger):]
        start = f"start: TEXT | head {_lit(rest) + ' ' if rest else ''}{calls}{close}"
        rules += [f"TEXT: /(.|\\n)*/ & ~/(.|\\n)*{t}(.|\\n)*/", f"head[lazy]: /(.|\\n)*{t}/"]
    else:   # the call is the whole answer; text must not start with its "{"
        start = f"start: TEXT | {calls}"
        rules.append("TEXT: /[^{](.|\\n)*/")
    return "\n".join([start, *rules]) + "\n"


def compile_grammar(grammars, fmt: ToolFormat, req: ToolRequest):
    """grammar.Grammar of the request's calls (GrammarError naming the tools' problem)."""
    return grammars.compile_lark(grammar_text(fmt, req), "tools")


# ------------------------------------------------------------------------------------------------
# the parser

def _partial_suffix(buf: str, tag: str) -> int:
    """Length of the longest end of `buf` that is a proper beginning of `tag`."""
    for n in range(min(len(tag) - 1, len(buf)), 0, -1):
        if buf.endswith(tag[:n]):
            return n
    return 0


NAME_OPEN = '{"name": "'


class CallParser:
    """Splits one choice's constrained answer into text and calls as its pieces arrive.

    push(text) returns events: ("content", text), ("call", index, id, name) once a call's name is
    complete, ("arguments", index, fragment) for its arguments' JSON text as it grows. Text that
    could still be the start of the calls' opening, and blanks before it, are held back, so the
    markup never shows as content. The grammar fixes every byte of the markup, which is why a
    character scanner is enough: between calls it waits for `{"name": "`, the name runs to its
    closing quote (names have no escapes), the arguments are the JSON object that follows,
    delimited by counting brackets outside strings."""

    def __init__(self, fmt: ToolFormat):
        self.fmt = fmt
        self.calls: list[dict] = []       # {"id", "name", "arguments"}
        self.content: list[str] = []
        self._state = "content"
        self._buf = ""                    # held-back text (content) / markup since the last call (seek)
        self._seen = False
        self._depth, self._in_str, self._esc = 0, False, False

    @property
    def complete(self) -> bool:
        """No call is half written."""
        return self._state in ("content", "seek")

    def push(self, text: str) -> list:
        events = []
        for ch in text:
            first, self._seen = not self._seen, True
            st = self._state
            if st == "content":
                if not self.fmt.trigger:
                    if first and ch == "{":
                        self._state, self._buf = "seek", ch
                    else:
                        self._content(events, ch)
                    continue
                self._buf += ch
                if self._buf.endswith(self.fmt.trigger):
                    self._content(events, self._buf[:-len(self.fmt.trigger)].rstrip())
                    self._state, self._buf = "seek", self.fmt.trigger
            elif st == "seek":
                self._buf += ch
                if self._buf.endswith(NAME_OPEN):
                    self._state, self._buf = "name", ""
            elif st == "name":
                if ch == '"':
                    call = {"id": "call_" + uuid.uuid4().hex[:24], "name": self._buf, "arguments": ""}
                    self.calls.append(call)
                    events.append(("call", len(self.calls) - 1, call["id"], call["name"]))
                    self._state, self._buf = "key", ""
                else:
                    self._buf += ch
            elif st == "key":
                if ch == "{":
                    self._state, self._depth, self._in_str, self._esc = "args", 1, False, False
                    self._arg(events, ch)
            else:   # args
                self._arg(events, ch)
                if self._in_str:
                    if self._esc:
                        self._esc = False
                    elif ch == "\\":
                        self._esc = True
                    elif ch == '"':
                        self._in_str = False
                elif ch == '"':
                    self._in_str = True
                elif ch in "{[":
                    self._depth += 1
                elif ch in "}]":
                    self._depth -= 1
                    if self._depth == 0:
                        self._state, self._buf = "seek", ""
        if self._state == "content" and self.fmt.trigger and self._buf:   # release what cannot open a call
            keep = _partial_suffix(self._buf, self.fmt.trigger)
            safe = self._buf[:len(self._buf) - keep]
            shown = safe.rstrip()
            self._content(events, shown)
            self._buf = self._buf[len(shown):]
        return events

    def finish(self) -> list:
        """The end of the answer: held-back text that opened nothing is content after all."""
        events = []
        if self._state == "content" and self._buf:
            self._content(events, self._buf)
            self._buf = ""
        return events

    def _content(self, events: list, text: str) -> None:
        if not text:
            return
        self.content.append(text)
        if events and events[-1][0] == "content":
            events[-1] = ("content", events[-1][1] + text)
        else:
            events.append(("content", text))

    def _arg(self, events: list, ch: str) -> None:
        k = len(self.calls) - 1
        self.calls[k]["arguments"] += ch
        if events and events[-1][0] == "arguments" and events[-1][1] == k:
            events[-1] = ("arguments", k, events[-1][2] + ch)
        else:
            events.append(("arguments", k, ch))


def message_of(parser: CallParser) -> dict:
    """The assistant message of a parsed answer (content None when there are calls and no text)."""
    content = "".join(parser.content)
    msg = {"role": "assistant", "content": content}
    if parser.calls:
        msg["content"] = content.strip() or None
        msg["tool_calls"] = [{"id": c["id"], "type": "function",
                              "function": {"name": c["name"], "arguments": c["arguments"]}} for c in parser.calls]
    return msg
