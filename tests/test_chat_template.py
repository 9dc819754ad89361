"""Chat templates: renders equal to transformers' apply_chat_template (recorded in
tests/data/chat_templates/expected.json by record.py), errors, overrides, thinking split/filter."""
import json
from datetime import datetime
from pathlib import Path

import pytest

from dllama_mpi.chat_template import (BUILTIN_TEMPLATES, ChatTemplate, ThinkingFilter, prompt_opens_thinking,
                                      split_thinking)
from dllama_mpi.errors import TemplateError
from dllama_mpi.formats import read_tokenizer

DATA = Path(__file__).parent / "data"
REPO = DATA.parent.parent
EXPECTED = json.loads((DATA / "chat_templates" / "expected.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def templates(real_tokenizers):
    """template id -> ChatTemplate, built the way the CLI builds them (from the .t, or by built-in name)."""
    real = {"tests/data/tokenizers/dllama_tokenizer_llama3.t.xz": real_tokenizers["llama3"],
            "tests/data/tokenizers/dllama_tokenizer_qwen2.t.xz": real_tokenizers["qwen2"]}
    out = {}
    for tid, spec in EXPECTED["templates"].items():
        if "tokenizer" in spec:
            path = real.get(spec["tokenizer"]) or REPO / spec["tokenizer"]
            t = read_tokenizer(path)
            bos = t.vocab[t.bos_id].decode()
            assert bos == spec["bos_token"]
            out[tid] = ChatTemplate.from_tokenizer(t.chat_template, bos, spec["eos_token"])
        else:
            out[tid] = ChatTemplate.from_tokenizer(None, spec["bos_token"], spec["eos_token"],
                                                   override=spec["builtin"])
    return out


def _case_id(c):
    return f"{c['template']}:{c['description']}"


@pytest.mark.parametrize("case", EXPECTED["cases"], ids=_case_id)
def test_render_matches_transformers(templates, case):
    got = templates[case["template"]].render(case["messages"], case["add_generation_prompt"], **case["kwargs"])
    assert got == case["expected"]


def test_expected_file_covers_the_families():
    ids = {c["template"] for c in EXPECTED["cases"]}
    assert {"llama3_real", "llama3_tiny", "qwen3_real", "qwen3_tiny", "chatml", "smollm2", "qwen2.5", "deepseek-r1",
            "gemma3"} <= ids
    assert "transformers" in EXPECTED["recorded_with"]


def test_builtins_equal_the_stored_templates(real_tokenizers):
    assert read_tokenizer(real_tokenizers["llama3"]).chat_template == BUILTIN_TEMPLATES["llama3"]
    assert read_tokenizer(real_tokenizers["qwen2"]).chat_template == BUILTIN_TEMPLATES["qwen3"]
    assert set(BUILTIN_TEMPLATES) >= {"llama3", "chatml", "qwen2.5", "qwen3", "deepseek-r1"}


def test_llama3_uses_strftime_now_for_today():
    t = ChatTemplate.builtin("llama3", "<|begin_of_text|>", "<|eot_id|>")
    before = datetime.now().strftime("%d %b %Y")
    out = t.render([{"role": "user", "content": "hi"}])
    assert f"Today Date: {before}\n" in out or f"Today Date: {datetime.now().strftime('%d %b %Y')}\n" in out


def test_render_defaults_to_generation_prompt():
    t = ChatTemplate.builtin("chatml")
    out = t.render([{"role": "user", "content": "hi"}])
    assert out == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert t.render([{"role": "user", "content": "hi"}], add_generation_prompt=False).endswith("<|im_end|>\n")


def test_tojson_semantics():
    t = ChatTemplate("{{ x | tojson }}|{{ x | tojson(indent=2) }}|{{ '<&>' | tojson }}")
    out = t.render([{"role": "user", "content": ""}], x={"k": "é"})
    assert out == '{"k": "é"}|{\n  "k": "é"\n}|"<&>"'


def test_loopcontrols_dict_and_namespace():
    t = ChatTemplate("{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}{{ m.content }}"
                     "{% endfor %}{% set d = dict(a=1) %}{{ d.a }}{% set ns = namespace(n=2) %}{{ ns.n }}")
    assert t.render([{"role": "user", "content": "A"}, {"role": "user", "content": "B"}]) == "A12"
    with pytest.raises(TemplateError):
        ChatTemplate("{% set ns = namespace(_x=1) %}").render([{"role": "user", "content": ""}])


def test_raise_exception_becomes_template_error():
    t = ChatTemplate("{% if messages[0].role != 'user' %}{{ raise_exception('Conversation roles must "
                     "alternate user/assistant/user/assistant/...') }}{% endif %}ok", name="strict")
    assert t.render([{"role": "user", "content": "x"}]) == "ok"
    with pytest.raises(TemplateError) as e:
        t.render([{"role": "assistant", "content": "x"}])
    assert "Conversation roles must alternate" in str(e.value) and "\n" not in str(e.value)


def test_llama3_single_tool_call_limit_raises():
    t = ChatTemplate.builtin("llama3", "<|begin_of_text|>", "<|eot_id|>")
    call = {"type": "function", "function": {"name": "f", "arguments": {}}}
    with pytest.raises(TemplateError, match="single tool-calls"):
        t.render([{"role": "user", "content": "x"}, {"role": "assistant", "tool_calls": [call, call]}])


@pytest.mark.parametrize("source", ["{% if %}", "{{ messages[0] ", "{% for m in messages %}{{ m }}",
                                    "{% endfor %}", "{% generation %}"])
def test_syntax_error_becomes_template_error(source):
    with pytest.raises(TemplateError) as e:
        ChatTemplate(source)
    assert "syntax error" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("source", ["{{ messages[0].content + 1 }}", "{{ messages[5].content.upper() }}",
                                    "{{ undefined_thing.attr }}", "{{ messages.__class__.__mro__ }}"])
def test_runtime_error_becomes_template_error(source):
    t = ChatTemplate(source)
    with pytest.raises(TemplateError) as e:
        t.render([{"role": "user", "content": "x"}])
    assert "\n" not in str(e.value)


def test_generation_block_renders_its_body():
    t = ChatTemplate("{% for m in messages %}{% generation %}[{{ m.content }}]{% endgeneration %}{% endfor %}")
    assert t.render([{"role": "assistant", "content": "a"}]) == "[a]"


def test_empty_conversation_and_bad_message():
    t = ChatTemplate.builtin("chatml")
    with pytest.raises(TemplateError):
        t.render([])
    with pytest.raises(TemplateError):
        t.render(["hello"])


def test_override_precedence():
    stored = "STORED{{ bos_token }}"
    assert ChatTemplate.from_tokenizer(stored, "<s>", "</s>").render([{"role": "user", "content": ""}]) == "STORED<s>"
    t = ChatTemplate.from_tokenizer(stored, "<s>", "</s>", override="chatml")
    assert t.source == BUILTIN_TEMPLATES["chatml"] and t.name == "chatml"
    t = ChatTemplate.from_tokenizer(None, "<s>", "</s>", override="deepseek-r1")
    assert t.render([{"role": "user", "content": "q"}]) == "<s><｜User｜>q<｜Assistant｜><think>\n"
    t = ChatTemplate.from_tokenizer(stored, "<s>", "</s>", override="{{ eos_token }}!")
    assert t.render([{"role": "user", "content": ""}]) == "</s>!"
    with pytest.raises(TemplateError, match="tokenizer has no chat template; pass --chat-template"):
        ChatTemplate.from_tokenizer(None, "<s>", "</s>")
    with pytest.raises(TemplateError, match="unknown chat template 'nope'"):
        ChatTemplate.from_tokenizer(stored, "<s>", "</s>", override="nope")


def test_kwargs_override_special_tokens():
    t = ChatTemplate("{{ bos_token }}{{ eos_token }}", "<s>", "</s>")
    assert t.render([{"role": "user", "content": ""}], bos_token="B") == "B</s>"


# --- thinking ------------------------------------------------------------------------------------

def test_split_thinking():
    assert split_thinking("<think>\nhmm\n</think>\n\nAnswer.") == ("hmm", "Answer.")
    assert split_thinking("hmm, so 4\n</think>\n\n4.") == ("hmm, so 4", "4.")          # template opened <think>
    assert split_thinking("plain answer") == ("", "plain answer")
    assert split_thinking("<think>\nstill thinking") == ("still thinking", "")
    assert split_thinking("still thinking", inside=True) == ("still thinking", "")
    assert split_thinking("<think>\n\n</think>\n\nQuick.") == ("", "Quick.")
    assert split_thinking("x</think>y", inside=False) == ("", "x</think>y")


def test_prompt_opens_thinking():
    ds = ChatTemplate.builtin("deepseek-r1", "<s>", "</s>")
    assert prompt_opens_thinking(ds.render([{"role": "user", "content": "q"}]))
    qw = ChatTemplate.builtin("qwen3")
    assert not prompt_opens_thinking(qw.render([{"role": "user", "content": "q"}]))
    assert not prompt_opens_thinking(qw.render([{"role": "user", "content": "q"}], enable_thinking=False))


def _stream(f, pieces):
    return "".join(f.push(p) for p in pieces) + f.flush()


TEXT = "<think>\nLet me think: 2+2=4.\n</think>\n\nThe answer is 4."


@pytest.mark.parametrize("size", [1, 2, 3, 5, 7, 100])
def test_thinking_filter_hides_with_tags_split(size):
    pieces = [TEXT[i:i + size] for i in range(0, len(TEXT), size)]
    f = ThinkingFilter(show=False)
    assert _stream(f, pieces) == "The answer is 4."
    assert f.thinking == "\nLet me think: 2+2=4.\n"
    assert _stream(ThinkingFilter(show=True), pieces) == TEXT


def test_thinking_filter_specific_splits():
    f = ThinkingFilter(show=False)
    assert f.push("<th") == ""
    assert f.push("ink>secret</thi") == ""
    assert f.push("nk>") == ""
    assert f.push("\n") == ""
    assert f.push("\nvisible <") == "visible "
    assert f.push("b>bold") == "<b>bold"
    assert f.flush() == ""
    f = ThinkingFilter(show=False)
    assert f.push("a <thin") == "a "
    assert f.flush() == "<thin"              # a partial tag that never completed is shown at the end


def test_thinking_filter_started_inside():
    f = ThinkingFilter(show=False, inside=True)
    assert _stream(f, ["Okay, the", " user asks", "</", "think>", "\n\n", "Hello!"]) == "Hello!"
    assert f.thinking == "Okay, the user asks"
    f = ThinkingFilter(show=False, inside=True)
    assert _stream(f, ["never", " finished"]) == ""


def test_thinking_filter_no_thinking():
    assert _stream(ThinkingFilter(show=False), ["Just ", "an ", "answer < 5"]) == "Just an answer < 5"
