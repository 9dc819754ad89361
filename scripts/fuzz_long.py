#!/usr/bin/env python3
"""A longer fuzzing run of the properties in tests/test_fuzz.py (hypothesis, many examples).

    .venv/bin/python scripts/fuzz_long.py                 # 5000 examples per property
    .venv/bin/python scripts/fuzz_long.py -n 20000 -k tok # only properties whose name holds "tok"

Prints, per property, how many inputs ran and how long it took; exits 1 at the first property that
fails (hypothesis prints the smallest failing input)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-n", "--examples", type=int, default=5000, help="examples per property (GGUF: a third)")
    ap.add_argument("-k", "--only", default="", help="run properties whose name contains this")
    args = ap.parse_args()

    import test_fuzz

    total, t_all = 0, time.time()
    for name in test_fuzz.PROPERTIES:
        if args.only not in name:
            continue
        n = args.examples // 3 if name.startswith("gguf") else args.examples
        t = time.time()
        try:
            ran = test_fuzz.run_property(name, n)
        except BaseException as e:  # noqa: BLE001  (hypothesis already printed the falsifying case)
            print(f"{name:24s} FAILED: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}", flush=True)
            return 1
        total += ran
        print(f"{name:24s} {ran:7d} inputs  {time.time() - t:7.1f} s", flush=True)
    print(f"{'total':24s} {total:7d} inputs  {time.time() - t_all:7.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
