"""Regenerate expected.json: chat prompts rendered by Hugging Face transformers' apply_chat_template.

Needs transformers (not a dependency of dllama-mpi: use a scratch venv), run from the repo root:

    python3 -m venv /tmp/tfvenv && /tmp/tfvenv/bin/pip install transformers jinja2 numpy
    /tmp/tfvenv/bin/python tests/data/chat_templates/record.py

Templates come from the .t files in tests/data (real Llama 3.2 / Qwen3 and the tiny ones) and from
dllama_mpi.chat_template.BUILTIN_TEMPLATES. transformers renders them through a tokenizer object (the
tiny Llama tokenizer.json) with chat_template=<source>, tokenize=False; bos_token/eos_token are passed
explicitly, the same texts the test hands to dllama_mpi's ChatTemplate.
"""
import json
import lzma
import os
import sys
import tempfile

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))
sys.path.insert(0, ROOT)

import jinja2  # noqa: E402
import transformers  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

from dllama_mpi.chat_template import BUILTIN_TEMPLATES  # noqa: E402
from dllama_mpi.formats import read_tokenizer  # noqa: E402

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "expected.json")
DATE = {"date_string": "26 Jul 2024"}     # Llama 3.2's template would otherwise print today's date


def tokenizer_template(rel):
    path = os.path.join(ROOT, rel)
    if rel.endswith(".xz"):
        with tempfile.NamedTemporaryFile(suffix=".t", delete=False) as f:
            f.write(lzma.decompress(open(path, "rb").read()))
        t = read_tokenizer(f.name)
        os.unlink(f.name)
    else:
        t = read_tokenizer(path)
    return t.chat_template, t.vocab[t.bos_id].decode("utf-8")


# id -> (where the source comes from, eos text); bos text is the .t's bos token, or given for built-ins
TEMPLATES = {
    "llama3_real": {"tokenizer": "tests/data/tokenizers/dllama_tokenizer_llama3.t.xz", "eos_token": "<|eot_id|>"},
    "llama3_tiny": {"tokenizer": "tests/data/tiny/t/dllama_tokenizer_tiny_llama3.t", "eos_token": "<|eot_id|>"},
    "qwen3_real": {"tokenizer": "tests/data/tokenizers/dllama_tokenizer_qwen2.t.xz", "eos_token": "<|im_end|>"},
    "qwen3_tiny": {"tokenizer": "tests/data/tiny/t/dllama_tokenizer_tiny_qwen3.t", "eos_token": "<|im_end|>"},
    "llama3": {"builtin": "llama3", "bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"},
    "qwen2.5": {"builtin": "qwen2.5", "bos_token": "<|endoftext|>", "eos_token": "<|im_end|>"},
    "qwen3": {"builtin": "qwen3", "bos_token": "<|endoftext|>", "eos_token": "<|im_end|>"},
    "chatml": {"builtin": "chatml", "bos_token": "<|im_start|>", "eos_token": "<|im_end|>"},
    "smollm2": {"builtin": "smollm2", "bos_token": "<|im_start|>", "eos_token": "<|im_end|>"},
    "deepseek-r1": {"builtin": "deepseek-r1", "bos_token": "<｜begin▁of▁sentence｜>",
                    "eos_token": "<｜end▁of▁sentence｜>"},
    "gemma3": {"builtin": "gemma3", "bos_token": "<bos>", "eos_token": "<eos>"},
}

U = [{"role": "user", "content": "What is the capital of France?"}]
SU = [{"role": "system", "content": "You are a terse assistant."}] + U
MULTI = SU + [
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And of Italy?"},
    {"role": "assistant", "content": "Rome."},
    {"role": "user", "content": "  And of Spain?  \n"},
]
UNICODE = [{"role": "system", "content": "Réponds en français 🇫🇷, s'il te plaît."},
           {"role": "user", "content": "Ĉu vi parolas 日本語? «Ja» — ñandú\ttab"}]
THINK = [
    {"role": "user", "content": "2+2?"},
    {"role": "assistant", "content": "<think>\nThe user wants a sum. 2+2=4.\n</think>\n\n4."},
    {"role": "user", "content": "3+3?"},
]
THINK_LAST = THINK + [{"role": "assistant", "content": "<think>\nEasy: 6.\n</think>\n\n6."}]
REASONING_FIELD = [
    {"role": "user", "content": "2+2?"},
    {"role": "assistant", "content": "4.", "reasoning_content": "Add them."},
    {"role": "user", "content": "5+5?"},
]
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Météo actuelle d'une ville <b>now</b>",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "Ville"}},
                   "required": ["city"]}}}]
