#!/usr/bin/env bash
# A slow rank (PERFORMANCE.md "A slow rank"): 2 ranks on this machine, rank 1 limited to PCT % of a
# core by a cgroup-v1 CPU quota (it joins the group in an MPMD wrapper before it execs); decode of
# `--split` settings against the fast rank alone, alternating, ROUNDS rounds. Needs root.
#
#   scripts/slow_rank.sh MODEL.m TOKENIZER.t [OUT_DIR] [-- extra benchmark options]
#   env: PCT=40, PERIOD_US=10000, ROUNDS=3, SPLITS="even auto", PPS="1" (--pp of each 2-rank run),
#        BENCH="--synthetic 128 --steps 32 --repeat 2 --warmup 1 --bandwidth 32"
# Output: OUT_DIR/<setting>-r<round>.json (benchmark JSON) and .log, OUT_DIR/summary.tsv (one row per
# run), then the medians per setting and their ratios to `even` and to the fast rank alone.
set -euo pipefail
. "$(dirname "$0")/bench_args.sh"
parse_bench_args slow-rank "--synthetic 128 --steps 32 --repeat 2 --warmup 1 --bandwidth 32" "$@"
pct="${PCT:-40}"; period="${PERIOD_US:-10000}"; rounds="${ROUNDS:-3}"
splits="${SPLITS:-even auto}"; pps="${PPS:-1}"
bin="$here/.venv/bin"
[ -x "$bin/dllama-mpi" ] || bin="$(dirname "$(command -v dllama-mpi)")"
[ "$(id -u)" = 0 ] || { echo "slow_rank.sh: needs root (cgroup)" >&2; exit 2; }
cgroot=/sys/fs/cgroup/cpu
[ -w "$cgroot/cgroup.procs" ] || { echo "slow_rank.sh: no writable cgroup-v1 cpu controller at $cgroot" >&2; exit 2; }
cg="$cgroot/dllama-slow-$$"
mkdir "$cg"
cleanup() { [ -d "$cg" ] && { while read -r p; do echo "$p" > "$cgroot/cgroup.procs" 2>/dev/null || true; done < "$cg/cgroup.procs"; rmdir "$cg" 2>/dev/null || true; }; }
trap cleanup EXIT
echo "$period" > "$cg/cpu.cfs_period_us"
echo $(( period * pct / 100 )) > "$cg/cpu.cfs_quota_us"
mkdir -p "$out"
args=(--model "$model" --tokenizer "$tok" --nthreads 1 --sync auto "${bench[@]}" "${extra[@]}")
slow=(sh -c 'echo $$ > "$0/cgroup.procs" && exec "$@"' "$cg")
printf "setting\tround\tdecode_tok_s\tms_per_token\trank0_mpi_wait_ms\trank1_mpi_wait_ms\n" > "$out/summary.tsv"
row() {   # setting round json
  "$bin/python" - "$@" >> "$out/summary.tsv" <<'PY'
import json, sys
d = json.load(open(sys.argv[3])); s = d["summary"]; pr = d["per_rank"]
w = [f"{r['mpi_wait_ms']:.1f}" for r in pr] + ["-"] * (2 - len(pr))
print(f"{sys.argv[1]}\t{sys.argv[2]}\t{s['decode_tok_s']}\t{s['decode_ms_per_token']}\t{w[0]}\t{w[1]}")
PY
}
for ((r = 1; r <= rounds; r++)); do
  echo "== round $r: fast rank alone" >&2
  "$bin/dllama-mpi" benchmark "${args[@]}" > "$out/alone-r$r.json" 2> "$out/alone-r$r.log"
  row alone "$r" "$out/alone-r$r.json"
  for pp in $pps; do
    for sp in $splits; do
      name="pp$pp-$sp"
      echo "== round $r: 2 ranks, rank 1 at $pct % of a core, --pp $pp --split $sp" >&2
      "$bin/mpiexec" -n 1 "$bin/dllama-mpi" benchmark "${args[@]}" --pp "$pp" --split "$sp" : \
        -n 1 "${slow[@]}" "$bin/dllama-mpi" benchmark "${args[@]}" --pp "$pp" --split "$sp" \
        > "$out/$name-r$r.json" 2> "$out/$name-r$r.log"
      row "$name" "$r" "$out/$name-r$r.json"
    done
  done
done
column -t "$out/summary.tsv" >&2 || cat "$out/summary.tsv" >&2
"$bin/python" - "$out/summary.tsv" <<'PY' >&2
import statistics, sys
rows = [l.rstrip("\n").split("\t") for l in open(sys.argv[1])][1:]
med = {}
for s in dict.fromkeys(r[0] for r in rows):
    med[s] = statistics.median(float(r[2]) for r in rows if r[0] == s)
base = next((v for k, v in med.items() if k.endswith("-even")), None)
for s, v in med.items():
    print(f"{s:>12}: {v:6.2f} tok/s" + (f"  x{v / base:.2f} of even" if base else "") + f"  x{v / med['alone']:.2f} of the fast rank alone")
PY
echo "$out"
