"""C kernels: the scalar path against numpy references, every SIMD path against the scalar path."""

from __future__ import annotations

import numpy as np
import pytest

from dllama_mpi import kernels as K
from dllama_mpi.kernels import ffi, lib, ptr

ISAS = [i for i in K.ALL_ISAS if i != K.ISA_SCALAR and lib.dl_isa_supported(i)]
ALL_ISAS = [K.ISA_SCALAR] + ISAS
ISA_IDS = [K.isa_name(i) for i in ISAS]


@pytest.fixture(autouse=True)
def restore_defaults():
    isa, nt = lib.dl_get_isa(), lib.dl_pool_nthreads()
    yield
    lib.dl_set_isa(isa)
    lib.dl_pool_init(nt)


def use(isa: int, threads: int = 1) -> None:
    assert lib.dl_set_isa(isa) == 1
    assert lib.dl_pool_init(threads) == 0


def rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


# ---------------------------------------------------------------------------------------------
# numpy references

def ref_quantize_q80(x: np.ndarray) -> np.ndarray:
    b = x.astype(np.float32).reshape(-1, 32)
    amax = np.abs(b).max(axis=1)
    d = (amax / np.float32(127)).astype(np.float32)
    with np.errstate(divide="ignore"):
        inv = np.where(d != 0, np.float32(1) / d, np.float32(0)).astype(np.float32)
    q = np.rint(b * inv[:, None]).astype(np.int8)     # rint: half to even
    out = np.empty(b.shape[0], dtype=K.q80_dtype)
    out["d"] = d.astype(np.float16).view(np.uint16)
    out["qs"] = q
    return out.view(np.uint8)


def ref_quantize_q40(x: np.ndarray) -> np.ndarray:
    """FORMATS.md §2.1, the converter's float32 numpy arithmetic."""
    b = x.astype(np.float32).reshape(-1, 32)
    mx, mn = b.max(axis=1), b.min(axis=1)
    m = np.where(mx >= -mn, mx, mn).astype(np.float32)
    d = (m / np.float32(-8)).astype(np.float32)
    with np.errstate(divide="ignore"):
        inv = np.where(d != 0, np.float32(1) / d, np.float32(0)).astype(np.float32)
    q = np.clip(b * inv[:, None] + np.float32(8.5), np.float32(0), np.float32(15)).astype(np.uint8)
    out = np.empty(b.shape[0], dtype=K.q40_dtype)
    out["d"] = d.astype(np.float16).view(np.uint16)
    out["qs"] = q[:, :16] | (q[:, 16:] << 4)
    return out.view(np.uint8)


