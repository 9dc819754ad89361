#!/usr/bin/env bash
# What --as-nodes costs: decode and prefill tok/s at 1 and 2 ranks with --as-nodes 0 (off), 2 and 4,
# the six runs alternating in each of ROUNDS rounds so that a loaded host's drift hits all alike.
#
#   scripts/bench_as_nodes.sh [MODEL]          (default: the default SmolLM2 GGUF)
#   env: ROUNDS=3, BENCH="--synthetic 128 --steps 64 --repeat 3"
# Prints one line per run, then per rank count and setting the median decode / prefill ratio to off.
set -euo pipefail
cd "$(dirname "$0")/.."
model=("${1:+--model}" "${1:-}")
[ -z "${1:-}" ] && model=()
rounds="${ROUNDS:-3}"
read -r -a bench <<< "${BENCH:---synthetic 128 --steps 64 --repeat 3}"
out="$(mktemp)"
trap 'rm -f "$out"' EXIT
for round in $(seq "$rounds"); do
  for n in 1 2; do
    for s in 0 2 4; do
      if [ "$n" = 1 ]; then cmd=(.venv/bin/dllama-mpi); else cmd=(.venv/bin/mpiexec -n "$n" .venv/bin/dllama-mpi); fi
      r=$(timeout 600 "${cmd[@]}" benchmark "${model[@]}" "${bench[@]}" --as-nodes "$s" 2>/dev/null |
          .venv/bin/python -c "import json,sys; d=json.load(sys.stdin)['summary']; print(d['decode_tok_s'], d['prefill_tok_s'])")
      echo "round $round ranks $n as-nodes $s decode/prefill tok/s $r" | tee -a "$out"
    done
  done
done
.venv/bin/python - "$out" <<'PY'
import statistics, sys
runs = {}
for line in open(sys.argv[1]):
    w = line.split()
    runs.setdefault((int(w[3]), int(w[5])), []).append((float(w[8]), float(w[9])))
for n in (1, 2):
    base = runs[(n, 0)]
    for s in (2, 4):
        dec = statistics.median(a[0] / b[0] for a, b in zip(runs[(n, s)], base))
        pre = statistics.median(a[1] / b[1] for a, b in zip(runs[(n, s)], base))
        print(f"ranks {n}, --as-nodes {s}: decode x {dec:.3f}, prefill x {pre:.3f} of --as-nodes 0 (median of {len(base)} rounds)")
PY
