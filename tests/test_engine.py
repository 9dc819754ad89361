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


@pytest.mark.parametrize("name,kw", [("tiny_llama_f32", {}), ("tiny_qwen3_f32", {}),
                                     ("tiny_llama_q40", {"buffer_type": "q80"}),
                                     ("tiny_qwen3_moe_q40", {"buffer_type": "q80"}),
                                     ("tiny_qwen3_q40", {"buffer_type": "q80", "max_batch": 7})])
def test_rows_of_many_sequences_in_one_pass_are_bitwise_those_run_alone(comm, name, kw):
    alone, mixed = batch_invariance(comm, name, **kw)
    assert alone.keys() == mixed.keys()
    for key in alone:
        assert np.array_equal(alone[key], mixed[key]), key