def q40_parts(buf: np.ndarray, rows: int, cols: int):
    blk = np.frombuffer(buf, dtype=K.q40_dtype).reshape(rows, cols // 32)
    qs = blk["qs"].astype(np.int64)
    codes = np.concatenate([qs & 15, qs >> 4], axis=2) - 8          # [rows, nb, 32]
    return codes, blk["d"].view(np.float16).astype(np.float32)


def q80_parts(buf: np.ndarray, batch: int, cols: int):
    blk = np.frombuffer(buf, dtype=K.q80_dtype).reshape(batch, cols // 32)
    return blk["qs"].astype(np.int64), blk["d"].view(np.float16).astype(np.float32)


def ref_matmul_q40_q80(w: np.ndarray, x: np.ndarray, rows: int, cols: int, batch: int):
    """float64 sum over blocks of idot * float32(dw * dx); also returns sum of |terms|."""
    wc, wd = q40_parts(w, rows, cols)
    xq, xd = q80_parts(x, batch, cols)
    idot = np.einsum("rkj,bkj->brk", wc, xq)                        # exact integers
    s = (wd[None, :, :] * xd[:, None, :]).astype(np.float32)        # [batch, rows, nb]
    terms = idot.astype(np.float64) * s.astype(np.float64)
    return terms.sum(axis=2), np.abs(terms).sum(axis=2), idot.sum(axis=2)


def random_q40(r: np.random.Generator, rows: int, cols: int) -> np.ndarray:
    return K.quantize_q40(r.standard_normal(rows * cols).astype(np.float32))


def random_q80(r: np.random.Generator, batch: int, cols: int) -> np.ndarray:
    return ref_quantize_q80(r.standard_normal(batch * cols).astype(np.float32) * 3)


def test_weights_prefetch_setting_and_its_default():
    """dl_weights_prefetch sets the distance every repacked kernel prefetches at, -1 queries it, -2
    goes back to the default: DLLAMA_PREFETCH when set, else 2048 with the AVX2 kernels on any x86
    CPU and with the AVX-512 ones on an Intel CPU, 0 everywhere else (a fresh process reads the
    environment)."""
    import subprocess
    import sys
    default = lib.dl_weights_prefetch(-1)
    try:
        assert lib.dl_weights_prefetch(512) == 512 and lib.dl_weights_prefetch(-1) == 512
        assert lib.dl_weights_prefetch(0) == 0
    finally:
        assert lib.dl_weights_prefetch(-2) == default
    code = "from dllama_mpi.kernels import lib; print(lib.dl_weights_prefetch(-1))"
    env = {k: v for k, v in __import__("os").environ.items() if k not in ("DLLAMA_PREFETCH", "DLLAMA_ISA")}
    try:
        intel = "GenuineIntel" in open("/proc/cpuinfo").read()
    except OSError:
        intel = False
    for isa, ok in (("scalar", True), ("avx2", lib.dl_isa_supported(K.ISA_AVX2)), ("avx512", lib.dl_isa_supported(K.ISA_AVX512))):
        if ok:
            out = subprocess.run([sys.executable, "-c", code], env={**env, "DLLAMA_ISA": isa}, capture_output=True, text=True)
            want = "2048" if isa == "avx2" or (isa == "avx512" and intel) else "0"
            assert out.stdout.strip() == want, (isa, out.stderr)
    out = subprocess.run([sys.executable, "-c", code], env={**env, "DLLAMA_PREFETCH": "768"}, capture_output=True, text=True)
    assert out.stdout.strip() == "768", out.stderr


# ---------------------------------------------------------------------------------------------
# f16

def test_f16_to_f32_all_values():
    h = np.arange(65536, dtype=np.uint16)
    got = K.f16_to_f32(h)
    ref = h.view(np.float16).astype(np.float32)
    nan = np.isnan(ref)
    assert np.array_equal(np.isnan(got), nan)
    assert np.array_equal(got[~nan].view(np.uint32), ref[~nan].view(np.uint32))


def test_f32_to_f16_round_to_nearest_even():
    r = rng(1)
    vals = [r.standard_normal(3000).astype(np.float32) * s for s in (1e-8, 1e-6, 1e-4, 1, 1e3, 6e4)]
    # exact halfway points between consecutive f16 values (normal and subnormal) and neighbours
    h = np.arange(0, 0x7BFF, 7, dtype=np.uint16)
    lo = h.view(np.float16).astype(np.float64)
    hi = (h + 1).view(np.float16).astype(np.float64)
    mid = ((lo + hi) / 2).astype(np.float32)
    special = np.array([0.0, -0.0, np.inf, -np.inf, 65504, 65519.996, 65520, 1e9, -1e9, 5.96e-8,
                        2.98e-8, 2.99e-8, 1e-10, np.finfo(np.float32).tiny], dtype=np.float32)
    x = np.concatenate(vals + [mid, -mid, np.nextafter(mid, np.float32(0)), special])
    got = np.array([lib.dl_f32_to_f16(float(v)) for v in x], dtype=np.uint16)
    with np.errstate(over="ignore"):
        ref = x.astype(np.float16).view(np.uint16)
    assert np.array_equal(got, ref)
    n = lib.dl_f32_to_f16(float("nan"))
    assert (n & 0x7C00) == 0x7C00 and (n & 0x3FF) != 0


# ---------------------------------------------------------------------------------------------
# quantization

def q80_inputs():
    r = rng(2)
    ties = (np.arange(-64, 64, dtype=np.float32) + np.float32(0.5))
    ties[0] = -127.0                                               # amax 127 -> d = 1, inv = 1
    return [
        r.standard_normal(32 * 40).astype(np.float32),
        r.standard_normal(32 * 7).astype(np.float32) * 1e-3,
        np.zeros(64, dtype=np.float32),
        np.concatenate([ties, -ties]),
        (r.integers(-254, 255, 32 * 16) / 2).astype(np.float32),  # many exact halves
    ]


def test_quantize_q80_scalar_matches_reference():
    use(K.ISA_SCALAR)
    for x in q80_inputs():
        assert np.array_equal(K.quantize_q80(x), ref_quantize_q80(x))


@pytest.mark.parametrize("isa", ISAS, ids=ISA_IDS)
def test_quantize_q80_simd_bitwise(isa):
    for x in q80_inputs():
        use(K.ISA_SCALAR)
        ref = K.quantize_q80(x)
        use(isa)
        assert np.array_equal(K.quantize_q80(x), ref)


def test_quantize_q40_matches_converter():
    r = rng(3)
    x = np.concatenate([
        r.standard_normal(32 * 200).astype(np.float32),
        -np.abs(r.standard_normal(64)).astype(np.float32),         # negative extreme
        np.zeros(32, dtype=np.float32),
        np.tile(np.float32([1, -1]), 16),                          # max == -min tie
        (r.integers(-16, 17, 32 * 20) / 4).astype(np.float32),      # values on code boundaries
    ])
    assert np.array_equal(K.quantize_q40(x), ref_quantize_q40(x))


def test_dequantize_q40_q80():
    r = rng(4)
    x = r.standard_normal(32 * 9).astype(np.float32)
    b40 = K.quantize_q40(x)
    codes, d = q40_parts(b40, 1, x.size)
    assert np.array_equal(K.dequantize_q40(b40, x.size),
                          (codes[0].astype(np.float32) * d[0][:, None]).reshape(-1))
    b80 = K.quantize_q80(x)
    q, d = q80_parts(b80, 1, x.size)
    assert np.array_equal(K.dequantize_q80(b80, x.size),
                          (q[0].astype(np.float32) * d[0][:, None]).reshape(-1))
    assert np.abs(K.dequantize_q80(b80, x.size) - x).max() <= np.abs(x).max() / 127


# ---------------------------------------------------------------------------------------------
# q40 x q80 matmul

SHAPES = [(r, c, b) for r in (1, 3, 17, 33) for c in (32, 64, 96, 2080) for b in (1, 3, 7)]


def test_matmul_q40_q80_scalar_vs_numpy():
    use(K.ISA_SCALAR)
    r = rng(5)
    for rows, cols, batch in SHAPES[::2]:
        w, x = random_q40(r, rows, cols), random_q80(r, batch, cols)
        ref, mag, _ = ref_matmul_q40_q80(w, x, rows, cols, batch)
        got = K.matmul_q40_q80(w, x, rows, cols, batch)
        assert np.all(np.abs(got - ref) <= 1e-6 * mag + 1e-30), (rows, cols, batch)


@pytest.mark.parametrize("isa", ALL_ISAS, ids=[K.isa_name(i) for i in ALL_ISAS])
def test_matmul_q40_q80_exact_integer_dot(isa):
    """All scales 1.0: every path must return the exact integer dot."""
    r = rng(6)
    rows, cols, batch = 19, 2080, 5
    w = np.empty(rows * cols // 32, dtype=K.q40_dtype)
    w["d"] = 0x3C00
    w["qs"] = r.integers(0, 256, (w.size, 16))
    x = np.empty(batch * cols // 32, dtype=K.q80_dtype)
    x["d"] = 0x3C00
    x["qs"] = r.integers(-128, 128, (x.size, 32))
    x["qs"][0, :] = -128
    w["qs"][0, :] = 0                                              # code 0 -> -8, times -128
    wb, xb = w.view(np.uint8), x.view(np.uint8)
    _, _, idot = ref_matmul_q40_q80(wb, xb, rows, cols, batch)
    assert np.abs(idot).max() < 2 ** 24
    for threads in (1, 2):
        use(isa, threads)
        got = K.matmul_q40_q80(wb, xb, rows, cols, batch)
        assert np.array_equal(got, idot.astype(np.float32))


@pytest.mark.parametrize("isa", ISAS, ids=ISA_IDS)
def test_matmul_q40_q80_simd_vs_scalar(isa):
    r = rng(7)
    for rows, cols, batch in SHAPES:
        w, x = random_q40(r, rows, cols), random_q80(r, batch, cols)
        use(K.ISA_SCALAR)
        ref = K.matmul_q40_q80(w, x, rows, cols, batch)
        _, mag, _ = ref_matmul_q40_q80(w, x, rows, cols, batch)
        outs = []
        for threads in (1, 2):
            use(isa, threads)
            outs.append(K.matmul_q40_q80(w, x, rows, cols, batch))
        assert np.array_equal(outs[0], outs[1]), "result depends on the thread count"
        assert np.all(np.abs(outs[0] - ref) <= 1e-5 * mag + 1e-30), (rows, cols, batch)


@pytest.mark.parametrize("isa", ALL_ISAS, ids=[K.isa_name(i) for i in ALL_ISAS])
def test_matmul_q40_q80_batch_equals_rows_and_unaligned(isa):
    """Batched call == one call per batch row; unaligned pointers (memory-mapped files)."""
    r = rng(8)
    rows, cols, batch = 37, 320, 6
    w, x = random_q40(r, rows, cols), random_q80(r, batch, cols)
    use(isa, 2)
    full = K.matmul_q40_q80(w, x, rows, cols, batch)
    _, mag, _ = ref_matmul_q40_q80(w, x, rows, cols, batch)
    for b in range(batch):
        one = K.matmul_q40_q80(w, x[b * cols // 32 * 34:(b + 1) * cols // 32 * 34], rows, cols, 1)
        assert np.all(np.abs(one[0] - full[b]) <= 1e-5 * mag[b] + 1e-30)
    wbuf = np.zeros(w.size + 3, dtype=np.uint8)
    wbuf[3:] = w
    xbuf = np.zeros(x.size + 1, dtype=np.uint8)
    xbuf[1:] = x
    out = np.empty((batch, rows), dtype=np.float32)
    lib.dl_matmul_q40_q80(ptr(out), ffi.cast("dl_block_q40 *", wbuf.ctypes.data + 3),
                          ffi.cast("dl_block_q80 *", xbuf.ctypes.data + 1), rows, cols, batch)
    assert np.array_equal(out, full)


# ---------------------------------------------------------------------------------------------
# f32 matmul

# 100 and 640 columns: the matvec's one-row tiles (dl_matvec_tile_rows) for f32 and for f16
F32_SHAPES = [(r, c, b) for r in (1, 3, 17, 33) for c in (1, 5, 32, 33, 100, 640, 2080) for b in (1, 3, 7)]


@pytest.mark.parametrize("isa", ALL_ISAS, ids=[K.isa_name(i) for i in ALL_ISAS])
def test_matmul_f32(isa):
    r = rng(9)
    for rows, cols, batch in F32_SHAPES:
        w = r.standard_normal((rows, cols)).astype(np.float32)
        x = r.standard_normal((batch, cols)).astype(np.float32)
        ref = x.astype(np.float64) @ w.astype(np.float64).T
        mag = np.abs(x).astype(np.float64) @ np.abs(w).astype(np.float64).T
        outs = []
        for threads in (1, 2):
            use(isa, threads)
            outs.append(K.matmul_f32(w, x, rows, cols, batch))
        assert np.array_equal(outs[0], outs[1])
        assert np.all(np.abs(outs[0] - ref) <= 2e-6 * mag + 1e-30), (rows, cols, batch)


# ---------------------------------------------------------------------------------------------
# q80 x q80 and f16 x f32 matmuls (8- and 16-bit weights)

def ref_matmul_q80_q80(w: np.ndarray, x: np.ndarray, rows: int, cols: int, batch: int):
    """float64 sum over blocks of idot * float32(dw * dx); sum of |terms|; the integer dots."""
    wq, wd = q80_parts(w, rows, cols)
    xq, xd = q80_parts(x, batch, cols)
    idot = np.einsum("rkj,bkj->brk", wq.reshape(rows, -1, 32), xq.reshape(batch, -1, 32))
    s = (wd[None, :, :] * xd[:, None, :]).astype(np.float32)
    terms = idot.astype(np.float64) * s.astype(np.float64)
    return terms.sum(axis=2), np.abs(terms).sum(axis=2), idot.sum(axis=2)


def test_matmul_q80_q80_scalar_vs_numpy():
    use(K.ISA_SCALAR)
    r = rng(60)
    for rows, cols, batch in SHAPES[::2]:
        w, x = random_q80(r, rows, cols), random_q80(r, batch, cols)
        ref, mag, _ = ref_matmul_q80_q80(w, x, rows, cols, batch)
        got = K.matmul_q80_q80(w, x, rows, cols, batch)
        assert np.all(np.abs(got - ref) <= 1e-6 * mag + 1e-30), (rows, cols, batch)


@pytest.mark.parametrize("isa", ALL_ISAS, ids=[K.isa_name(i) for i in ALL_ISAS])
def test_matmul_q80_q80_exact_integer_dot(isa):
    """All scales 1.0, extreme values (weights -128..127, activations -127..127 as dl_quantize_q80
    makes them): every path returns the exact integer dot, at 1 and 2 threads."""
    r = rng(61)
    rows, cols, batch = 19, 2080, 5
    w = np.empty(rows * cols // 32, dtype=K.q80_dtype)
    w["d"] = 0x3C00
    w["qs"] = r.integers(-128, 128, (w.size, 32))
    w["qs"][:65, :] = -128
    x = np.empty(batch * cols // 32, dtype=K.q80_dtype)
    x["d"] = 0x3C00
    x["qs"] = r.integers(-127, 128, (x.size, 32))
    x["qs"][:65:2, :] = -127
    x["qs"][1:65:2, :] = 127
    wb, xb = w.view(np.uint8), x.view(np.uint8)
    _, _, idot = ref_matmul_q80_q80(wb, xb, rows, cols, batch)
    assert np.abs(idot).max() < 2 ** 24
    for threads in (1, 2):
        use(isa, threads)
        assert np.array_equal(K.matmul_q80_q80(wb, xb, rows, cols, batch), idot.astype(np.float32))


@pytest.mark.parametrize("isa", ISAS, ids=ISA_IDS)
def test_matmul_q80_q80_simd_vs_scalar(isa):
    r = rng(62)
    for rows, cols, batch in SHAPES + [(64, 2048, 32)]:
        w, x = random_q80(r, rows, cols), random_q80(r, batch, cols)
        use(K.ISA_SCALAR)
        ref = K.matmul_q80_q80(w, x, rows, cols, batch)
        _, mag, _ = ref_matmul_q80_q80(w, x, rows, cols, batch)
        outs = []
        for threads in (1, 2, 3):
            use(isa, threads)
            outs.append(K.matmul_q80_q80(w, x, rows, cols, batch))
        assert np.array_equal(outs[0], outs[1]) and np.array_equal(outs[0], outs[2]), "depends on threads"
        assert np.all(np.abs(outs[0] - ref) <= 1e-5 * mag + 1e-30), (rows, cols, batch)


@pytest.mark.parametrize("isa", ALL_ISAS, ids=[K.isa_name(i) for i in ALL_ISAS])
def test_matmul_q80_q80_batch_equals_rows_and_unaligned(isa):
    r = rng(63)
    rows, cols, batch = 37, 320, 6
    w, x = random_q80(r, rows, cols), random_q80(r, batch, cols)
    use(isa, 2)
    full = K.matmul_q80_q80(w, x, rows, cols, batch)
    _, mag, _ = ref_matmul_q80_q80(w, x, rows, cols, batch)
    for b in range(batch):
        one = K.matmul_q80_q80(w, x[b * cols // 32 * 34:(b + 1) * cols // 32 * 34], rows, cols, 1)
        assert np.all(np.abs(one[0] - full[b]) <= 1e-5 * mag[b] + 1e-30)
    wbuf = np.zeros(w.size + 3, dtype=np.uint8)
    wbuf[3:] = w
    out = np.empty((batch, rows), dtype=np.float32)
    lib.dl_matmul_q80_q80(ptr(out), ffi.cast("dl_block_q80 *", wbuf.ctypes.data + 3), ptr(x, "dl_block_q80"),
                          rows, cols, batch)
    assert np.array_equal(out, full)


@pytest.mark.parametrize("isa", ALL_ISAS, ids=[K.isa_name(i) for i in ALL_ISAS])
def test_matmul_f16_f32(isa):
    """Against float64 numpy on the f16 values (any cols, batch tails, unaligned weights); SIMD
    paths against the scalar one; identical bits at 1, 2, 3 threads."""
    r = rng(64)
    for rows, cols, batch in F32_SHAPES + [(64, 2048, 32)]:
        w = r.standard_normal((rows, cols)).astype(np.float16)
        special = np.array([65504, -6e-8, 0], np.float16)           # largest, subnormal, zero
        w.reshape(-1)[:3] = special[:min(3, w.size)]
        x = r.standard_normal((batch, cols)).astype(np.float32)
        ref = x.astype(np.float64) @ w.astype(np.float64).T
        mag = np.abs(x).astype(np.float64) @ np.abs(w).astype(np.float64).T
        use(K.ISA_SCALAR)
        scalar = K.matmul_f16_f32(w, x, rows, cols, batch)
        bound = 6e-8 * (cols + 2) * mag + 1e-30                      # float32 summation of cols terms
        assert np.all(np.abs(scalar - ref) <= bound), (rows, cols, batch)
        outs = []
        for threads in (1, 2, 3):
            use(isa, threads)
            outs.append(K.matmul_f16_f32(w, x, rows, cols, batch))
        assert np.array_equal(outs[0], outs[1]) and np.array_equal(outs[0], outs[2])
        assert np.all(np.abs(outs[0] - scalar) <= 2 * bound), (rows, cols, batch)
    wbuf = np.zeros(w.size * 2 + 1, np.uint8)
    wbuf[1:] = w.view(np.uint8).reshape(-1)
    out = np.empty((batch, rows), np.float32)
    lib.dl_matmul_f16_f32(ptr(out), ffi.cast("uint16_t *", wbuf.ctypes.data + 1), ptr(x), rows, cols, batch)
    assert np.array_equal(out, outs[0])


# ---------------------------------------------------------------------------------------------
# elementwise ops

@pytest.mark.parametrize("isa", ALL_ISAS, ids=[K.isa_name(i) for i in ALL_ISAS])
def test_rmsnorm(isa):
    use(isa)
    r = rng(10)
    for n, batch in ((1, 1), (7, 3), (64, 2), (100, 1), (2048, 3)):
        x = (r.standard_normal((batch, n)) * 3).astype(np.float32)
        w = r.standard_normal(n).astype(np.float32)
        x64 = x.astype(np.float64)
        ref = w * (x64 / np.sqrt((x64 ** 2).mean(axis=1, keepdims=True) + 1e-5))
        got = K.rmsnorm(x, w, 1e-5)
        assert np.allclose(got, ref, rtol=2e-6, atol=1e-7)
        if isa != K.ISA_SCALAR:
            use(K.ISA_SCALAR)
            sc = K.rmsnorm(x, w, 1e-5)
            use(isa)
            assert np.allclose(got, sc, rtol=1e-6, atol=1e-8)
    # in place (the engine normalises q/k heads in place)
    x = r.standard_normal((4, 32)).astype(np.float32)
    w = r.standard_normal(32).astype(np.float32)
    ref = K.rmsnorm(x, w, 1e-6)
    lib.dl_rmsnorm(ptr(x), ptr(x), ptr(w), 32, 1e-6, 4)
    assert np.array_equal(x, ref)


@pytest.mark.parametrize("isa", ALL_ISAS, ids=[K.isa_name(i) for i in ALL_ISAS])
def test_silu_mul(isa):
    use(isa)
    r = rng(11)
    for n in (1, 7, 8, 17, 1000):
        g = (r.standard_normal(n) * 6).astype(np.float32)
        u = r.standard_normal(n).astype(np.float32)
        g[:min(n, 4)] = np.float32([-100, 100, 0, -87.5])[:min(n, 4)]
        g64 = g.astype(np.float64)
        ref = g64 / (1 + np.exp(-g64)) * u
        got = K.silu_mul(g, u)
        # Distributed Llama's polynomial exp (relative error <= ~6e-5), on purpose: see ops.c
        assert np.allclose(got, ref, rtol=1e-4, atol=1e-30)
        use(K.ISA_SCALAR)
        assert np.array_equal(got, K.silu_mul(g, u))  # every path computes the same bits
        use(isa)


def ref_gelu_tanh(x: np.ndarray) -> np.ndarray:
    """transformers' gelu_pytorch_tanh in float64."""
    x = x.astype(np.float64)
    return 0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x ** 3)))


@pytest.mark.parametrize("isa", ALL_ISAS, ids=[K.isa_name(i) for i in ALL_ISAS])
def test_gelu_mul(isa):
    use(isa)
    r = rng(21)
    for n in (1, 3, 8, 15, 16, 17, 2048 + 5):
        g = (r.standard_normal(n) * 4).astype(np.float32)
        u = r.standard_normal(n).astype(np.float32)
        special = np.float32([-100, 100, 0, -10, 10, -3.5, 1e-30, -1e-30, 60, -60])
        g[:min(n, special.size)] = special[:min(n, special.size)]
        got = K.gelu_mul(g, u)
        ref = ref_gelu_tanh(g) * u.astype(np.float64)
        # relative to the larger of |result| and |up| * 1e-6: gelu of very negative inputs is
        # ~1e-40 scaled noise around 0 in float32 as in float64
        err = np.abs(got - ref) / np.maximum(np.abs(ref), 1e-6 * np.abs(u) + 1e-38)
        assert err.max() <= 2e-6, (n, float(err.max()), g[err.argmax()])
        assert got[g == 0].tolist() == [0.0] * int((g == 0).sum())
        use(K.ISA_SCALAR)
        assert np.array_equal(got, K.gelu_mul(g, u))      # every path computes the same bits
        use(isa)
    # in place (out = gate), as the forward pass calls it
    g = r.standard_normal(40).astype(np.float32)
    u = r.standard_normal(40).astype(np.float32)
    want = K.gelu_mul(g, u)
    lib.dl_gelu_mul(ptr(g), ptr(g), ptr(u), 40)
    assert np.array_equal(g, want)


@pytest.mark.parametrize("isa", ALL_ISAS, ids=[K.isa_name(i) for i in ALL_ISAS])
def test_scale(isa):
    use(isa)
    r = rng(22)
    for n in (1, 7, 8, 16, 17, 640):
        x = r.standard_normal(n).astype(np.float32)
        s = np.float32(np.sqrt(640.0))
        assert np.array_equal(K.scale(x, float(s)), x * s)    # one float32 multiply, exactly


@pytest.mark.parametrize("isa", ISAS, ids=ISA_IDS)
def test_add_and_add_q80_bitwise(isa):
    r = rng(12)
    for n in (32, 96, 2080):
        a = r.standard_normal(n + 3).astype(np.float32)[:n]
        o = r.standard_normal(n).astype(np.float32)
        parts = np.concatenate([K.quantize_q80(r.standard_normal(n).astype(np.float32)) for _ in range(3)])
        use(K.ISA_SCALAR)
        ra, rq = K.add(o, a), K.add_q80(o, parts, 3)
        use(isa)
        assert np.array_equal(K.add(o, a), ra)
        assert np.array_equal(K.add_q80(o, parts, 3), rq)
        assert np.array_equal(K.add(o[:5], a[:5]), o[:5] + a[:5])


def test_add_q80_scalar_reference():
    use(K.ISA_SCALAR)
    r = rng(13)
    n = 96
    o = r.standard_normal(n).astype(np.float32)
    xs = [r.standard_normal(n).astype(np.float32) for _ in range(3)]
    parts = np.concatenate([K.quantize_q80(x) for x in xs])
    ref = o.copy()
    for p in range(3):
        ref = ref + K.dequantize_q80(parts[p * n // 32 * 34:(p + 1) * n // 32 * 34], n)
    assert np.array_equal(K.add_q80(o, parts, 3), ref)


@pytest.mark.parametrize("isa", ALL_ISAS, ids=[K.isa_name(i) for i in ALL_ISAS])
def test_softmax(isa):
    r = rng(14)
    for n in (1, 5, 8, 9, 100, 1003):
        x = (r.standard_normal(n) * 5).astype(np.float32)
        x[:min(n, 2)] = np.float32([-120, 30])[:min(n, 2)]   # below the exp's -87 cut-off after - max
        e = np.exp(x.astype(np.float64) - x.max())
        use(isa)
        got = K.softmax(x)
        assert np.allclose(got, e / e.sum(), rtol=1e-4, atol=1e-9)
        use(K.ISA_SCALAR)
        assert np.array_equal(got, K.softmax(x))   # every path computes the same bits


@pytest.mark.parametrize("rope_type", [K.ROPE_INTERLEAVED, K.ROPE_HALF])
def test_rope(rope_type):
    r = rng(15)
    for hd, nh, pos0, batch in ((16, 3, 0, 1), (64, 2, 37, 3), (128, 1, 5000, 2)):
        freqs = (1.0 / (500000.0 ** (np.arange(0, hd, 2) / hd))).astype(np.float32)
        x = r.standard_normal((batch, nh, hd)).astype(np.float32)
        got = K.rope(x, nh, hd, pos0, rope_type, freqs).reshape(batch, nh, hd)
        ref = x.astype(np.float64).copy()
        for b in range(batch):
            ang = (np.float32(pos0 + b) * freqs).astype(np.float32).astype(np.float64)
            c, s = np.cos(ang), np.sin(ang)
            if rope_type == K.ROPE_INTERLEAVED:
                i0, i1 = np.arange(0, hd, 2), np.arange(1, hd, 2)
            else:
                i0, i1 = np.arange(hd // 2), np.arange(hd // 2, hd)
            x0, x1 = x[b][:, i0].astype(np.float64), x[b][:, i1].astype(np.float64)
            ref[b][:, i0] = x0 * c - x1 * s
            ref[b][:, i1] = x0 * s + x1 * c
        assert np.allclose(got, ref, rtol=1e-5, atol=2e-6), (hd, nh, pos0)


# ---------------------------------------------------------------------------------------------
# attention

def ref_attention(q, kc, vc, kv_of_q, nq, nkv, hd, pos0):
    batch = q.shape[0]
    out = np.zeros((batch, nq, hd))
    q = q.reshape(batch, nq, hd).astype(np.float64)
    k = kc.reshape(-1, nkv, hd).astype(np.float64)
    v = vc.reshape(-1, nkv, hd).astype(np.float64)
    for b in range(batch):
        T = pos0 + b + 1
        for h in range(nq):
            g = kv_of_q[h]
            s = k[:T, g] @ q[b, h] / np.sqrt(hd)
            p = np.exp(s - s.max())
            out[b, h] = (p / p.sum()) @ v[:T, g]
    return out.reshape(batch, nq * hd)


ATTN_CASES = [(hd, nq, nkv, pos0, batch)
              for hd, nq, nkv in ((16, 3, 1), (32, 4, 2), (64, 6, 4), (128, 2, 2))
              for pos0, batch in ((0, 1), (7, 3), (40, 2), (0, 5))]


@pytest.mark.parametrize("isa", ALL_ISAS, ids=[K.isa_name(i) for i in ALL_ISAS])
def test_attention(isa):
    r = rng(16)
    for hd, nq, nkv, pos0, batch in ATTN_CASES:
        max_seq = pos0 + batch + 2
        kv_of_q = np.array([min(h * nkv // nq, nkv - 1) for h in range(nq)], dtype=np.int32)
        if nq == 6:
            kv_of_q = np.array([3, 0, 1, 1, 2, 0], dtype=np.int32)      # arbitrary mapping
        q = (r.standard_normal((batch, nq * hd)) * 2).astype(np.float32)
        kc = r.standard_normal((max_seq, nkv * hd)).astype(np.float32)
        vc = r.standard_normal((max_seq, nkv * hd)).astype(np.float32)
        kc[pos0 + batch:] = np.nan                                      # rows past the last must not be read
        vc[pos0 + batch:] = np.nan
        ref = ref_attention(q, kc, vc, kv_of_q, nq, nkv, hd, pos0)
        outs = []
        for threads in (1, 2):
            use(isa, threads)
            outs.append(K.attention(q, kc, vc, kv_of_q, nq, nkv, hd, pos0))
        assert np.array_equal(outs[0], outs[1])
        # the polynomial exp (relative error <= 6e-5) bounds the agreement with float64
        assert np.allclose(outs[0], ref, rtol=2e-4, atol=2e-4), (hd, nq, nkv, pos0, batch)


def _paged(kc, vc, page_size, r, extra_pages=3):
    """The contiguous cache rows scattered into shuffled pages of a pool (NaN everywhere else), and
    the table mapping the sequence's pages to them."""
    rows, width = kc.shape
    n_seq_pages = -(-rows // page_size)
    n_pages = n_seq_pages + extra_pages
    table = r.permutation(n_pages)[:n_seq_pages].astype(np.int32)
    kp = np.full((n_pages * page_size, width), np.nan, np.float32)
    vp = kp.copy()
    for t in range(rows):
        row = table[t // page_size] * page_size + t % page_size
        kp[row], vp[row] = kc[t], vc[t]
    return kp, vp, table


@pytest.mark.parametrize("isa", ALL_ISAS, ids=[K.isa_name(i) for i in ALL_ISAS])
def test_paged_attention_equals_contiguous(isa):
    """Pages in any order give the same bits as one contiguous cache."""
    use(isa)
    r = rng(17)
    for hd, nq, nkv, pos0, batch in ATTN_CASES:
        kv_of_q = np.array([min(h * nkv // nq, nkv - 1) for h in range(nq)], dtype=np.int32)
        q = (r.standard_normal((batch, nq * hd)) * 2).astype(np.float32)
        kc = r.standard_normal((pos0 + batch, nkv * hd)).astype(np.float32)
        vc = r.standard_normal((pos0 + batch, nkv * hd)).astype(np.float32)
        want = K.attention(q, kc, vc, kv_of_q, nq, nkv, hd, pos0)
        for ps in (1, 4, 16):
            kp, vp, table = _paged(kc, vc, ps, r)
            got = K.attention_paged(q, kp, vp, kv_of_q, nq, nkv, hd, pos0, 0, table, ps)
            assert np.array_equal(got, want), (hd, nq, nkv, pos0, batch, ps)


@pytest.mark.parametrize("isa", ALL_ISAS, ids=[K.isa_name(i) for i in ALL_ISAS])
def test_attention_rows_of_several_sequences_are_batch_invariant(isa):
    """Rows of different sequences (own tables, own positions) in one call give each row the bits it
    gets alone."""
    use(isa, 2)
    r = rng(18)
    hd, nq, nkv, ps = 32, 4, 2, 4
    kv_of_q = np.array([0, 0, 1, 1], np.int32)
    n_pages = 40
    kp = r.standard_normal((n_pages * ps, nkv * hd)).astype(np.float32)
    vp = r.standard_normal((n_pages * ps, nkv * hd)).astype(np.float32)
    tables = np.stack([r.permutation(n_pages)[:10] for _ in range(3)]).astype(np.int32)
    pos = np.array([0, 17, 5, 6, 39, 21], np.int32)
    slot = np.array([1, 0, 2, 2, 1, 0], np.int32)
    q = r.standard_normal((len(pos), nq * hd)).astype(np.float32)
    together = K.attention_paged(q, kp, vp, kv_of_q, nq, nkv, hd, pos, slot, tables, ps)
    for b in range(len(pos)):
        alone = K.attention_paged(q[b:b + 1], kp, vp, kv_of_q, nq, nkv, hd, pos[b:b + 1], slot[b:b + 1], tables, ps)
        assert np.array_equal(together[b], alone[0]), b


@pytest.mark.parametrize("isa", ALL_ISAS, ids=[K.isa_name(i) for i in ALL_ISAS])
def test_grouped_attention_gives_the_per_row_bits(isa):
    """dl_attention reads each KV head's rows once for a group of queries (the query heads of that
    KV head over a run of rows of one sequence at consecutive positions); it must give every row and
    head exactly dl_attention_rows' bits (one task per row and head): GQA 1..20 query heads per KV
    head (over 16: the group is split), runs broken by another sequence or a gap in positions, long
    runs (a prompt chunk: cut into several groups, greedy or of equal sizes), sliding windows over a
    ring of pages, 1-3 and 5 threads (each thread one run of tasks of about equal cost). Cache rows
    no row may read are NaN."""
    r = rng(23)
    cases = [(64, 9, 3), (256, 4, 1), (32, 4, 2), (16, 6, 6), (16, 40, 2), (32, 8, 1)]
    pos = np.array([0, 17, 18, 19, 20, 5, 6, 39, 21, 22, 60, 61, 62, 63, 64, 65, 66, 67, 68, 69, 70,
                    71, 72, 73, 74, 75, 76, 77, 78, 79, 80, 81, 83, 9], np.int32)
    slot = np.array([1, 0, 0, 0, 0, 2, 2, 1, 0, 0] + [1] * 23 + [2], np.int32)
    ps, n_pages = 4, 90
    for threads in (1, 2, 3, 5):
        use(isa, threads)
        for hd, nq, nkv in cases:
            kv_of_q = np.array([h * nkv // nq for h in range(nq)], np.int32)
            tables = np.stack([r.permutation(n_pages)[:22] for _ in range(3)]).astype(np.int32)
            kp = np.full((n_pages * ps, nkv * hd), np.nan, np.float32)
            vp = kp.copy()
            for s, p in zip(slot, pos):   # every position up to each row's own, of its sequence
                for t in range(p + 1):
                    row = tables[s][t // ps] * ps + t % ps
                    if np.isnan(kp[row, 0]):
                        kp[row] = r.standard_normal(nkv * hd)
                        vp[row] = r.standard_normal(nkv * hd)
            q = r.standard_normal((len(pos), nq * hd)).astype(np.float32)
            for window in (0, 5):
                got = K.attention_paged(q, kp, vp, kv_of_q, nq, nkv, hd, pos, slot, tables, ps, window=window)
                want = K.attention_paged(q, kp, vp, kv_of_q, nq, nkv, hd, pos, slot, tables, ps, window=window,
                                         per_row=True)
                assert not np.isnan(want).any()
                assert np.array_equal(got, want), (threads, hd, nq, nkv, window)
    # a sliding window over a ring of pages, a run of 6 rows at the end of the window
    hd, nq, nkv, window, ring = 32, 4, 1, 9, 5
    kv_of_q = np.zeros(nq, np.int32)
    table = np.array([3, 0, 6, 2, 5], np.int32)
    kp = np.full((8 * ps, nkv * hd), np.nan, np.float32)
    vp = kp.copy()
    for t in range(40):
        row = table[(t // ps) % ring] * ps + t % ps
        kp[row], vp[row] = r.standard_normal(nkv * hd), r.standard_normal(nkv * hd)
    pos = np.arange(34, 40, dtype=np.int32)
    q = r.standard_normal((len(pos), nq * hd)).astype(np.float32)
    got = K.attention_paged(q, kp, vp, kv_of_q, nq, nkv, hd, pos, 0, table, ps, ring_pages=ring, window=window)
    want = K.attention_paged(q, kp, vp, kv_of_q, nq, nkv, hd, pos, 0, table, ps, ring_pages=ring, window=window,
                             per_row=True)
    assert not np.isnan(want).any() and np.array_equal(got, want)


@pytest.mark.parametrize("isa", ALL_ISAS, ids=[K.isa_name(i) for i in ALL_ISAS])
def test_sliding_window_attention_over_a_ring(isa):
    """window > 0: a row sees its last `window` positions; with ring_pages the table is a ring."""
    use(isa)
    r = rng(19)
    hd, nq, nkv, ps, window = 16, 2, 1, 4, 6
    kv_of_q = np.zeros(nq, np.int32)
    T = 23
    kc = r.standard_normal((T, nkv * hd)).astype(np.float32)
    vc = r.standard_normal((T, nkv * hd)).astype(np.float32)
    ring = 3                                            # (window + 1 row) / 4 rounded up, + 1
    table = np.array([7, 2, 5], np.int32)
    kp = np.full((8 * ps, nkv * hd), np.nan, np.float32)
    vp = kp.copy()
    for pos in range(T):
        row = table[(pos // ps) % ring] * ps + pos % ps  # the ring overwrites the oldest page
        kp[row], vp[row] = kc[pos], vc[pos]
        q = r.standard_normal((1, nq * hd)).astype(np.float32)
        got = K.attention_paged(q, kp, vp, kv_of_q, nq, nkv, hd, pos, 0, table, ps, ring_pages=ring, window=window)
        t0 = max(0, pos - window + 1)
        want = K.attention(q, kc[t0:pos + 1], vc[t0:pos + 1], kv_of_q, nq, nkv, hd, pos - t0)
        assert np.array_equal(got, want), pos


def test_rope_rows_at_their_own_positions():
    r = rng(20)
    hd, nh = 64, 3
    freqs = (1.0 / (10000.0 ** (np.arange(0, hd, 2) / hd))).astype(np.float32)
    pos = np.array([9, 0, 300, 9, 4], np.int32)
    x = r.standard_normal((len(pos), nh * hd)).astype(np.float32)
    together = K.rope(x, nh, hd, pos, K.ROPE_HALF, freqs)
    for b, p in enumerate(pos):
        assert np.array_equal(together[b], K.rope(x[b:b + 1], nh, hd, int(p), K.ROPE_HALF, freqs)[0])


@pytest.mark.parametrize("isa", ALL_ISAS, ids=[K.isa_name(i) for i in ALL_ISAS])
def test_silu_mul_rows_are_batch_invariant(isa):
    """Distributed Llama's libm tail applies per row: a row gets the same bits in any batch."""
    use(isa)
    r = rng(21)
    n, batch = 45, 3
    g = (r.standard_normal((batch, n)) * 4).astype(np.float32)
    u = r.standard_normal((batch, n)).astype(np.float32)
    together = K.silu_mul(g, u, n)
    for b in range(batch):
        assert np.array_equal(together[b], K.silu_mul(g[b], u[b]))


# ---------------------------------------------------------------------------------------------
# dispatch / pool

def test_dispatch_and_pool():
    assert lib.dl_isa_supported(K.ISA_SCALAR)
    assert lib.dl_set_isa(99) == 0
    assert K.isa_name(K.ISA_SCALAR) == "scalar"
    for n in (1, 2, 3, 1):
        K.set_threads(n)
        assert K.n_threads() == n
    # many small calls through the pool (wake-up path)
    use(lib.dl_get_isa(), 2)
    r = rng(17)
    w, x = random_q40(r, 9, 64), random_q80(r, 1, 64)
    first = K.matmul_q40_q80(w, x, 9, 64, 1)
    for _ in range(200):
        assert np.array_equal(K.matmul_q40_q80(w, x, 9, 64, 1), first)


# ---------------------------------------------------------------------------------------------
# repacked (interleaved) q40: dl_repack_q40 / dl_matmul_q40r_q80

def repack_q40(w: np.ndarray, rows: int, cols: int, misalign: int = 0) -> np.ndarray:
    n = lib.dl_q40r_bytes(rows, cols)
    buf = np.full(n + 64 + misalign, 0xAB, np.uint8)
    off = (-buf.ctypes.data) % 64 + misalign
    out = buf[off:off + n]
    lib.dl_repack_q40(ffi.cast("void *", out.ctypes.data), ptr(w, "dl_block_q40"), rows, cols)
    return out


def matmul_q40r(wr: np.ndarray, x: np.ndarray, rows: int, cols: int, batch: int) -> np.ndarray:
    out = np.full((batch, rows), np.nan, np.float32)
    lib.dl_matmul_q40r_q80(ptr(out), ffi.cast("void *", wr.ctypes.data), ptr(x, "dl_block_q80"),
                           rows, cols, batch)
    return out


Q40R_SHAPES = [(1, 32, 1), (15, 64, 2), (16, 32, 1), (17, 96, 3), (37, 320, 9), (48, 2080, 1),
               (100, 256, 17), (5, 64, 33)]


def check_r16_positions(wr: np.ndarray, w: np.ndarray, rows: int, cols: int, bb: int) -> None:
    """The documented layout (dl_internal.h): per group, pairs of blocks = 64 bytes of f16 scales
    (16 rows of block 2j, then of 2j+1), then bb bytes of codes per block, [i][row][4 bytes]."""
    nb, pair = cols // 32, 64 + 2 * bb
    stride = (nb + 1) // 2 * pair
    per_i = bb // 64   # 4-byte groups of a row per block: 4 (q40: 16 bytes), 8 (q80: 32 bytes)
    raw = w.view(np.uint8).reshape(rows, nb, -1)   # [row, block, (d, qs)]
    for row in {0, rows - 1, rows // 2}:
        g, r = divmod(row, 16)
        for k in {0, nb - 1, nb // 2}:
            base = g * stride + (k // 2) * pair
            assert bytes(wr[base + (k % 2) * 32 + 2 * r:][:2]) == bytes(raw[row, k, :2])
            codes = wr[base + 64 + (k % 2) * bb:][:bb].reshape(per_i, 16, 4)[:, r, :].reshape(-1)
            qs = raw[row, k, 2:]
            assert np.array_equal(codes, qs if bb == 256 else qs ^ 0x80)


def test_q40r_layout_roundtrip_and_size():
    r = rng(40)
    for rows, cols, _ in Q40R_SHAPES:
        w = random_q40(r, rows, cols)
        nb = cols // 32
        groups = (rows + 15) // 16
        assert lib.dl_q40r_bytes(rows, cols) == groups * ((nb + 1) // 2) * 576
        for threads in (1, 2):
            use(K.ISA_SCALAR, threads)
            wr = repack_q40(w, rows, cols)
            check_r16_positions(wr, w, rows, cols, 256)
            back = np.zeros_like(w)
            lib.dl_unpack_q40r(ptr(back, "dl_block_q40"), ffi.cast("void *", wr.ctypes.data), rows, cols)
            assert np.array_equal(back, w)


@pytest.mark.parametrize("isa", ALL_ISAS, ids=[K.isa_name(i) for i in ALL_ISAS])
@pytest.mark.parametrize("wtype,guided", [("q40", 1), ("q40", 0), ("q80", 1)])
def test_multi_matrix_job_equals_each_matrix_alone(isa, wtype, guided):
    """One job over several matrices with the same x (q/k/v, gate/up: dl_matmul_q40r_q80_n and
    _q80r_), static or guided thread split, more matrices than one job takes: every output
    bit-identical to that matrix's own call."""
    r = rng(44)
    make, repack, alone_fn = ((random_q40, repack_q40, matmul_q40r) if wtype == "q40" else
                              (random_q80, repack_q80, matmul_q80r))
    multi = lib.dl_matmul_q40r_q80_n if wtype == "q40" else lib.dl_matmul_q80r_q80_n
    lib.dl_q40r_guided(guided)
    try:
        for rows_list, cols, batch in [((64, 16, 16), 256, 1), ((33, 1, 47), 96, 3), ((48, 21), 2080, 1),
                                       ((17, 100, 5, 64, 9), 64, 9)]:
            wrs = [repack(make(r, rows, cols), rows, cols) for rows in rows_list]
            x = random_q80(r, batch, cols)
            for threads in (1, 2, 3):
                use(isa, threads)
                alone = [alone_fn(wr, x, rows, cols, batch) for wr, rows in zip(wrs, rows_list)]
                outs = [np.full((batch, rows), np.nan, np.float32) for rows in rows_list]
                multi(len(rows_list), ffi.new("float *[]", [ptr(o) for o in outs]),
                      ffi.new("void *[]", [ffi.cast("void *", w.ctypes.data) for w in wrs]),
                      ffi.new("int[]", list(rows_list)), ptr(x, "dl_block_q80"), cols, batch)
                for o, a in zip(outs, alone):
                    assert np.array_equal(o, a)
    finally:
        lib.dl_q40r_guided(1)


def test_q40r_scalar_bitwise_equals_plain_scalar():
    r = rng(41)
    use(K.ISA_SCALAR)
    for rows, cols, batch in Q40R_SHAPES:
        w, x = random_q40(r, rows, cols), random_q80(r, batch, cols)
        ref = K.matmul_q40_q80(w, x, rows, cols, batch)
        assert np.array_equal(matmul_q40r(repack_q40(w, rows, cols), x, rows, cols, batch), ref)


@pytest.mark.parametrize("isa", ALL_ISAS, ids=[K.isa_name(i) for i in ALL_ISAS])
def test_q40r_exact_integer_dot(isa):
    """All scales 1.0, extreme codes and activations: the exact integer dot on every path."""
    r = rng(42)
    rows, cols, batch = 19, 2080, 5
    w = np.empty(rows * cols // 32, dtype=K.q40_dtype)
    w["d"] = 0x3C00
    w["qs"] = r.integers(0, 256, (w.size, 16))
    w["qs"][:65, :] = 0                                            # code 0 -> -8 ...
    x = np.empty(batch * cols // 32, dtype=K.q80_dtype)
    x["d"] = 0x3C00
    x["qs"] = r.integers(-128, 128, (x.size, 32))
    x["qs"][:65, :] = -128                                         # ... times -128
    wb, xb = w.view(np.uint8), x.view(np.uint8)
    _, _, idot = ref_matmul_q40_q80(wb, xb, rows, cols, batch)
    assert np.abs(idot).max() < 2 ** 24
    wr = repack_q40(wb, rows, cols)
    for threads in (1, 2):
        use(isa, threads)
        assert np.array_equal(matmul_q40r(wr, xb, rows, cols, batch), idot.astype(np.float32))


@pytest.mark.parametrize("isa", ISAS, ids=ISA_IDS)
def test_q40r_simd_vs_plain_and_threads(isa):
    """Odd shapes (rows not a multiple of 16, odd block counts, batch tails), 1/2/3 threads:
    identical bits whatever the thread count, within float rounding of the plain kernel; outputs
    beyond `rows` are never written."""
    r = rng(43)
    for rows, cols, batch in Q40R_SHAPES + [(2048, 2048, 1), (512, 8192, 32)]:
        w, x = random_q40(r, rows, cols), random_q80(r, batch, cols)
        use(K.ISA_SCALAR)
        ref = K.matmul_q40_q80(w, x, rows, cols, batch)
        _, mag, _ = ref_matmul_q40_q80(w, x, rows, cols, batch)
        wr = repack_q40(w, rows, cols, misalign=3)                 # unaligned buffer still works
        outs = []
        for threads in (1, 2, 3):
            use(isa, threads)
            outs.append(matmul_q40r(wr, x, rows, cols, batch))
        assert np.array_equal(outs[0], outs[1]) and np.array_equal(outs[0], outs[2])
        assert np.all(np.abs(outs[0] - ref) <= 1e-5 * mag + 1e-30), (rows, cols, batch)
        # batched == one row at a time
        for b in (0, batch - 1):
            one = matmul_q40r(wr, x[b * cols // 32 * 34:(b + 1) * cols // 32 * 34], rows, cols, 1)
            assert np.array_equal(one[0], outs[0][b])
    # a row count that is not a multiple of 16 leaves the rest of `out` untouched
    rows, cols, batch = 21, 64, 3
    w, x = random_q40(r, rows, cols), random_q80(r, batch, cols)
    wr = repack_q40(w, rows, cols)
    big = np.full((batch, 32), -7.0, np.float32)
    use(isa, 2)
    lib.dl_matmul_q40r_q80(ptr(big), ffi.cast("void *", wr.ctypes.data), ptr(x, "dl_block_q80"), rows, cols, batch)
    flat = big.reshape(-1)
    assert np.all(flat[batch * rows:] == -7.0)


def test_read_bytes_probe():
    a = np.arange(1 << 16, dtype=np.uint64)
    for threads in (1, 2):
        use(K.ISA_SCALAR, threads)
        assert lib.dl_read_bytes(ffi.cast("void *", a.ctypes.data), a.nbytes) == int(a.sum())


@pytest.mark.parametrize("isa", ALL_ISAS, ids=[K.isa_name(i) for i in ALL_ISAS])
def test_q40r_matvec_streams_and_prefetch_do_not_change_results(isa):
    """The matvec's 1-4 streams per thread and 2-4 batch rows read as 2 streams (AVX-512), with and
    without prefetch, 1 and 2 threads: the same bits, every row of a batch of 2-5 as alone."""
    r = rng(44)
    rows, cols = 16 * 37 + 5, 320
    w, x = random_q40(r, rows, cols), random_q80(r, 5, cols)
    wr = repack_q40(w, rows, cols)
    row = cols // 32 * 34
    try:
        outs = []
        for threads in (1, 2):
            use(isa, threads)
            for s in (1, 2, 3, 4):
                for p in (0, 1024):
                    lib.dl_q40r_split(s)
                    lib.dl_weights_prefetch(p)
                    alone = np.concatenate([matmul_q40r(wr, np.ascontiguousarray(x[b * row:(b + 1) * row]), rows, cols, 1)
                                            for b in range(5)])
                    outs.append(alone)
                    for batch in (2, 3, 4, 5):
                        got = matmul_q40r(wr, np.ascontiguousarray(x[:batch * row]), rows, cols, batch)
                        assert np.array_equal(got, alone[:batch]), (threads, s, p, batch)
        assert all(np.array_equal(o, outs[0]) for o in outs)
    finally:
        lib.dl_q40r_split(0)        # back to the defaults
        lib.dl_weights_prefetch(-2)


# ---------------------------------------------------------------------------------------------
# repacked q80 (q80r)

def repack_q80(w: np.ndarray, rows: int, cols: int, misalign: int = 0) -> np.ndarray:
    n = lib.dl_q80r_bytes(rows, cols)
    buf = np.full(n + 64 + misalign, 0xAB, np.uint8)
    off = (-buf.ctypes.data) % 64 + misalign
    out = buf[off:off + n]
    lib.dl_repack_q80(ffi.cast("void *", out.ctypes.data), ptr(w, "dl_block_q80"), rows, cols)
    return out


def matmul_q80r(wr: np.ndarray, x: np.ndarray, rows: int, cols: int, batch: int) -> np.ndarray:
    out = np.full((batch, rows), np.nan, np.float32)
    lib.dl_matmul_q80r_q80(ptr(out), ffi.cast("void *", wr.ctypes.data), ptr(x, "dl_block_q80"),
                           rows, cols, batch)
    return out


def test_q80r_layout_roundtrip_and_size():
    r = rng(70)
    for rows, cols, _ in Q40R_SHAPES:
        w = random_q80(r, rows, cols)
        nb = cols // 32
        assert lib.dl_q80r_bytes(rows, cols) == (rows + 15) // 16 * ((nb + 1) // 2) * 1088
        for threads in (1, 2):
            use(K.ISA_SCALAR, threads)
            back = np.zeros_like(w)
            wr = repack_q80(w, rows, cols)      # kept alive while C reads it
            check_r16_positions(wr, w, rows, cols, 512)
            lib.dl_unpack_q80r(ptr(back, "dl_block_q80"), ffi.cast("void *", wr.ctypes.data), rows, cols)
            assert np.array_equal(back, w)


def test_q80r_scalar_bitwise_equals_plain_scalar():
    r = rng(71)
    use(K.ISA_SCALAR)
    for rows, cols, batch in Q40R_SHAPES:
        w, x = random_q80(r, rows, cols), random_q80(r, batch, cols)
        assert np.array_equal(matmul_q80r(repack_q80(w, rows, cols), x, rows, cols, batch),
                              K.matmul_q80_q80(w, x, rows, cols, batch))


@pytest.mark.parametrize("isa", ALL_ISAS, ids=[K.isa_name(i) for i in ALL_ISAS])
def test_q80r_exact_integer_dot(isa):
    r = rng(72)
    rows, cols, batch = 19, 2080, 5
    w = np.empty(rows * cols // 32, dtype=K.q80_dtype)
    w["d"] = 0x3C00
    w["qs"] = r.integers(-128, 128, (w.size, 32))
    w["qs"][:65, :] = -128
    x = np.empty(batch * cols // 32, dtype=K.q80_dtype)
    x["d"] = 0x3C00
    x["qs"] = r.integers(-127, 128, (x.size, 32))
    x["qs"][:65:2, :] = -127
    x["qs"][1:65:2, :] = 127
    wb, xb = w.view(np.uint8), x.view(np.uint8)
    _, _, idot = ref_matmul_q80_q80(wb, xb, rows, cols, batch)
    wr = repack_q80(wb, rows, cols)
    for threads in (1, 2):
        use(isa, threads)
        assert np.array_equal(matmul_q80r(wr, xb, rows, cols, batch), idot.astype(np.float32))


@pytest.mark.parametrize("isa", ISAS, ids=ISA_IDS)
def test_q80r_simd_vs_plain_and_threads(isa):
    r = rng(73)
    for rows, cols, batch in Q40R_SHAPES + [(2048, 2048, 1), (512, 4096, 32)]:
        w, x = random_q80(r, rows, cols), random_q80(r, batch, cols)
        use(K.ISA_SCALAR)
        ref = K.matmul_q80_q80(w, x, rows, cols, batch)
        _, mag, _ = ref_matmul_q80_q80(w, x, rows, cols, batch)
        wr = repack_q80(w, rows, cols, misalign=3)
        outs = []
        try:
            for threads in (1, 2, 3):
                use(isa, threads)
                for pf in (0, 2048, 96):    # software prefetch (any distance) never changes a result
                    lib.dl_weights_prefetch(pf)
                    outs.append(matmul_q80r(wr, x, rows, cols, batch))
        finally:
            lib.dl_weights_prefetch(-2)
        assert all(np.array_equal(outs[0], o) for o in outs[1:])
        assert np.all(np.abs(outs[0] - ref) <= 1e-5 * mag + 1e-30), (rows, cols, batch)
        for b in (0, batch - 1):
            one = matmul_q80r(wr, x[b * cols // 32 * 34:(b + 1) * cols // 32 * 34], rows, cols, 1)
            assert np.array_equal(one[0], outs[0][b])
    rows, cols, batch = 21, 64, 3      # rows beyond `rows` are never written
    w, x = random_q80(r, rows, cols), random_q80(r, batch, cols)
    big = np.full((batch, 32), -7.0, np.float32)
    wr = repack_q80(w, rows, cols)
    use(isa, 2)
    lib.dl_matmul_q80r_q80(ptr(big), ffi.cast("void *", wr.ctypes.data), ptr(x, "dl_block_q80"), rows, cols, batch)
    assert np.all(big.reshape(-1)[batch * rows:] == -7.0)


@pytest.mark.parametrize("isa", ALL_ISAS, ids=[K.isa_name(i) for i in ALL_ISAS])
def test_matmul_rows_are_batch_invariant(isa):
    """Continuous batching needs each output row to get the same bits whatever rows share the call:
    every row of a batched f32 / q40 / repacked q40 matmul equals that row computed alone."""
    r = rng(45)
    use(isa, 2)
    for rows, cols, batch in ((37, 96, 13), (64, 2048, 9)):
        w32 = r.standard_normal((rows, cols)).astype(np.float32)
        x32 = r.standard_normal((batch, cols)).astype(np.float32)
        together = K.matmul_f32(w32, x32, rows, cols, batch)
        for b in range(batch):
            assert np.array_equal(together[b], K.matmul_f32(w32, x32[b], rows, cols, 1)[0]), ("f32", b)
        w, x = random_q40(r, rows, cols), random_q80(r, batch, cols)
        row_bytes = cols // 32 * 34
        wr = repack_q40(w, rows, cols)
        t_plain = K.matmul_q40_q80(w, x, rows, cols, batch)
        t_rep = matmul_q40r(wr, x, rows, cols, batch)
        for b in range(batch):
            xb = x[b * row_bytes:(b + 1) * row_bytes]
            assert np.array_equal(t_plain[b], K.matmul_q40_q80(w, xb, rows, cols, 1)[0]), ("q40", b)
            assert np.array_equal(t_rep[b], matmul_q40r(wr, xb, rows, cols, 1)[0]), ("q40r", b)


@pytest.mark.parametrize("isa", ALL_ISAS, ids=[K.isa_name(i) for i in ALL_ISAS])
def test_q80_f16_f32_matmul_rows_are_batch_invariant(isa):
    """The same for the 8- and 16-bit and f32 weight kernels: q80, repacked q80, f16 and f32 rows of
    a batched call equal the row alone, bit for bit (640 columns: one-row matvec tiles for f16 and
    f32, 4-row tiles in the batched call)."""
    r = rng(74)
    use(isa, 2)
    for rows, cols, batch in ((37, 96, 13), (37, 640, 5), (64, 2048, 9)):
        w, x = random_q80(r, rows, cols), random_q80(r, batch, cols)
        row_bytes = cols // 32 * 34
        wr = repack_q80(w, rows, cols)
        t_plain = K.matmul_q80_q80(w, x, rows, cols, batch)
        t_rep = matmul_q80r(wr, x, rows, cols, batch)
        w16 = r.standard_normal((rows, cols)).astype(np.float16)
        x32 = r.standard_normal((batch, cols)).astype(np.float32)
        t16 = K.matmul_f16_f32(w16, x32, rows, cols, batch)
        w32 = r.standard_normal((rows, cols)).astype(np.float32)
        t32 = K.matmul_f32(w32, x32, rows, cols, batch)
        for b in range(batch):
            xb = x[b * row_bytes:(b + 1) * row_bytes]
            assert np.array_equal(t_plain[b], K.matmul_q80_q80(w, xb, rows, cols, 1)[0]), ("q80", b)
            assert np.array_equal(t_rep[b], matmul_q80r(wr, xb, rows, cols, 1)[0]), ("q80r", b)
            assert np.array_equal(t16[b], K.matmul_f16_f32(w16, x32[b], rows, cols, 1)[0]), ("f16", b)
            assert np.array_equal(t32[b], K.matmul_f32(w32, x32[b:b + 1], rows, cols, 1)[0]), ("f32", b)


@pytest.mark.parametrize("isa", ALL_ISAS, ids=[K.isa_name(i) for i in ALL_ISAS])
def test_fused_pairs_equal_the_two_calls(isa):
    """dl_rmsnorm_q80, dl_silu_mul_q80, dl_gelu_mul_q80, dl_add_via_q80, dl_rope_qk, dl_scatter_kv: the
    same bits as the two kernels called one after the other."""
    use(isa, 2)
    r = rng(90)
    n, batch = 320, 3
    f = lambda a: ptr(a)  # noqa: E731
    q80 = lambda a: ptr(a, "dl_block_q80")  # noqa: E731
    x, w = r.standard_normal(n * batch).astype(np.float32), r.standard_normal(n).astype(np.float32)
    yq_a, yq_b = np.zeros(n * batch // 32 * 34, np.uint8), np.zeros(n * batch // 32 * 34, np.uint8)
    out_a, out_b = np.zeros(n * batch, np.float32), np.zeros(n * batch, np.float32)
    lib.dl_rmsnorm(f(out_a), f(x), f(w), n, 1e-5, batch)
    lib.dl_quantize_q80(q80(yq_a), f(out_a), n * batch)
    lib.dl_rmsnorm_q80(q80(yq_b), f(out_b), f(x), f(w), n, 1e-5, batch)
    assert np.array_equal(out_a, out_b) and np.array_equal(yq_a, yq_b)
    up = r.standard_normal(n * batch).astype(np.float32)
    lib.dl_silu_mul(f(out_a), f(x), f(up), n, batch)
    lib.dl_quantize_q80(q80(yq_a), f(out_a), n * batch)
    lib.dl_silu_mul_q80(q80(yq_b), f(out_b), f(x), f(up), n, batch)
    assert np.array_equal(out_a, out_b) and np.array_equal(yq_a, yq_b)
    lib.dl_gelu_mul(f(out_a), f(x), f(up), n * batch)
    lib.dl_quantize_q80(q80(yq_a), f(out_a), n * batch)
    lib.dl_gelu_mul_q80(q80(yq_b), f(out_b), f(x), f(up), n * batch)
    assert np.array_equal(out_a, out_b) and np.array_equal(yq_a, yq_b)
    acc_a, acc_b = up.copy(), up.copy()
    lib.dl_quantize_q80(q80(yq_a), f(x), n * batch)
    lib.dl_add_q80(f(acc_a), q80(yq_a), 1, n * batch)
    lib.dl_add_via_q80(f(acc_b), q80(yq_b), f(x), n * batch)
    assert np.array_equal(acc_a, acc_b)
    hd, nq, nkv = 64, 4, 2
    pos = np.array([3, 17, 200], np.int32)
    freqs = (1.0 / 10000 ** (np.arange(0, hd, 2) / hd)).astype(np.float32)
    for rope_type in (0, 1):
        qa, ka = r.standard_normal(batch * nq * hd).astype(np.float32), r.standard_normal(batch * nkv * hd).astype(np.float32)
        qb, kb = qa.copy(), ka.copy()
        p_pos = ffi.cast("int32_t *", pos.ctypes.data)
        lib.dl_rope(f(qa), nq, hd, p_pos, batch, rope_type, f(freqs))
        lib.dl_rope(f(ka), nkv, hd, p_pos, batch, rope_type, f(freqs))
        lib.dl_rope_qk(f(qb), nq, f(kb), nkv, hd, p_pos, batch, rope_type, f(freqs))
        assert np.array_equal(qa, qb) and np.array_equal(ka, kb)
    rows = np.array([5, 0, 9], np.int32)
    kc, vc = np.zeros((10, 32), np.float32), np.zeros((10, 32), np.float32)
    k, v = r.standard_normal((batch, 32)).astype(np.float32), r.standard_normal((batch, 32)).astype(np.float32)
    lib.dl_scatter_kv(f(kc), f(vc), f(k), f(v), ffi.cast("int32_t *", rows.ctypes.data), batch, 32)
    assert np.array_equal(kc[rows], k) and np.array_equal(vc[rows], v) and not kc[[1, 2, 3, 4, 6, 7, 8]].any()


# ---------------------------------------------------------------------------------------------
# the GGUF block types: row dequantization (the embedding) and the rx matmuls, against gguf-py's own
# dequantization of the same blocks (an implementation that is not ours)

from dllama_mpi.formats import (BF16, F16, F32, FLOAT_NAMES, IQ4_NL, IQ4_XS, Q2_K, Q3_K, Q40,  # noqa: E402
                                Q80, TYPE_BLOCK, Q4_1, Q4_K, Q5_0, Q5_1, Q5_K, Q6_K, type_to_ggml)

RX_TYPES = {Q4_1: "q41", Q5_0: "q50", Q5_1: "q51", Q2_K: "q2k", Q3_K: "q3k", Q4_K: "q4k", Q5_K: "q5k",
            Q6_K: "q6k", IQ4_NL: "iq4nl", IQ4_XS: "iq4xs"}


def gguf_dequantize(raw: np.ndarray, ftype: int, rows: int, cols: int) -> np.ndarray:
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    return np.asarray(dequantize(raw.reshape(rows, -1), GGMLQuantizationType(type_to_ggml(ftype))),
                      np.float32).reshape(rows, cols)


def edge_blocks(r, ftype: int, rows: int, cols: int) -> np.ndarray:
    """Random blocks, then edge cases: all-zero and all-ones code bytes, zero / extreme / subnormal
    f16 scales (the ones random_blocks keeps finite), a row of zero bytes."""
    w = K.random_blocks(r, ftype, rows, cols).reshape(rows, -1).copy()
    values, nbytes = TYPE_BLOCK[ftype]
    if values == 1:
        return w
    blocks = w.reshape(rows, -1, nbytes)
    blocks[0, 0] = 0
    blocks[-1, -1] = 0xFF                                     # every code at its largest ...
    for at in K._F16_FIELDS[FLOAT_NAMES[ftype]]:
        blocks[-1, -1, at:at + 2] = (0x00, 0x3C)              # ... with finite (1.0) scales
    for at in K._F16_FIELDS[FLOAT_NAMES[ftype]]:
        for i, h in enumerate((0x7BFF, 0x0001, 0x03FF, 0x8001, 0x0000)):   # max, subnormals, -sub, zero
            b = blocks[(1 + i) % rows, i % blocks.shape[1]]
            b[at:at + 2] = np.frombuffer(np.uint16(h).tobytes(), np.uint8)
    return w


@pytest.mark.parametrize("ftype", sorted(TYPE_BLOCK), ids=[FLOAT_NAMES[t] for t in sorted(TYPE_BLOCK)])
def test_dequantize_rows_equals_gguf(ftype):
    """The embedding lookup decodes every type exactly as gguf-py (ggml's reference) does: the same
    float32 bits, rows picked by id in any order."""
    r = rng(60 + ftype)
    values = TYPE_BLOCK[ftype][0]
    rows, cols = 7, (2 * values if values > 1 else 37)
    w = edge_blocks(r, ftype, rows, cols)
    want = gguf_dequantize(w, ftype, rows, cols)
    ids = np.array([3, 0, 6, 3, 1], np.int32)
    got = K.dequantize_rows(ftype, w, rows, cols, ids)
    assert np.array_equal(got.view(np.uint32), want[ids].view(np.uint32))


def rx_call(name: str, w: np.ndarray, xq: np.ndarray, rows: int, cols: int, batch: int) -> np.ndarray:
    out = np.empty((batch, rows), np.float32)
    getattr(lib, f"dl_matmul_{name}r_q80")(ptr(out), ffi.cast("void *", w.ctypes.data), ptr(xq, "dl_block_q80"),
                                            rows, cols, batch)
    return out


def rx_repack(name: str, raw: np.ndarray, rows: int, cols: int) -> np.ndarray:
    rp = np.empty(getattr(lib, f"dl_{name}r_bytes")(rows, cols), np.uint8)
    getattr(lib, f"dl_repack_{name}")(ffi.cast("void *", rp.ctypes.data), ffi.cast("void *", raw.ctypes.data), rows, cols)
    return rp


@pytest.mark.parametrize("ftype", sorted(RX_TYPES), ids=[FLOAT_NAMES[t] for t in sorted(RX_TYPES)])
@pytest.mark.parametrize("isa", ALL_ISAS, ids=[K.isa_name(i) for i in ALL_ISAS])
def test_rx_matmul_vs_gguf(ftype, isa):
    """The repacked GGUF blocks times q80 activations: within float rounding of gguf-py's values times
    the dequantized activations (float64), matvec and batched; a row's bits are the same alone as in
    any batch, on 1 and 2 threads; the repacked buffer is exactly the file's bytes (plus padding rows)
    and unpacks back to them."""
    name = RX_TYPES[ftype]
    values, nbytes = TYPE_BLOCK[ftype]
    r = rng(70 + ftype)
    for rows, blocks, batch in ((1, 1, 1), (17, 2, 3), (24, 2, 6), (33, 3, 9), (16, 1, 17)):
        cols = blocks * max(values, 64)
        raw = edge_blocks(r, ftype, rows, cols)
        rp = rx_repack(name, raw, rows, cols)
        assert rp.size == -(-rows // 16) * 16 * raw.shape[1]
        back = np.empty_like(raw)
        getattr(lib, f"dl_unpack_{name}r")(ffi.cast("void *", back.ctypes.data), ffi.cast("void *", rp.ctypes.data),
                                            rows, cols)
        assert np.array_equal(back, raw)
        wf = gguf_dequantize(raw, ftype, rows, cols).astype(np.float64)
        xq = random_q80(r, batch, cols)
        xf = K.dequantize_q80(xq, batch * cols).reshape(batch, cols).astype(np.float64)
        ref = xf @ wf.T
        mag = np.abs(xf) @ np.abs(wf).T + np.abs(xf).sum(1, keepdims=True) * np.abs(wf).max() + 1e-30
        use(isa)
        got = rx_call(name, rp, xq, rows, cols, batch)
        assert np.all(np.abs(got - ref) <= 1e-5 * mag), (rows, cols, batch, float(np.abs(got - ref).max()))
        use(isa, 2)
        assert np.array_equal(rx_call(name, rp, xq, rows, cols, batch), got)
        row = cols // 32 * 34
        for b in range(batch):
            alone = rx_call(name, rp, np.ascontiguousarray(xq[b * row:(b + 1) * row]), rows, cols, 1)
            assert np.array_equal(alone[0], got[b]), (rows, cols, batch, b)


@pytest.mark.parametrize("ftype", sorted(RX_TYPES), ids=[FLOAT_NAMES[t] for t in sorted(RX_TYPES)])
@pytest.mark.parametrize("isa", ALL_ISAS, ids=[K.isa_name(i) for i in ALL_ISAS])
def test_rx_largest_codes_times_largest_activations(ftype, isa):
    """Every code byte at its largest (0xFF) against activations all +127 or all -127: the largest
    integer sums the kernels form (AVX2 adds two maddubs results in 16 bits, NEON four products:
    rx_engine.h) still give gguf-py's values, 1 to 9 batch rows (AVX2: up to 7 in one inline call,
    the tiled path from 8; AVX-512: the tiled path from 9)."""
    name = RX_TYPES[ftype]
    values, nbytes = TYPE_BLOCK[ftype]
    rows, cols = 16, 2 * max(values, 64)
    raw = np.full((rows, cols // values * nbytes), 0xFF, np.uint8)
    blocks = raw.reshape(rows, -1, nbytes)
    for at in K._F16_FIELDS[FLOAT_NAMES[ftype]]:
        blocks[:, :, at:at + 2] = (0x00, 0x3C)     # finite (1.0) scales; every other byte 0xFF
    rp = rx_repack(name, raw, rows, cols)
    wf = gguf_dequantize(raw, ftype, rows, cols).astype(np.float64)
    use(isa)
    for batch in (1, 2, 5, 6, 9):
        xs = np.array([3.0 if b % 2 == 0 else -3.0 for b in range(batch)], np.float32)
        xq = ref_quantize_q80(np.repeat(xs, cols))   # every value +-127, scale 3/127
        xf = K.dequantize_q80(xq, batch * cols).reshape(batch, cols).astype(np.float64)
        got = rx_call(name, rp, xq, rows, cols, batch)
        ref = xf @ wf.T
        mag = np.abs(xf) @ np.abs(wf).T + 1e-30
        assert np.all(np.abs(got - ref) <= 1e-5 * mag), (batch, float(np.abs(got - ref).max()))


@pytest.mark.parametrize("ftype", sorted(RX_TYPES), ids=[FLOAT_NAMES[t] for t in sorted(RX_TYPES)])
@pytest.mark.parametrize("isa", ALL_ISAS, ids=[K.isa_name(i) for i in ALL_ISAS])
def test_rx_matvec_streams_do_not_change_results(ftype, isa):
    """The matvec reads 1-4 groups side by side per thread (dl_rx_split), and 2-4 batch rows read 2
    (AVX-512), with and without software prefetch: the same bits for every split, prefetch and
    thread count, including the groups left over when a thread's share does not divide, and every
    row of 2, 3, 4 or 5 the bits it has alone."""
    name = RX_TYPES[ftype]
    r = rng(90 + ftype)
    rows, cols = 16 * 23 + 7, 2 * max(TYPE_BLOCK[ftype][0], 64)
    rp = rx_repack(name, edge_blocks(r, ftype, rows, cols), rows, cols)
    xq = random_q80(r, 5, cols)
    row = cols // 32 * 34
    try:
        outs = []
        for threads in (1, 2):
            use(isa, threads)
            for s, pf in ((1, 0), (2, 2048), (3, 0), (4, 2048), (4, 0), (2, 96)):
                assert lib.dl_rx_split(s) == s
                assert lib.dl_weights_prefetch(pf) == pf
                alone = np.concatenate([rx_call(name, rp, np.ascontiguousarray(xq[b * row:(b + 1) * row]), rows, cols, 1)
                                        for b in range(5)])
                outs.append(alone)
                for batch in (2, 3, 4, 5, 9):
                    got = rx_call(name, rp, np.ascontiguousarray(xq[:batch * row] if batch <= 5 else np.tile(xq, 2)[:batch * row]),
                                  rows, cols, batch)
                    assert np.array_equal(got[:min(batch, 5)], alone[:min(batch, 5)]), (threads, s, pf, batch)
        assert all(np.array_equal(o, outs[0]) for o in outs)
    finally:
        lib.dl_rx_split(0)          # back to the defaults
        lib.dl_weights_prefetch(-2)
    assert lib.dl_rx_split(-1) in (1, 2, 3, 4)


@pytest.mark.parametrize("isa", ALL_ISAS, ids=[K.isa_name(i) for i in ALL_ISAS])
def test_bf16_matmul(isa):
    r = rng(80)
    rows, cols, batch = 9, 100, 5
    w = K.random_blocks(r, BF16, rows, cols).view(np.uint16).reshape(rows, cols)
    wf = (w.astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    x = r.standard_normal((batch, cols)).astype(np.float32)
    use(isa)
    out = np.empty((batch, rows), np.float32)
    lib.dl_matmul_bf16_f32(ptr(out), ptr(w, "uint16_t"), ptr(x), rows, cols, batch)
    ref = x.astype(np.float64) @ wf.T
    assert np.abs(out - ref).max() <= 1e-5 * np.abs(ref).max()


def test_matmul_table_covers_native_types():
    """Every type a kernel runs has its entry points in the C library; the block types are repacked."""
    from dllama_mpi.kernels import MATMUL

    assert set(MATMUL) == {F32, F16, BF16, Q40, Q80, Q4_1, Q5_0, Q5_1, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, IQ4_NL,
                           IQ4_XS}
    for t, m in MATMUL.items():
        for fn in (m.kernel, m.repack, m.nbytes, m.fused):
            assert fn is None or hasattr(lib, fn), (FLOAT_NAMES[t], fn)
        assert (m.repack is not None) == m.q80_input


@pytest.mark.parametrize("isa", ALL_ISAS, ids=[K.isa_name(i) for i in ALL_ISAS])
def test_sample_summary_and_probabilities(isa):
    """The sampler's exact weights (dl_sample_summary's buckets and records, dl_sample_probs): the
    same bits on every path as on the scalar one, at lengths around the vector widths and chunks,
    with -inf (masked) and very light logits; the probabilities are the softmax."""
    from dllama_mpi.sampler import Sampler, slice_summary

    r = rng(15)
    for n in (1, 7, 9, 255, 257, 1000, 4099):
        x = (r.standard_normal(n) * r.uniform(0.5, 20)).astype(np.float32)
        x[r.random(n) < 0.2] = -np.inf
        x[r.integers(n)] = 3.0
        for t in (0.05, 0.8, 2.0):
            s = Sampler(n, t, 0.9, seed=1)
            use(isa)
            got = (slice_summary(x, s.inv_t, 5, k=40), s._probs(x).copy())
            use(K.ISA_SCALAR)
            assert np.array_equal(got[0], slice_summary(x, s.inv_t, 5, k=40)), (n, t)
            assert np.array_equal(got[1], s._probs(x)), (n, t)
            y = x.astype(np.float64) * np.float64(s.inv_t)
            e = np.exp(y - y.max())
            assert np.allclose(got[1], e / e.sum(), rtol=1e-9, atol=2.0 ** -62), (n, t)


@pytest.mark.parametrize("isa", ALL_ISAS, ids=[K.isa_name(i) for i in ALL_ISAS])
def test_attention_dot_rows_have_dot_bits(isa):
    """The attention's scores: dot_rows (16 rows at a time, their sums reduced together on AVX-512,
    then 4, then 1) gives each row exactly dl_dot's bits (what makes a row's attention independent of
    how its positions are grouped), at head sizes with and without a tail and row counts around 4 and 16."""
    r = rng(16)
    use(isa)
    for hd in (64, 128, 80, 256, 16, 8):
        stride = hd * 3
        for n in (1, 3, 4, 5, 8, 13, 16, 17, 31, 32, 37):
            rows = (r.standard_normal(n * stride) * 3).astype(np.float32)
            q = r.standard_normal(hd).astype(np.float32)
            out = np.zeros(n, np.float32)
            lib.dl_dot_rows(K.fptr(out), K.fptr(q), K.fptr(rows), stride, n, hd)
            one = [lib.dl_dot(K.fptr(q), K.fptr(rows[i * stride:]), hd) for i in range(n)]
            assert np.array_equal(out, np.float32(one)), (hd, n)


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_sample_summaries_of_many_rows_are_each_rows_own(threads):
    """dl_sample_summaries (the engine's sampled rows, shared out over the thread pool): each row's
    record is dl_sample_summary's of that row alone, at its own temperature, whatever the threads."""
    from dllama_mpi.sampler import SAMPLE_LEN, SAMPLE_TOPK, slice_summary

    r = rng(17)
    x = (r.standard_normal((7, 3001)) * 4).astype(np.float32)
    rows = np.array([6, 0, 3, 3, 5], np.int32)
    inv_t = np.float32([1.25, 0.5, 2.0, 1.0, 10.0])
    use(lib.dl_get_isa(), threads)
    out = np.zeros((len(rows), SAMPLE_LEN), np.int64)
    lib.dl_sample_summaries(ffi.cast("int64_t *", out.ctypes.data), SAMPLE_LEN, K.fptr(x), 3001,
                            ffi.cast("int32_t *", rows.ctypes.data), K.fptr(inv_t), len(rows), 3001, 77, SAMPLE_TOPK)
    for i, (row, it) in enumerate(zip(rows, inv_t)):
        assert np.array_equal(out[i], slice_summary(x[row], it, 77)), i


def _argmax_cases():
    """Rows for the argmax: random lengths around the vector widths, ties, NaNs, infinities, zeros."""
    r = rng(23)
    cases = []
    for n in (1, 2, 3, 4, 5, 7, 8, 9, 15, 16, 17, 31, 32, 33, 100, 1000, 4099):
        cases.append(r.standard_normal(n).astype(np.float32))
        x = np.round(r.standard_normal(n) * 2).astype(np.float32)   # ties: the maximum several times
        cases.append(x)
        y = r.standard_normal(n).astype(np.float32)
        y[r.integers(0, n, 1 + n // 50)] = np.nan
        cases.append(y)
        cases.append(np.full(n, -np.inf, np.float32))
        z = np.zeros(n, np.float32)
        z[r.integers(0, n, 1 + n // 3)] = -0.0
        z[r.integers(0, n, 1 + n // 7)] = -1.0
        cases.append(z)
        w = r.standard_normal(n).astype(np.float32)
        w[r.integers(0, n, 2)] = np.inf
        w[-1] = np.float32(w.max())   # the maximum in the tail too
        cases.append(w)
    return cases


@pytest.mark.parametrize("isa", ALL_ISAS, ids=["scalar"] + ISA_IDS)
def test_argmax_is_numpys(isa):
    """dl_argmax_f32 (greedy decoding's argmax) gives np.argmax's index on every path: the first of
    equal maxima, the first NaN where there is one, across vector widths and tails."""
    use(isa)
    for i, x in enumerate(_argmax_cases()):
        assert lib.dl_argmax_f32(K.fptr(x), len(x)) == int(np.argmax(x)), (i, len(x), x[:8])
    assert lib.dl_argmax_f32(K.fptr(np.zeros(1, np.float32)), 0) == -1


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_argmax_rows_are_each_rows_own(threads):
    """dl_argmax_rows (the engine's distributed argmax, rows over the thread pool): per requested row
    its largest value and id0 + np.argmax's index, whatever the threads; an empty slice offers -inf."""
    r = rng(29)
    x = r.standard_normal((7, 3001)).astype(np.float32)
    x[2, 1000] = x[2, 2000] = 9.0   # a tie: the lower index
    rows = np.array([6, 0, 2, 2, 5], np.int32)
    use(lib.dl_get_isa(), threads)
    out = np.zeros((len(rows), 2), np.float64)
    lib.dl_argmax_rows(ffi.cast("double *", out.ctypes.data), K.fptr(x), 3001,
                       ffi.cast("int32_t *", rows.ctypes.data), len(rows), 3001, 500)
    for k, row in enumerate(rows):
        i = int(np.argmax(x[row]))
        assert out[k, 0] == x[row, i] and out[k, 1] == 500 + i, k
    assert out[2, 1] == 1500
    lib.dl_argmax_rows(ffi.cast("double *", out.ctypes.data), K.fptr(x), 3001,
                       ffi.cast("int32_t *", rows.ctypes.data), 2, 0, 500)
    assert np.array_equal(out[:2], [[-np.inf, 500], [-np.inf, 500]])
