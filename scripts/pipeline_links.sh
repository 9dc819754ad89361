#!/usr/bin/env bash
# Pipeline stages against tensor parallelism over slow links: scripts/cluster_sim.sh (one rank per
# network namespace, real TCP, tbf rate limit) for each --pp setting, ROUNDS rounds alternating;
# single-stream decode ms/token and the aggregate decode tok/s of STREAMS concurrent sequences.
# This kernel has no netem, so latency is not added: each run reports the message rounds on a
# decode token's critical path and the measured one-way time of a link, and the table derives the
# figures at LATENCY_MS one-way latency (measured + rounds x (latency - measured one-way)). Needs root.
#
#   scripts/pipeline_links.sh MODEL.m TOKENIZER.t [OUT_DIR] [-- extra benchmark options]
#   env: N=4, RATE=100mbit, SETTINGS="1:ring 1:dllama 2:auto 4:auto" (--pp:--sync), ROUNDS=2, STREAMS=8, LATENCY_MS=5,
#        BENCH="--synthetic 32 --steps 16 --repeat 1 --warmup 1 --bandwidth 32 --nthreads 1 --load local"
set -euo pipefail
n="${N:-4}"; rate="${RATE:-100mbit}"; settings="${SETTINGS:-1:ring 1:dllama 2:auto 4:auto}"
rounds="${ROUNDS:-2}"; streams="${STREAMS:-8}"
. "$(dirname "$0")/bench_args.sh"
parse_bench_args pipeline-links "--synthetic 32 --steps 16 --repeat 1 --warmup 1 --bandwidth 32 --nthreads 1 --load local" "$@"
mkdir -p "$out"
for ((r = 1; r <= rounds; r++)); do
  for setting in $settings; do
    pp="${setting%%:*}"; sync="${setting#*:}"
    echo "== round $r: $n ranks, $rate, --pp $pp --sync $sync" >&2
    "$here/scripts/cluster_sim.sh" "$n" "$rate" "$model" "$tok" "$out/r$r" -- "${bench[@]}" --pp "$pp" --sync "$sync" \
      --parallel "$streams" "${extra[@]}" > /dev/null
  done
done
"$here/.venv/bin/python" - "$out" "${LATENCY_MS:-5}" <<'PY'
import glob, json, statistics, sys
out, lat_ms = sys.argv[1], float(sys.argv[2])
runs = {}
for f in sorted(glob.glob(f"{out}/r*/n*.json")):
    d = json.load(open(f))
    runs.setdefault((d["config"]["pp"], d["config"]["sync"]), []).append(d)
print(f"| --pp | sync | stages x ranks | single stream ms/token | {runs and next(iter(runs.values()))[0]['parallel'][-1]['streams']} streams aggregate tok/s "
      f"| rounds/token | one-way us | derived at {lat_ms:g} ms: single ms/token | aggregate tok/s | rank CPU/wall (streams run) |")
print("|---|---|---|---|---|---|---|---|---|---|")
for (pp, sync), ds in sorted(runs.items()):
    med = lambda xs: statistics.median(xs)
    ms = med([d["summary"]["decode_ms_per_token"] for d in ds])
    par = [d["parallel"][-1] for d in ds]
    agg = med([p["aggregate_decode_tok_s"] for p in par])
    P = par[0]["streams"]
    rounds = ds[0]["summary"]["message_rounds_per_token"]
    ow = med([d["summary"]["one_way_us"] for d in ds])
    delta = rounds * (lat_ms * 1000 - ow) / 1000          # ms added per pass at the derived latency
    sizes = "/".join(str(len(s["ranks"])) for s in ds[0]["stages"])
    cpu = " ".join(f"{med([p['per_rank'][k]['cpu_per_wall'] for p in par]):.2f}" for k in range(len(par[0]["per_rank"])))
    print(f"| {pp} | {sync} | {len(ds[0]['stages'])} x {sizes} | {ms:.1f} | {agg:.2f} | {rounds} | {ow:.0f} | "
          f"{ms + delta:.1f} | {P / (P / agg + delta / 1000):.2f} | {cpu} |")
PY
echo "$out" >&2