LLAMA_TOOL_CALL = [
    {"role": "user", "content": "Weather in Zürich?"},
    {"role": "assistant", "tool_calls": [{"type": "function", "function": {
        "name": "get_weather", "arguments": {"city": "Zürich"}}}]},
    {"role": "tool", "content": "18°C, sunny"},
]
NONE_CONTENT_KEY = [{"role": "user", "content": "hi", "name": None}]
CONTENT_PARTS = [{"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
                 {"role": "user", "content": [{"type": "text", "text": "  Name a colour. "},
                                              {"type": "text", "text": "One word."}]},
                 {"role": "assistant", "content": [{"type": "text", "text": "Blue.\n"}]},
                 {"role": "user", "content": "Another?"}]

COMMON = [("single user turn", U, {}), ("system + user", SU, {}), ("multi-turn", MULTI, {}),
          ("unicode", UNICODE, {})]
CASES = []
for tid in TEMPLATES:
    family = tid.split("_")[0]
    extra = DATE if family == "llama3" else {}
    for desc, msgs, kw in COMMON:
        CASES.append((tid, desc, msgs, {**extra, **kw}, True))
    CASES.append((tid, "multi-turn, no generation prompt", MULTI[:-1], extra, False))
    CASES.append((tid, "assistant with <think>", THINK, extra, True))
    CASES.append((tid, "None-valued key dropped", NONE_CONTENT_KEY, extra, True))
    if family in ("qwen3",):
        CASES.append((tid, "enable_thinking=False", SU, {"enable_thinking": False}, True))
        CASES.append((tid, "enable_thinking=True", SU, {"enable_thinking": True}, True))
        CASES.append((tid, "last assistant keeps <think>", THINK_LAST, {}, False))
        CASES.append((tid, "reasoning_content field", REASONING_FIELD, {}, True))
        CASES.append((tid, "tools", SU, {"tools": TOOLS}, True))
    if family == "llama3":
        CASES.append((tid, "tools in user message", SU, {**DATE, "tools": TOOLS}, True))
        CASES.append((tid, "tools in system message", SU,
                      {**DATE, "tools": TOOLS, "tools_in_user_message": False}, True))
        CASES.append((tid, "tool call and result", LLAMA_TOOL_CALL, DATE, True))
    if family == "qwen2.5":
        CASES.append((tid, "tools", SU, {"tools": TOOLS}, True))
        CASES.append((tid, "tools, default system prompt", U, {"tools": TOOLS}, True))
        CASES.append((tid, "tool call and result", LLAMA_TOOL_CALL, {"tools": TOOLS}, True))
    if family == "gemma3":
        CASES.append((tid, "content as text parts", CONTENT_PARTS, {}, True))
    if family == "deepseek-r1":
        CASES.append((tid, "last assistant with <think>", THINK_LAST, {}, False))


def main():
    tok = AutoTokenizer.from_pretrained(os.path.join(ROOT, "tests/data/tiny/hf/tiny_llama"))
    templates = {}
    for tid, spec in TEMPLATES.items():
        spec = dict(spec)
        if "tokenizer" in spec:
            source, spec["bos_token"] = tokenizer_template(spec["tokenizer"])
        else:
            source = BUILTIN_TEMPLATES[spec["builtin"]]
        templates[tid] = {**spec, "source": source}
    cases = []
    for tid, desc, msgs, kw, gen in CASES:
        t = templates[tid]
        expected = tok.apply_chat_template(
            msgs, chat_template=t["source"], tokenize=False, add_generation_prompt=gen,
            bos_token=t["bos_token"], eos_token=t["eos_token"], **kw)
        cases.append({"template": tid, "description": desc, "messages": msgs, "kwargs": kw,
                      "add_generation_prompt": gen, "expected": expected})
    out = {"recorded_with": {"transformers": transformers.__version__, "jinja2": jinja2.__version__},
           "how": "tests/data/chat_templates/record.py (tokenizer.apply_chat_template(..., tokenize=False))",
           "templates": {k: {kk: vv for kk, vv in v.items() if kk != "source"} for k, v in templates.items()},
           "cases": cases}
    with open(OUT, "w", encoding="utf-8") as f:
        json.dump(out, f, ensure_ascii=False, indent=1)
        f.write("\n")
    print(f"{len(cases)} cases for {len(templates)} templates -> {OUT}")


if __name__ == "__main__":
    main()
