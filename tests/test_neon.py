"""The C kernel harness (tests/c/kernel_harness.c): every SIMD path against the scalar reference.

- aarch64: cross-compiled (Debian's gcc-aarch64-linux-gnu, static) and run under qemu-aarch64
  (qemu-user): `-cpu max` runs NEON and NEON dotprod, `-cpu cortex-a53` (ARMv8.0, no dotprod)
  runs plain NEON and proves the run-time detection leaves the sdot code alone.
- x86: built natively, AVX2 and AVX-512 (where the CPU has them) against scalar.
scripts/install.sh installs the cross tools (as root with apt); CI has them, so there the tests
fail instead of skipping when they are missing.
"""

from __future__ import annotations

import os
import platform
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

from dllama_mpi import _build_kernels as bk
from dllama_mpi import kernels as K

ROOT = Path(__file__).resolve().parent.parent
HARNESS = ROOT / "tests" / "c" / "kernel_harness.c"
CROSS_CC = "aarch64-linux-gnu-gcc"
QEMU = "qemu-aarch64"


def _need(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(f"{tool} not installed (scripts/install.sh installs it as root with apt)")
        pytest.skip(f"{tool} not installed (apt-get install gcc-aarch64-linux-gnu qemu-user)")
    return path


def _build(cc: str, out: Path, extra: list[str]) -> Path:
    cmd = [cc, *bk.EXTRA_COMPILE_ARGS, *extra, f"-I{bk.KERNEL_DIR}", *bk.kernel_sources(), str(HARNESS),
           "-lm", "-o", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, f"{' '.join(cmd)}\n{r.stderr}"
    return out


def _run(cmd: list[str], env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                          env=None if env is None else {**os.environ, **env})


@pytest.fixture(scope="module")
def arm_harness(tmp_path_factory) -> Path:
    cc = _need(CROSS_CC)
    _need(QEMU)
    return _build(cc, tmp_path_factory.mktemp("neon") / "kernel_harness", ["-static"])


# NEON results equal to the scalar reference bit for bit (integer dots, the scalar float order);
# the others (f32/f16 FMA lanes, rmsnorm, the f32 dots and axpys, attention through them) are within
# the harness's stated tolerance of each entry
NEON_EXACT = {"quantize_q80", "matmul_q40_q80", "matmul_q40r_q80", "q40r_matvec_split", "repack_q40",
              "matmul_q80_q80", "matmul_q80r_q80", "repack_q80", "add", "add_q80", "silu_mul",
              "gelu_mul", "scale", "softmax", "rope", "logit_stats", "argmax_rows", "read_bytes", "read_spans",
              "matmul_q41r_q80", "matmul_q50r_q80", "matmul_q4kr_q80", "matmul_q6kr_q80",
              "matmul_q2kr_q80", "matmul_iq4nlr_q80", "matmul_iq4xsr_q80",
              "matmul_q51r_q80", "matmul_q3kr_q80", "matmul_q5kr_q80",
              "repack_q41", "repack_q50", "repack_q4k", "repack_q6k", "repack_q2k", "repack_iq4nl", "repack_iq4xs",
              "repack_q51", "repack_q3k", "repack_q5k"}


def _kernels(exe: list[str]) -> list[str]:
    r = _run([*exe, "--list"])
    assert r.returncode == 0, r.stderr
    return r.stdout.split()


def _assert_passed(r: subprocess.CompletedProcess, isas: list[str], kernels: list[str]) -> dict:
    """Every kernel passed on every ISA; returns {(kernel, isa): 'bit-identical' | 'within tolerance'}."""
    out = r.stdout
    assert r.returncode == 0 and "PASSED" in out, out[-4000:] + r.stderr[-2000:]
    seen = {}
    for ln in out.splitlines():
        f = ln.split()
        if f and f[0] == "ok":
            seen[(f[1], f[2])] = ln.rsplit(", ", 1)[1]
    missing = [(k, i) for k in kernels for i in isas if (k, i) not in seen]
    assert not missing, missing
    return seen


def test_neon_dotprod_and_neon_vs_scalar_qemu_max(arm_harness):
    kernels = _kernels([QEMU, "-cpu", "max", str(arm_harness)])
    assert {"matmul_q80_q80", "matmul_q80r_q80", "matmul_f16_f32", "matmul_bf16_f32", "gelu_mul", "scale",
            "attention", "rope", "logit_stats"} <= set(kernels) and NEON_EXACT <= set(kernels)
    r = _run([QEMU, "-cpu", "max", str(arm_harness), "--require", "neon,neon-dotprod"])
    seen = _assert_passed(r, ["neon", "neon-dotprod"], kernels)
    for k in kernels:   # bit-identical where the claim is made, and only there
        for isa in ("neon", "neon-dotprod"):
            assert seen[(k, isa)] == ("bit-identical" if k in NEON_EXACT else "within tolerance"), (k, isa)


def test_plain_neon_on_armv8_0_without_dotprod(arm_harness):
    r = _run([QEMU, "-cpu", "cortex-a53", str(arm_harness), "--require", "neon", "--forbid", "neon-dotprod"])
    _assert_passed(r, ["neon"], _kernels([QEMU, "-cpu", "cortex-a53", str(arm_harness)]))
    assert "neon-dotprod" not in r.stdout.splitlines()[0]


def test_dotprod_detection_and_override(arm_harness):
    def isa(cpu: str, env: dict | None = None) -> str:
        r = _run([QEMU, "-cpu", cpu, str(arm_harness), "--print-isa"], env)
        assert r.returncode == 0, r.stderr
        return r.stdout.strip()

    assert isa("cortex-a53") == "neon"           # Raspberry Pi 3: ARMv8.0
    assert isa("cortex-a72") == "neon"           # Raspberry Pi 4
    assert isa("cortex-a76") == "neon-dotprod"   # Raspberry Pi 5: ARMv8.2 + dotprod
    assert isa("max") == "neon-dotprod"
    assert isa("max", {"DLLAMA_ISA": "neon"}) == "neon"
    assert isa("max", {"DLLAMA_ISA": "scalar"}) == "scalar"
    assert isa("cortex-a53", {"DLLAMA_ISA": "neon-dotprod"}) == "neon"   # unsupported: ignored


def test_sdot_code_traps_on_a_cpu_without_it(arm_harness):
    """What makes the cortex-a53 run meaningful: qemu rejects sdot there, so plain-NEON paths that
    passed contain none, and the same binary needs the run-time check."""
    r = _run([QEMU, "-cpu", "cortex-a53", str(arm_harness), "--force-isa", "neon-dotprod"])
    assert r.returncode in (-signal.SIGILL, 128 + signal.SIGILL), (r.returncode, r.stdout, r.stderr)
    r = _run([QEMU, "-cpu", "cortex-a53", str(arm_harness), "--force-isa", "neon"])
    assert r.returncode == 0 and "ran neon" in r.stdout, r.stderr


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86 host build")
def test_x86_native_harness(tmp_path):
    cc = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    assert cc, "no C compiler"
    exe = _build(cc, tmp_path / "kernel_harness", [])
    want = [K.isa_name(i) for i in (K.ISA_AVX2, K.ISA_AVX512) if K.isa_supported(i)]
    r = _run([str(exe), "--require", ",".join(["scalar", *want])])
    _assert_passed(r, want, _kernels([str(exe)]))
