"""cffi builder of the C kernels (kernels/*.c) as the extension module `dllama_mpi._kernels`.

Used by setup.py (`cffi_modules=["dllama_mpi/_build_kernels.py:ffibuilder"]`) at install time and by
dllama_mpi/kernels.py to rebuild into a cache directory when the installed module is missing or
stale. `python -m dllama_mpi._build_kernels` builds in place next to the sources (not `python
dllama_mpi/_build_kernels.py`: that puts dllama_mpi/ first on sys.path, where tokenize.py hides the
standard library's).

Flags: plain -O3 (no -march=native: the SIMD paths carry their own target attributes and are picked
at run time), no -ffast-math (IEEE numerics), -ffp-contract=off (no silent FMA contraction, so the
scalar reference reproduces numpy's float32 arithmetic bit for bit).
"""

from __future__ import annotations

import hashlib
import os
import re
import sys

from cffi import FFI

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KERNEL_DIR = os.path.join(ROOT, "kernels")
HEADER = os.path.join(KERNEL_DIR, "dllama.h")
MODULE_NAME = "dllama_mpi._kernels"

EXTRA_COMPILE_ARGS = ["-O3", "-std=c11", "-pthread", "-fno-math-errno", "-ffp-contract=off",
                      "-fno-strict-aliasing", "-Wall", "-Wno-unused-function"]
EXTRA_LINK_ARGS = ["-pthread"]


def kernel_sources() -> list[str]:
    return sorted(os.path.join(KERNEL_DIR, f) for f in os.listdir(KERNEL_DIR) if f.endswith(".c"))


def kernel_files() -> list[str]:
    return sorted(os.path.join(KERNEL_DIR, f) for f in os.listdir(KERNEL_DIR)
                  if f.endswith((".c", ".h")))


def source_hash() -> str:
    """Hash of everything that goes into the extension, plus the Python version and platform."""
    h = hashlib.sha256()
    for path in kernel_files() + [os.path.abspath(__file__)]:
        h.update(os.path.basename(path).encode())
        with open(path, "rb") as f:
            h.update(f.read())
    h.update(repr((sys.implementation.name, sys.version_info[:2], sys.platform,
                   os.uname().machine if hasattr(os, "uname") else "")).encode())
    return h.hexdigest()[:16]


def cdef_from_header(path: str = HEADER) -> str:
    """The header's declarations, with the preprocessor lines cffi cannot read removed
    (`#define NAME <integer>` is kept: cffi turns it into a constant)."""
    out = []
    with open(path) as f:
        for line in f:
            s = line.strip()
            if s.startswith("#"):
                if re.match(r"#\s*define\s+\w+\s+-?\d+\s*$", s):
                    out.append(s)
                continue
            out.append(line.rstrip("\n"))
    return "\n".join(out)


def build_into(dest_dir: str, verbose: bool = False) -> str:
    """Compiles the extension in a temporary directory and copies the module file into dest_dir
    (dest_dir/_kernels<suffix>); returns that path."""
    import shutil
    import tempfile

    with tempfile.TemporaryDirectory(prefix="dllama-kernels-") as tmp:
        built = make_builder().compile(tmpdir=tmp, verbose=verbose)
        os.makedirs(dest_dir, exist_ok=True)
        dst = os.path.join(dest_dir, os.path.basename(built))
        part = dst + f".part{os.getpid()}"
        shutil.copyfile(built, part)
        os.replace(part, dst)
    return dst


def make_builder(relative: bool = False) -> FFI:
    """relative=True for setup.py: setuptools refuses absolute source paths (it runs from ROOT);
    the cache build (build_into) compiles in a temporary folder and needs absolute ones."""

    def paths(ps):
        return [os.path.relpath(p, ROOT) for p in ps] if relative else ps

    ffi = FFI()
    ffi.cdef(cdef_from_header())
    ffi.cdef("const char *dl_kernels_build_hash(void);")
    h = source_hash()
    ffi.set_source(
        MODULE_NAME,
        '#include "dllama.h"\n'
        f'static const char *dl_kernels_build_hash(void) {{ return "{h}"; }}\n',
        sources=paths(kernel_sources()),
        include_dirs=paths([KERNEL_DIR]),
        extra_compile_args=EXTRA_COMPILE_ARGS,
        extra_link_args=EXTRA_LINK_ARGS,
        libraries=["m"],
        depends=paths(kernel_files()),
    )
    return ffi


ffibuilder = make_builder(relative=os.path.realpath(os.getcwd()) == os.path.realpath(ROOT))

if __name__ == "__main__":
    # in-place build: writes dllama_mpi/_kernels*.so next to this file
    print(build_into(os.path.join(ROOT, "dllama_mpi"), verbose="-v" in sys.argv))
