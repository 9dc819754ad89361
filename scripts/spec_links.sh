#!/usr/bin/env bash
# Speculative decoding over slow links: scripts/cluster_sim.sh (one rank per network namespace, real
# TCP, tbf rate limit) for each --spec setting, ROUNDS rounds alternating, on a prompts file
# (scripts/bench_spec.sh writes grounded.jsonl and open.jsonl). As pipeline_links.sh: this kernel has
# no netem, so each run reports the message rounds on a decode pass's critical path, its tokens per
# pass and a link's measured one-way time, and the table derives ms/token at LATENCY_MS one-way
# latency: measured + (rounds per pass / tokens per pass) x (latency - measured one-way). Needs root.
#
#   scripts/spec_links.sh MODEL TOKENIZER PROMPTS.jsonl [OUT_DIR] [-- extra benchmark options]
#   env: N=4, RATE=100mbit, DRAFT (a draft model: adds the draft settings), ROUNDS=2, LATENCY_MS=5,
#        SETTINGS ("none ngram" + "draft" with DRAFT; SPEC:ARGS adds comma-separated options to that
#        setting's runs, e.g. draft:--draft-p-min=0,--draft-max=16),
#        BENCH="--steps 32 --repeat 1 --warmup 1 --bandwidth 32 --nthreads 1 --load local --wait poll"
set -euo pipefail
prompts_file="${3:?prompts .jsonl}"
set -- "$1" "$2" "${@:4}"
n="${N:-4}"; rate="${RATE:-100mbit}"; rounds="${ROUNDS:-2}"
settings="${SETTINGS:-none ngram${DRAFT:+ draft}}"
. "$(dirname "$0")/bench_args.sh"
parse_bench_args spec-links "--steps 32 --repeat 1 --warmup 1 --bandwidth 32 --nthreads 1 --load local --wait poll" "$@"
prompts_file="$(realpath "$prompts_file")"
mkdir -p "$out"
for ((r = 1; r <= rounds; r++)); do
  for setting in $settings; do
    spec="${setting%%:*}"; args=(); [ "$setting" != "$spec" ] && IFS=, read -r -a args <<< "${setting#*:}"
    [ "$spec" = draft ] && args=(--draft-model "${DRAFT:?DRAFT: a draft model file}" "${args[@]}")
    echo "== round $r: $n ranks, $rate, --spec $spec ${args[*]}" >&2
    "$here/scripts/cluster_sim.sh" "$n" "$rate" "$model" "$tok" "$out/r$r-$(echo "$setting" | tr -c 'a-z0-9.\n' _)" -- \
      "${bench[@]}" --prompts "$prompts_file" --spec "$spec" "${args[@]}" "${extra[@]}" > /dev/null
  done
done
"$here/.venv/bin/python" - "$out" "${LATENCY_MS:-5}" <<'PY'
import glob, json, os, statistics, sys
out, lat_ms = sys.argv[1], float(sys.argv[2])
runs = {}
for f in sorted(glob.glob(f"{out}/r*/n*.json")):
    setting = os.path.basename(os.path.dirname(f)).split("-", 1)[1]
    runs.setdefault(setting, []).append(json.load(open(f)))
med = statistics.median
print(f"| --spec | ms/token (rounds) | tokens per pass | accepted | rounds per pass | one-way us | "
      f"derived at {lat_ms:g} ms: ms/token | x none |")
print("|---|---|---|---|---|---|---|---|")
derived = {}
for setting, ds in runs.items():
    ms = [d["summary"]["decode_ms_per_token"] for d in ds]
    tpp = med([d["summary"]["tokens_per_pass"] for d in ds])
    acc = med([statistics.mean(r.get("acceptance") or 0 for r in d["runs"]) for d in ds])
    rpp = ds[0]["summary"]["message_rounds_per_pass"]
    ow = med([d["summary"]["one_way_us"] for d in ds])
    derived[setting] = med([d["summary"]["decode_ms_per_token"] + d["summary"]["message_rounds_per_token"]
                            * (lat_ms * 1000 - d["summary"]["one_way_us"]) / 1000 for d in ds])
    runs[setting] = (med(ms), ms, tpp, acc, rpp, ow)
for setting, (m, ms, tpp, acc, rpp, ow) in runs.items():
    base = derived.get("none")
    print(f"| {setting} | {m:.1f} ({', '.join(f'{x:.1f}' for x in ms)}) | {tpp:.2f} | {100 * acc:.0f} % | {rpp} | "
          f"{ow:.0f} | {derived[setting]:.1f} | " + (f"{base / derived[setting]:.2f}x" if base else "") + " |")
PY
echo "$out" >&2
