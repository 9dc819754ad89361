#!/usr/bin/env bash
# Run `dllama-mpi benchmark` for N = 1, 2, 4, ... ranks and collect one JSON per run, then a chart.
#
#   scripts/scaling_sweep.sh MODEL.m TOKENIZER.t [OUT_DIR] [-- extra benchmark options]
#   env: NODES="1 2 4 8" (default "1 2 4"), NTHREADS=1, MPIEXEC="mpiexec" (add e.g. "--hostfile h"),
#        OVERSUBSCRIBE=1 to allow more ranks than cores (MPICH: nothing needed; Open MPI: --oversubscribe)
# Output: OUT_DIR/n<N>.json, OUT_DIR/summary.tsv, OUT_DIR/scaling.png (when matplotlib is present).
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
model="${1:?model .m}"; tok="${2:?tokenizer .t}"; out="${3:-bench/sweep-$(date +%Y%m%d-%H%M%S)}"
shift $(( $# >= 3 ? 3 : $# ))
[ "${1:-}" = "--" ] && shift
extra=("$@")
nodes="${NODES:-1 2 4}"
nthreads="${NTHREADS:-1}"
bin="$here/.venv/bin"
[ -x "$bin/dllama-mpi" ] || bin="$(dirname "$(command -v dllama-mpi)")"
mpiexec="${MPIEXEC:-$bin/mpiexec}"
over=()
if [ "${OVERSUBSCRIBE:-0}" = 1 ] && "$mpiexec" --version 2>&1 | grep -qi "open mpi"; then over=(--oversubscribe); fi
mkdir -p "$out"
printf "nodes\tthreads\tdecode_tok_s\tprefill_tok_s\tpct_ceiling\tkB_sent_per_token_max\tpython_pct_max\n" > "$out/summary.tsv"
files=()
for n in $nodes; do
  echo "== N=$n x $nthreads thread(s)" >&2
  f="$out/n$n.json"
  $mpiexec "${over[@]}" -n "$n" "$bin/dllama-mpi" benchmark --model "$model" --tokenizer "$tok" \
      --nthreads "$nthreads" "${extra[@]}" > "$f"
  files+=("$f")
  "$bin/python" - "$f" >> "$out/summary.tsv" <<'PY'
import json, sys
d = json.load(open(sys.argv[1])); s = d["summary"]; c = d["config"]
kb = max(r["bytes_sent_per_token"] for r in d["per_rank"]) / 1e3
print(f"{c['nodes']}\t{c['nthreads']}\t{s['decode_tok_s']}\t{s['prefill_tok_s']}\t{s['pct_of_bandwidth_ceiling']}\t{kb:.1f}\t{s['python_pct_max']}")
PY
done
column -t "$out/summary.tsv" >&2 || cat "$out/summary.tsv" >&2
"$bin/dllama-mpi" benchmark --plot "$out/scaling.png" "${files[@]}" || echo "(no chart: matplotlib missing?)" >&2
echo "$out"
