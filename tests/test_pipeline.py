"""Pipeline layout and weighted splits (pipeline.py, shard.weighted_split), and `--pp` / `--split`
from the command line under mpiexec (the collective cases are in test_mpi.py)."""

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import TINY
from dllama_mpi.errors import ConfigError
from dllama_mpi.formats import F32, Q40, ModelHeader
from dllama_mpi.pipeline import kv_row_bytes, layer_bytes, make_layout, measure_speed, parse_split
from dllama_mpi.shard import even_split, weighted_split

BIN = Path(sys.executable).parent
DLLAMA = [str(BIN / "dllama-mpi")] if (BIN / "dllama-mpi").exists() else [sys.executable, "-m", "dllama_mpi.cli"]
MPIEXEC = str(BIN / "mpiexec")
LLAMA = str(TINY / "m" / "dllama_model_tiny_llama_f32.m")
TOK = str(TINY / "t" / "dllama_tokenizer_tiny_llama3.t")
GOLDEN = json.loads((TINY / "golden" / "bug_last_prompt_token_correct.json").read_text())   # prompt "copyright"


def one_b(**kw) -> ModelHeader:
    """The Llama 3.2 1B shape (16 layers)."""
    base = dict(dim=2048, hidden_dim=8192, n_layers=16, n_heads=32, n_kv_heads=8, vocab_size=128256,
                max_seq_len=2048, weights_float_type=Q40)
    base.update(kw)
    return ModelHeader(**base)


def test_weighted_split_is_even_split_for_equal_weights():
    for n, parts, unit in [(10, 3, 1), (1536, 4, 32), (96, 2, 32), (7, 7, 1), (3, 5, 1)]:
        assert weighted_split(n, [1] * parts, unit) == even_split(n, parts, unit)
    assert weighted_split(32, [3, 1]) == [(0, 24), (24, 32)]
    assert weighted_split(8192, [0.7, 0.3], 32) == [(0, 5728), (5728, 8192)]
    assert weighted_split(10, [1, 0, 1]) == [(0, 5), (5, 5), (5, 10)]
    with pytest.raises(ValueError):
        weighted_split(10, [0, 0])


def test_layout_stages_layers_and_shares():
    h = one_b()
    lay = make_layout(h, 4, 2)
    assert [s.ranks for s in lay.stages] == [(0, 1), (2, 3)]
    # wcls (4.3 layers' worth of weights) counts as the last stage's work
    assert [s.layers for s in lay.stages] == [(0, 10), (10, 16)]
    assert [s.n_layers for s in make_layout(h, 4, 4).stages] == [5, 5, 5, 1]
    assert lay.stages[0].plan.n_nodes == 2 and lay.stages[0].plan[1].heads == (16, 32)
    # a stage twice as fast gets twice the layers; inside it, heads follow the rank weights
    lay = make_layout(h, 4, 2, [3, 1, 1, 1])
    assert [s.n_layers for s in lay.stages] == [14, 2]
    assert lay.stages[0].plan[0].heads == (0, 24) and lay.stages[0].plan[0].ffn == (0, 6144)
    assert lay.share(0) == 0.75 and lay.share(3) == 0.5
    # uneven rank counts per stage; every stage gets a layer however small its weight
    lay = make_layout(h, 3, 3, [100, 100, 1])
    assert [s.ranks for s in lay.stages] == [(0,), (1,), (2,)]
    assert min(s.n_layers for s in lay.stages) == 1 and sum(s.n_layers for s in lay.stages) == 16
    assert [s.ranks for s in make_layout(h, 3, 2).stages] == [(0, 1), (2,)]


def test_layout_respects_free_memory():
    h = one_b()
    L, embed, head = layer_bytes(h)
    # rank 1 is fast but holds only 3 layers' worth: the rest go to rank 0
    mem = [100 * L + embed / 0.9, (3.4 * L + head) / 0.9]
    lay = make_layout(h, 2, 2, [1, 10], mem)
    assert lay.stages[1].n_layers == 3
    assert sum(s.n_layers for s in lay.stages) == 16
    # inside a stage: a rank's share of the rows is capped by its memory
    lay = make_layout(h, 2, 1, [1, 1], [100 * L + embed / 0.9, 4 * L])
    assert lay.share(1) * (16 * L + head) <= 0.9 * 4 * L < 0.5 * (16 * L + head)
    with pytest.raises(ConfigError, match="does not fit"):
        make_layout(h, 2, 2, [1, 1], [L, L])


def test_layout_refusals():
    h = one_b()
    with pytest.raises(ConfigError, match="needs at least 3 ranks"):
        make_layout(h, 2, 3)
    with pytest.raises(ConfigError, match="fewer than the stages"):
        make_layout(one_b(n_layers=2), 4, 4)
    with pytest.raises(ConfigError, match="every weight of the stage"):
        make_layout(h, 2, 2, [1, 0])
    with pytest.raises(ConfigError, match="2 weights for 3 ranks"):
        parse_split("1,2", 3)
    with pytest.raises(ConfigError, match="even, auto or one weight"):
        parse_split("fast", 2)
    assert parse_split("3,1", 2) == [3.0, 1.0] and parse_split(None, 2) == "even" and parse_split("AUTO", 2) == "auto"


def test_kv_rows_per_stage():
    h = one_b()
    full = 2 * 4 * 16 * 64 * 8
    assert kv_row_bytes(h, make_layout(h, 1, 1)) == full
    assert kv_row_bytes(h, make_layout(h, 4, 4)) == full * 5 // 16          # 5 layers, every KV head
    assert kv_row_bytes(h, make_layout(h, 4, 2)) == full * 10 // 16 // 2    # 10 layers x 4 of 8 KV heads


@pytest.mark.parametrize("ftype", [Q40, F32])
def test_speed_measurement_is_short_and_positive(ftype):
    t = time.perf_counter()
    gbps = measure_speed(one_b(weights_float_type=ftype), 2)
    assert gbps > 0.05 and time.perf_counter() - t < 2.0


def _run(n, *args, timeout=120):
    return subprocess.run([MPIEXEC, "-n", str(n)] + DLLAMA + ["inference", "--model", LLAMA, "--tokenizer", TOK,
                          "--prompt", "copyright", "--steps", str(len(GOLDEN["generated_ids"])), "--temperature", "0",
                          "--json", *args], capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def test_cli_pp2_split_auto_prints_the_plan_and_gives_the_golden_tokens():
    r = _run(2, "--pp", "2", "--split", "auto")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["generated_ids"] == GOLDEN["generated_ids"]
    lines = [l for l in r.stderr.splitlines() if re.match(r"rank \d on ", l)]
    assert len(lines) == 2, r.stderr
    for k, l in enumerate(lines):
        assert re.match(rf"rank {k} on \S+: stage {k}, layers \d-\d, [0-9.]+ GB/s, \d+% of the rows .*MiB, [0-9.]+ GiB free", l), l
    assert "2 pipeline stages" in r.stderr


@pytest.mark.parametrize("args,message", [
    (["--pp", "3"], "error: --pp 3 needs at least 3 ranks (one per stage), the job has 2"),
    (["--pp", "2", "--split", "1,0"], "error: --split: every weight of the stage of ranks 1-1 is 0"),
    (["--split", "1,2,3"], "error: --split 1,2,3: 3 weights for 2 ranks (one per rank)"),
])
def test_cli_bad_layouts_one_line(args, message):
    r = _run(2, *args, timeout=60)
    assert r.returncode == 2
    errors = [l for l in r.stderr.splitlines() if l.startswith("error:")]
    assert errors == [message], r.stderr
