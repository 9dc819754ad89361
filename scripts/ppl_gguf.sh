#!/usr/bin/env bash
# Quality of GGUF files run as they are: dllama-mpi's perplexity next to llama.cpp's llama-perplexity
# on the same file and text, and the KL divergence between the two engines' token distributions
# (llama.cpp's saved log-probabilities as the base, read by `perplexity --kl-divergence`).
# (scripts/BENCHMARKS.md "GGUF models".)
#
#   LCP_BIN=/path/to/llama.cpp/bin scripts/ppl_gguf.sh OUT_DIR GGUF [GGUF ...]
#
# TEXT (tests/data/text/kjv_genesis_1-6.txt), CTX (512), CHUNKS (all; llama.cpp's KL file stores
# vocab x 2 bytes per scored token, so cap it for big vocabularies), BYTES (the text's first N bytes:
# the random-weight models' perplexity is large and slow to converge, 8000 keeps them short),
# NP (2: MPI ranks for dllama-mpi; llama.cpp uses 2 threads). LCP_ONLY=1 runs llama.cpp's side
# alone; LCP_REUSE=1 then takes its outputs already in OUT_DIR (so the two sides can run apart).
# KLD_ONLY=1: our perplexity from the KL-divergence run alone (its PPL(Q) scores the same tokens of
# the same chunks), half the time on big models.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
out="${1:?OUT_DIR}"; shift
[ $# -gt 0 ] || { echo "usage: $0 OUT_DIR GGUF [GGUF ...]" >&2; exit 2; }
lcp="${LCP_BIN:?LCP_BIN: a folder with llama-perplexity (scripts/bench_llamacpp.sh builds it)}"
bin="$here/.venv/bin"
text="${TEXT:-$here/tests/data/text/kjv_genesis_1-6.txt}"
mkdir -p "$out"
if [ -n "${BYTES:-}" ]; then head -c "$BYTES" "$text" > "$out/text.txt"; text="$out/text.txt"; fi
chunks=(); [ -n "${CHUNKS:-}" ] && chunks=(--chunks "$CHUNKS")
echo "# $(date -Is) $(uname -n) text=$text ctx=${CTX:-512} chunks=${CHUNKS:-all}" >> "$out/env.txt"
for g in "$@"; do
    n=$(basename "$g" .gguf)
    if [ -z "${LCP_REUSE:-}" ] || [ ! -s "$out/$n.lcp.kld" ]; then
        "$lcp/llama-perplexity" -m "$g" -f "$text" -c "${CTX:-512}" -t 2 "${chunks[@]}" \
            --kl-divergence-base "$out/$n.lcp.kld" > "$out/$n.lcp.txt" 2>&1
    fi
    [ -n "${LCP_ONLY:-}" ] && continue
    if [ -z "${KLD_ONLY:-}" ]; then
        "$bin/mpiexec" -n "${NP:-2}" "$bin/dllama-mpi" perplexity --model "$g" --file "$text" --ctx "${CTX:-512}" \
            "${chunks[@]}" --nthreads 1 --json > "$out/$n.ours.json"
    fi
    "$bin/mpiexec" -n "${NP:-2}" "$bin/dllama-mpi" perplexity --model "$g" --nthreads 1 --kl-divergence \
        --kl-divergence-base "$out/$n.lcp.kld" "${chunks[@]}" --json > "$out/$n.kld.json"
    rm -f "$out/$n.lcp.kld"
done
[ -n "${LCP_ONLY:-}" ] && exit 0
"$bin/python" - "$out" "$@" <<'PY' | tee "$out/summary.md"
import json, os, re, sys

out, files = sys.argv[1], sys.argv[2:]
print("| model | llama.cpp PPL | dllama-mpi PPL | difference | mean KLD to llama.cpp | same top token |")
print("|---|---|---|---|---|---|")
for g in files:
    n = os.path.basename(g)[:-5]
    lcp = re.search(r"Final estimate: PPL = ([0-9.]+) \+/- ([0-9.]+)", open(f"{out}/{n}.lcp.txt").read())
    kld = json.load(open(f"{out}/{n}.kld.json"))
    ours = json.load(open(f"{out}/{n}.ours.json")) if os.path.exists(f"{out}/{n}.ours.json") else kld
    lp, op = float(lcp.group(1)), ours["ppl"]
    print(f"| {n} | {lp:.4f} ± {float(lcp.group(2)):.4f} | {op:.4f} ± {ours['ppl_unc']:.4f} | "
          f"{100 * (op / lp - 1):+.2f} % | {kld['kld']:.6f} | {100 * kld['same_top']:.2f} % |")
PY
