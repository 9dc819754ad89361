"""Perplexity of a Gemma 3 f32 `.m` model by the float64 numpy reference (tests/reference_gemma3.py),
with llama.cpp's llama-perplexity method, for scripts/gemma3_reference.md:

    .venv/bin/python scripts/gemma3_reference_ppl.py MODEL.m TOKENIZER.t TEXT [--ctx 512] [--chunks K]

the text (one trailing newline dropped, as llama.cpp's -f does) tokenized with BOS, non-overlapping
chunks of ctx tokens whose first token is replaced by BOS, only the second half of each chunk scored
(logits at ctx/2 .. ctx-2 predict the next token); prints the running [i]ppl and
`Final estimate: PPL = x +/- y` with llama.cpp's error formula. Slow (minutes): it is a reference.
"""
import argparse
import math
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

from reference_gemma3 import ReferenceGemma3  # noqa: E402

from dllama_mpi.tokenizer import Tokenizer  # noqa: E402

ROWS = 32          # scored rows per float64 logits block


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("tokenizer")
    ap.add_argument("text")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--chunks", type=int, default=-1)
    a = ap.parse_args()
    text = open(a.text, encoding="utf-8").read()
    if text.endswith("\n"):
        text = text[:-1]
    tok = Tokenizer.load(a.tokenizer)
    ids = tok.encode(text, add_bos=True, parse_special=False)
    n_chunk = len(ids) // a.ctx if a.chunks < 0 else min(a.chunks, len(ids) // a.ctx)
    print(f"{len(ids)} tokens, {n_chunk} chunks of {a.ctx}", file=sys.stderr)
    ref = ReferenceGemma3(a.model)
    first = a.ctx // 2
    nll = nll2 = 0.0
    count = 0
    for c in range(n_chunk):
        chunk = ids[c * a.ctx:(c + 1) * a.ctx]
        chunk[0] = tok.bos_id
        hidden = ref.hidden(chunk)
        for r0 in range(first, a.ctx - 1, ROWS):
            r1 = min(r0 + ROWS, a.ctx - 1)
            logits = ref.logits(hidden[r0:r1])
            m = logits.max(axis=1, keepdims=True)
            lse = m[:, 0] + np.log(np.exp(logits - m).sum(axis=1))
            v = lse - logits[np.arange(r1 - r0), chunk[r0 + 1:r1 + 1]]
            nll += float(v.sum())
            nll2 += float((v * v).sum())
            count += r1 - r0
        print(f"[{c + 1}]{math.exp(nll / count):.4f},", end="", flush=True)
    print()
    av = nll / count
    sd = math.sqrt(max(nll2 / count - av * av, 0.0) / (count - 1))
    ppl = math.exp(av)
    print(f"Final estimate: PPL = {ppl:.4f} +/- {sd * ppl:.5f}")


if __name__ == "__main__":
    main()
