"""Single-rank engine against Distributed Llama's golden outputs (fixtures README, tolerances there)."""

import numpy as np
import pytest
from mpi4py import MPI

from dllama_mpi.comm import Comm
from goldens import batch_invariance, golden, greedy_ids, teacher_forced_logits


@pytest.fixture
def comm():
    return Comm(MPI.COMM_SELF)


@pytest.mark.parametrize("name", ["tiny_llama_f32", "tiny_qwen3_f32"])
@pytest.mark.parametrize("batch", [32, 7, 1])
def test_f32_logits_match_golden(comm, name, batch):
    meta, gold = golden(f"{name}_n1")
    logits, _ = teacher_forced_logits(comm, name, f"{name}_n1", max_batch=batch)
    assert logits.shape == gold.shape
    assert np.abs(logits - gold).max() < 1e-3


@pytest.mark.parametrize("name", ["tiny_llama_f32", "tiny_qwen3_f32"])
@pytest.mark.parametrize("argmax", [False, True])
def test_f32_greedy_ids_match_golden(comm, name, argmax):
    meta, _ = golden(f"{name}_n1")
    ids = greedy_ids(comm, name, meta["prompt_ids"], len(meta["generated_ids"]), argmax=argmax)
    assert ids == meta["generated_ids"]


@pytest.mark.parametrize("name", ["tiny_llama_q40", "tiny_llama_tied_q40", "tiny_qwen3_q40", "tiny_qwen3_moe_q40"])
def test_q40_logits_match_golden(comm, name):
    meta, gold = golden(f"{name}_n1")
    logits, _ = teacher_forced_logits(comm, name, f"{name}_n1", buffer_type="q80", sync="dllama")
    diff = np.abs(logits - gold)
    # rows 0-4 reproduce Distributed Llama's q80 points exactly; later rows drift when a q80 value
    # sits on a rounding boundary (fixtures README), so the bound there is on the mean
    assert diff[:5].max() < 1e-4, diff[:5].max(axis=1)
    assert diff.mean() < 0.07


def test_last_prompt_token_is_the_real_one(comm):
    """Distributed Llama feeds a stale token at the last prompt position; we feed the real one,
    which gives HF's greedy output (bug_last_prompt_token_correct)."""
    correct, _ = golden("bug_last_prompt_token_correct")
    mimic, _ = golden("bug_last_prompt_token_mimic")
    name = correct["command"]["model"].split("/")[-1][len("dllama_model_"):-2]
    ids = greedy_ids(comm, name, correct["prompt_ids"], len(correct["generated_ids"]))
    assert ids == correct["generated_ids"]
    assert ids != mimic["generated_ids"]


# q80 / f16 weights (Distributed Llama's own converter wrote these files) against the f32 model:
# measured on tiny_llama, 62 positions: q80 mean |diff| 0.13 (max 0.8, top-1 97 %), f16 0.003
# (max 0.02), q40 1.34 (top-1 66 %); logits are about 6.4 in magnitude.
WEIGHT_NOISE = {"tiny_llama_q80": (0.25, 0.9), "tiny_llama_f16": (0.01, 0.98)}


def within_weight_noise(logits, gold, name, buffer_type):
    """(ok, detail): mean |diff| within the weight type's noise (q80 activations add q80 noise to f16
    too), the same top-1 token at most positions."""
    mean, top = WEIGHT_NOISE[name]
    if buffer_type == "q80":
        mean, top = max(mean, 0.25), min(top, 0.9)
    d = np.abs(logits - gold)
    same = float(np.mean(logits.argmax(1) == gold.argmax(1)))
    return d.mean() < mean and same >= top and np.isfinite(logits).all(), (d.mean(), d.max(), same)


@pytest.mark.parametrize("name", sorted(WEIGHT_NOISE))
@pytest.mark.parametrize("buffer_type", ["q80", "f32"])
@pytest.mark.parametrize("batch", [32, 1])
def test_q80_f16_logits_within_noise_of_f32(comm, name, buffer_type, batch):
    _, gold = golden("tiny_llama_f32_n1")
    logits, engine = teacher_forced_logits(comm, name, "tiny_llama_f32_n1", buffer_type=buffer_type, max_batch=batch)
    ok, detail = within_weight_noise(logits, gold, name, buffer_type)
    assert ok, detail
    assert engine.buffer_type == buffer_type


def test_default_buffer_type_follows_weights(comm):
    for name, want in (("tiny_llama_q80", "q80"), ("tiny_llama_f16", "f32"), ("tiny_llama_q40", "q80"),
                       ("tiny_llama_f32", "f32")):
        _, engine = teacher_forced_logits(comm, name, "tiny_llama_f32_n1")
        assert engine.buffer_type == want, name


