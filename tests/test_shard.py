"""The shard plan: whole heads, KV replication, block-aligned FFN slices, clear refusals."""

import pytest

from dllama_mpi.errors import ConfigError
from dllama_mpi.formats import F32, Q40, ModelHeader
from dllama_mpi.shard import even_split, make_plan


def header(**kw):
    base = dict(dim=576, hidden_dim=1536, n_layers=2, n_heads=9, n_kv_heads=3, vocab_size=49152,
                max_seq_len=2048, weights_float_type=Q40, head_dim=0)
    base.update(kw)
    return ModelHeader(**base)


def test_even_split():
    assert even_split(10, 3) == [(0, 4), (4, 7), (7, 10)]
    assert even_split(1536, 4, 32) == [(0, 384), (384, 768), (768, 1152), (1152, 1536)]
    assert even_split(96, 2, 32) == [(0, 64), (64, 96)]


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 9])
def test_smollm2_shape_any_n(n):
    h = header()
    plan = make_plan(h, n)
    heads = [s.heads for s in plan.shards]
    assert heads[0][0] == 0 and heads[-1][1] == 9
    assert all(a[1] == b[0] for a, b in zip(heads, heads[1:]))
    for r in range(n):
        s = plan[r]
        assert s.n_heads >= 1
        # every local query head maps to a local kv head that holds it
        for local_h, kv in enumerate(plan.kv_of_q(r)):
            assert 0 <= kv < s.n_kv_heads
            assert (s.heads[0] + local_h) // 3 == s.kv_heads[0] + kv
        assert s.n_ffn % 32 == 0 and s.n_ffn > 0
    assert sum(plan[r].n_vocab for r in range(n)) == 49152
    assert sum(plan[r].n_ffn for r in range(n)) == 1536
    dims = [plan[r].dim_chunk for r in range(n)]
    assert dims[0][0] == 0 and dims[-1][1] == 576 and all(c[0] % 32 == 0 for c in dims)


def test_kv_replication_when_more_nodes_than_kv_heads():
    h = header(dim=64, hidden_dim=192, n_heads=4, n_kv_heads=2, head_dim=32, vocab_size=512)
    plan = make_plan(h, 4)
    assert [plan[r].kv_heads for r in range(4)] == [(0, 1), (0, 1), (1, 2), (1, 2)]
    plan3 = make_plan(h, 3)
    assert [plan3[r].heads for r in range(3)] == [(0, 2), (2, 3), (3, 4)]
    assert [plan3[r].kv_heads for r in range(3)] == [(0, 1), (1, 2), (1, 2)]


def test_small_models_leave_some_ranks_without_a_slice():
    # tiny_llama q40: head_dim 16, so heads go in pairs (32 wo columns): 4 nodes -> 2 with heads
    plan = make_plan(header(dim=64, hidden_dim=192, n_heads=4, n_kv_heads=2, vocab_size=512), 2)
    assert [plan[r].heads for r in range(2)] == [(0, 2), (2, 4)]
    with_moe = make_plan(header(dim=64, hidden_dim=64, n_heads=4, n_kv_heads=2, head_dim=32, vocab_size=512), 4)
    assert [with_moe[r].ffn for r in range(4)] == [(0, 32), (32, 64), (64, 64), (64, 64)]


def test_refusals():
    with pytest.raises(ConfigError, match="9 attention heads"):
        make_plan(header(), 10)
    # head_dim 16 q40: pairs of heads are the smallest wo slices, so 4 heads allow 2 nodes
    with pytest.raises(ConfigError, match="at most 2 slices"):
        make_plan(header(dim=64, hidden_dim=192, n_heads=4, n_kv_heads=2, vocab_size=512), 4)
    # the same shape in f32 has no block constraint
    make_plan(header(dim=64, hidden_dim=192, n_heads=4, n_kv_heads=2, vocab_size=512, weights_float_type=F32), 4)
    with pytest.raises(ConfigError, match="cannot be cut"):
        make_plan(header(dim=80, hidden_dim=192, n_heads=5, n_kv_heads=1, head_dim=16, vocab_size=512), 2)


# ---------------------------------------------------------------------------------------------
# GGUF block types: column slices on their blocks, and the q80 fallback when no split can

def typed(h, types_by_name):
    """h with every matrix called a key of types_by_name given that type (others keep key 13's)."""
    from dllama_mpi.formats import set_matrix_types

    set_matrix_types(h, [types_by_name.get(n, h.weights_float_type) for n in h.matrix_names()])
    return h


def test_k_quant_columns_cut_on_super_blocks():
    """Gemma 3 270M's Q4_K_M: wo (1024 columns, 4 heads of 256) Q4_K, w2 (2048 columns) Q4_K / Q6_K,
    the rest Q5_0 / Q8_0: every N up to its 4 heads cuts wo and w2 on 256-value super-blocks."""
    from dllama_mpi.formats import Q4_K, Q5_0, Q6_K
    from dllama_mpi.shard import column_unit

    h = typed(header(dim=640, hidden_dim=2048, n_heads=4, n_kv_heads=1, head_dim=256, vocab_size=262144,
                     weights_float_type=Q5_0), {"wo": Q4_K, "w2": Q6_K})
    assert column_unit(h, "wo") == 256 and column_unit(h, "w2") == 256 and column_unit(h, "wq") == 32
    for n in (1, 2, 3, 4):
        plan = make_plan(h, n)
        assert all(plan[r].n_ffn % 256 == 0 for r in range(n))
        assert [plan[r].n_ffn for r in range(n)] == {1: [2048], 2: [1024] * 2, 3: [768, 768, 512],
                                                      4: [512] * 4}[n]
        assert all(plan[r].n_heads * 256 % 256 == 0 for r in range(n))


def test_fit_types_turns_uncuttable_wo_into_q80():
    """wo as Q4_K with 8 heads of 32 is one 256-value block per row: no split of 2+ ranks can cut it,
    so fit_types makes those matrices q80 (32-value blocks) and says so; w2 stays Q6_K (its 512 rows
    give 2 slices, and more ranks may go without FFN rows); one rank keeps every type."""
    from dllama_mpi.formats import Q4_K, Q6_K, Q80
    from dllama_mpi.shard import fit_types

    h = typed(header(dim=256, hidden_dim=512, n_heads=8, n_kv_heads=4, head_dim=0, vocab_size=512,
                     weights_float_type=Q80), {"wo": Q4_K, "w2": Q6_K})
    with pytest.raises(ConfigError, match="give at most 1 slices of wo columns that are a multiple of 256"):
        make_plan(h, 2)
    same, plan, note = fit_types(h, lambda hh: make_plan(hh, 1))
    assert same is h and note is None
    for n in (2, 4):
        h2, plan, note = fit_types(h, lambda hh: make_plan(hh, n))
        assert h2.types_of("wo") == {Q80} and h2.types_of("w2") == {Q6_K} and h.types_of("wo") == {Q4_K}
        assert note.startswith("the 2 wo matrices of q4_k (256-value blocks) cannot be cut")
        assert plan.n_nodes == n
    with pytest.raises(ConfigError, match="over 16 nodes"):   # still impossible: the heads themselves
        fit_types(h, lambda hh: make_plan(hh, 16))
