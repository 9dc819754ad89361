"""Regenerate gemma3_llamacpp_completions.json: llama.cpp's greedy completions (llama-simple) of
factual prompts on the google/gemma-3-270m GGUF, and the float64 reference forward pass's greedy
ids for the same prompts (tests/reference_gemma3.py on the f32 conversion of that GGUF).

    .venv/bin/python tests/data/record_gemma3_completions.py LLAMA_SIMPLE GGUF

A prompt counts when llama.cpp's completion contains the expected answer (`correct`); `agree` says
whether the reference's greedy ids decode to exactly llama.cpp's text, `agree_tokens` how many of them
llama.cpp's text starts with (a later near-tie, e.g. " Water" vs "\n\n" 0.14 apart in the logits,
may break the other way under llama.cpp's quantized activations). tests/test_gemma3.py teacher-forces
the agreeing ids through the reference and asserts that every argmax is the next id.
"""
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

from dllama_mpi.convert.gemma3 import ensure_gemma3  # noqa: E402
from dllama_mpi.tokenizer import Tokenizer  # noqa: E402
from reference_gemma3 import ReferenceGemma3  # noqa: E402

OUT = os.path.join(HERE, "gemma3_llamacpp_completions.json")
N_PREDICT = 12
PROMPTS = [      # (prompt, the answer a correct completion contains)
    ("The capital of France is", "Paris"),      # the base 270M answers "the capital of the country of France"
    ("Q: What is the capital of France?\nA:", "Paris"),
    ("The Eiffel Tower is located in the city of", "Paris"),
    ("The chemical symbol for gold is", "Au"),
    ("Water freezes at a temperature of", "0 degrees"),
    ("Water is made of hydrogen and", "oxygen"),
    ("The first man on the moon was Neil", "Armstrong"),
    ("The largest ocean on Earth is the", "Pacific"),
    ("Romeo and Juliet was written by William", "Shakespeare"),
]


def agreeing_prefix(tok, ids, text) -> int:
    """How many of the reference's ids llama.cpp's text starts with (both decode greedily from the
    same prompt: they agree up to the first near-tie that the two computations break differently)."""
    k = 0
    while k < len(ids) and text.startswith(tok.decode(ids[:k + 1])):
        k += 1
    return k


def main():
    binary, gguf = sys.argv[1], sys.argv[2]
    model, tok_path = ensure_gemma3()
    tok = Tokenizer.load(tok_path)
    ref = ReferenceGemma3(model)
    cases = []
    for prompt, answer in PROMPTS:
        r = subprocess.run([binary, "-m", gguf, "-n", str(N_PREDICT), prompt], capture_output=True, check=True)
        printed = r.stdout.decode("utf-8", errors="replace")
        head = "<bos>" + prompt
        assert printed.startswith(head), printed[:80]
        text = printed[len(head):]
        text = text[:-1] if text.endswith("\n") else text        # llama-simple's final newline
        ids = ref.greedy(tok.encode(prompt), N_PREDICT)
        stop = [i for i, t in enumerate(ids) if t in tok.eos_ids]     # llama-simple stops there
        ids = ids[:stop[0]] if stop else ids
        cases.append({"prompt": prompt, "answer": answer, "llamacpp": text, "reference_ids": ids,
                      "reference": tok.decode(ids), "correct": answer in text, "agree": tok.decode(ids) == text,
                      "agree_tokens": agreeing_prefix(tok, ids, text)})
        print(json.dumps(cases[-1], ensure_ascii=False))
    with open(OUT, "w", encoding="utf-8") as f:
        json.dump({"how": "tests/data/record_gemma3_completions.py (llama-simple -n %d PROMPT)" % N_PREDICT,
                   "gguf": os.path.basename(gguf), "cases": cases}, f, ensure_ascii=False, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()
