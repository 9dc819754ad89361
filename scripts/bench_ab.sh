#!/usr/bin/env bash
# Decode speed of a git revision against the working tree, side by side: the revision is exported
# (git archive) to a temporary folder and run with this venv's Python (PYTHONPATH), alternating
# A, B, A, B, ... for ROUNDS rounds, so that a loaded host's drift hits both alike.
#
#   scripts/bench_ab.sh REV MODEL.m TOKENIZER.t [-- extra benchmark options]
#   env: ROUNDS=3, RANKS=2 (1 = no mpiexec), NTHREADS=1,
#        BENCH="--synthetic 128 --steps 32 --repeat 2 --warmup 1 --bandwidth 32"
# Prints one line per run and the median decode tok/s of each side with their ratio (B / A).
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
rev="${1:?git revision}"; model="${2:?model .m}"; tok="${3:?tokenizer .t}"; shift 3
[ "${1:-}" = "--" ] && shift
extra=("$@")
rounds="${ROUNDS:-3}"; ranks="${RANKS:-2}"; nthreads="${NTHREADS:-1}"
read -r -a bench <<< "${BENCH:---synthetic 128 --steps 32 --repeat 2 --warmup 1 --bandwidth 32}"
bin="$here/.venv/bin"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
git -C "$here" archive "$rev" | tar -x -C "$tmp"
# the same kernel sources: reuse this tree's compiled module instead of building another
if git -C "$here" diff --quiet "$rev" -- kernels dllama_mpi/_build_kernels.py; then
  cp "$here"/dllama_mpi/_kernels*.so "$tmp/dllama_mpi/" 2>/dev/null || true
fi
# the venv's editable install finds dllama_mpi before PYTHONPATH does: a launcher that drops its finder
cat > "$tmp/ab_main.py" <<'PY'
import os, sys
sys.meta_path[:] = [f for f in sys.meta_path if not type(f).__module__.startswith("__editable__")]
sys.path.insert(0, os.environ["AB_TREE"])
from dllama_mpi.cli import main
sys.argv[0] = "dllama-mpi"
main()
PY
launch=(); [ "$ranks" -gt 1 ] && launch=("$bin/mpiexec" -n "$ranks")
run() {   # side tree
  env AB_TREE="$2" "${launch[@]}" "$bin/python" "$tmp/ab_main.py" benchmark --model "$model" --tokenizer "$tok" \
    --nthreads "$nthreads" "${bench[@]}" "${extra[@]}" 2>/dev/null \
    | "$bin/python" -c "import json,sys; print(json.load(sys.stdin)['summary']['decode_tok_s'])"
}
a=(); b=()
for ((r = 1; r <= rounds; r++)); do
  x="$(run A "$tmp")"; a+=("$x"); echo "round $r  A ($rev): $x tok/s" >&2
  y="$(run B "$here")"; b+=("$y"); echo "round $r  B (working tree): $y tok/s" >&2
done
"$bin/python" - "${a[*]}" "${b[*]}" <<'PY'
import statistics, sys
a = [float(x) for x in sys.argv[1].split()]; b = [float(x) for x in sys.argv[2].split()]
ma, mb = statistics.median(a), statistics.median(b)
print(f"A median {ma:.2f} tok/s, B median {mb:.2f} tok/s, B/A = {mb / ma:.3f}")
PY