def test_mixed_type_model_runs(comm, tmp_path):
    """A GGUF with Q4_0 / Q8_0 / F16 / Q4_1 matrices becomes a .m with a type table; every matrix
    runs with its own kernel and the logits track the q40 model's."""
    import gguf

    from dllama_mpi.convert.gguf import convert_gguf
    from dllama_mpi.startup import build_engine
    from test_convert import HF, write_tiny_gguf

    Q = gguf.GGMLQuantizationType

    def qtype(name):
        return {"output.weight": Q.F16, "blk.1.ffn_down.weight": Q.Q8_0, "blk.2.ffn_up.weight": Q.Q4_1}.get(name, Q.Q4_0)

    g = write_tiny_gguf(HF / "tiny_llama", tmp_path / "mix.gguf", qtype=qtype)
    h, _ = convert_gguf(g, tmp_path / "mix.m", None, quiet=True)
    assert len(set(h.tensor_types)) == 3
    meta, gold = golden("tiny_llama_f32_n1")
    engine = build_engine(comm, str(tmp_path / "mix.m"))
    assert engine.buffer_type == "q80"
    logits = engine.forward(meta["prompt_ids"] + meta["generated_ids"][:-1], 0, all_logits=True)
    same = np.mean(logits.argmax(1) == gold.argmax(1))
    assert np.isfinite(logits).all() and np.abs(logits - gold).mean() < 2.0 and same > 0.5, same


@pytest.mark.parametrize("mix", ["q4k-q6k-q50-q41", "q2k-iq4", "q51-q3k-q5k"])
def test_gguf_block_types_track_their_f32_values(comm, tmp_path, mix):
    """A random GGUF whose matrices and embedding are GGUF block types with kernels of their own
    (multiplied as stored, q80 activations) gives logits close to the same model written as F32:
    gguf-py's dequantization of the same blocks, f32 activations. What differs is the q80 rounding
    of the activations, nothing the kernels read from the blocks."""
    from gguf_models import write_random_gguf

    from dllama_mpi.formats import IQ4_NL, IQ4_XS, Q2_K, Q3_K, Q4_1, Q4_K, Q5_0, Q5_1, Q5_K, Q6_K
    from dllama_mpi.startup import build_engine

    types = {"q4k-q6k-q50-q41": {"attn_output": Q4_K, "ffn_down": Q6_K, "attn_q": Q5_0, "attn_k": Q4_1,
                                 "attn_v": Q4_K, "ffn_gate": Q6_K, "ffn_up": Q5_0, "output": Q4_1, "token_embd": Q4_K},
             "q2k-iq4": {"attn_output": Q2_K, "ffn_down": IQ4_XS, "attn_q": IQ4_NL, "attn_k": Q2_K, "attn_v": IQ4_XS,
                         "ffn_gate": IQ4_NL, "ffn_up": Q2_K, "output": IQ4_XS, "token_embd": IQ4_NL},
             "q51-q3k-q5k": {"attn_output": Q5_K, "ffn_down": Q3_K, "attn_q": Q5_1, "attn_k": Q3_K, "attn_v": Q5_K,
                             "ffn_gate": Q5_1, "ffn_up": Q3_K, "output": Q5_K, "token_embd": Q5_1}}[mix]
    ids = [496, 12, 200, 7, 33, 41, 300, 2, 18, 99, 5, 401]
    logits = []
    for f32 in (False, True):
        path = write_random_gguf(tmp_path / f"{mix}-{f32}.gguf", types, dequantized=f32)
        engine = build_engine(comm, str(path), quiet=True)
        assert engine.buffer_type == ("f32" if f32 else "q80")
        logits.append(engine.forward(ids, 0, all_logits=True))
    got, want = logits
    d = np.abs(got - want)
    assert np.mean(got.argmax(1) == want.argmax(1)) >= 0.9 and d.mean() < 0.05 * np.abs(want).mean(), \
        (float(np.mean(got.argmax(1) == want.argmax(1))), float(d.mean()), float(np.abs(want).mean()))


@pytest.mark.parametrize("name,kw", [("tiny_llama_f32", {}), ("tiny_qwen3_f32", {}),
                                     ("tiny_llama_q40", {"buffer_type": "q80"}),
                                     ("tiny_qwen3_moe_q40", {"buffer_type": "q80"}),
                                     ("tiny_qwen3_q40", {"buffer_type": "q80", "max_batch": 7})])
def test_rows_of_many_sequences_in_one_pass_are_bitwise_those_run_alone(comm, name, kw):
    alone, mixed = batch_invariance(comm, name, **kw)
    assert alone.keys() == mixed.keys()
    for key in alone:
        assert np.array_equal(alone[key], mixed[key]), key
