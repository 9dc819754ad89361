"""Summary of a scripts/bench_llamacpp.sh run: python scripts/summarize_llamacpp.py OUT_DIR

Medians per configuration over the rounds (llama-bench: the median of each run's samples first) and
the fastest round of each (on a shared host other load only ever slows a run down),
the ratios of dllama-mpi to llama.cpp (repacking on) on the same number of cores, and both
engines' share of the bandwidth roofline: weight bytes per token / the read bandwidth that
dllama-mpi's benchmark measured (or was given) for that configuration in the same run; llama.cpp's
share uses the ceiling of dllama-mpi's run on as many cores on one rank (same model bytes).
"""

from __future__ import annotations

import glob
import json
import os
import statistics as st
import sys

med = st.median


def _load(path: str):
    """A result file, or None (with a note) when it is unfinished or broken (a round in progress)."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        print(f"note: skipped {os.path.basename(path)} (unreadable or unfinished)", file=sys.stderr)
        return None


def main(out: str) -> None:
    rows: dict[str, dict] = {}
    for f in sorted(glob.glob(os.path.join(out, "lcp_repack*_r*.json"))):
        rp = "repack" if "repack1" in f else "no repack"
        for t in _load(f) or []:
            kind = "pp" if t["n_prompt"] > 0 else "tg"
            d = rows.setdefault(f"llama.cpp t={t['n_threads']} ({rp})", {"pp": [], "tg": [], "cores": t["n_threads"]})
            d[kind].append(med(t["samples_ts"]))
    ceil, isa = {}, set()
    for cfg, lab, cores in (("1x1", "dllama-mpi 1 rank x 1 thr", 1), ("1x2", "dllama-mpi 1 rank x 2 thr", 2),
                            ("2x1", "dllama-mpi 2 ranks x 1 thr", 2)):
        for f in sorted(glob.glob(os.path.join(out, f"dl_{cfg}_r*.json"))):
            doc = _load(f)
            if doc is None:
                continue
            s = doc["summary"]
            d = rows.setdefault(lab, {"pp": [], "tg": [], "pct": [], "ceil": [], "bw": [], "cores": cores})
            d["pp"].append(s["prefill_tok_s"])
            d["tg"].append(s["decode_tok_s"])
            d["pct"].append(s["pct_of_bandwidth_ceiling"] or 0.0)
            d["ceil"].append(s["ceiling_tok_s"])
            d["bw"].append(doc["system"]["bandwidth_gbps"])
            isa.add(doc["system"]["cpu"]["kernel_isa"])
        if cfg != "2x1" and lab in rows and rows[lab]["ceil"]:
            ceil[cores] = med(rows[lab]["ceil"])
    m = {k: (med(v["pp"]), med(v["tg"])) for k, v in rows.items() if v["pp"] and v["tg"]}
    ref = {c: m.get(f"llama.cpp t={c} (repack)") for c in (1, 2)}
    print(f"dllama-mpi kernel ISA: {', '.join(sorted(isa)) or '?'}")
    best = {k: (max(v["pp"]), max(v["tg"])) for k, v in rows.items() if v["pp"] and v["tg"]}
    bref = {c: best.get(f"llama.cpp t={c} (repack)") for c in (1, 2)}
    print("| config | pp128 tok/s | tg32 tok/s | pp / llama.cpp | tg / llama.cpp | % of roofline (GB/s) | best round pp / tg (ratios) | tg per round |")
    print("|---|---:|---:|---:|---:|---:|---|---|")
    for k, (pp, tg) in m.items():
        v = rows[k]
        r = ref.get(v["cores"])
        rat = f"{pp / r[0]:.2f} | {tg / r[1]:.2f}" if (r and k.startswith("dllama")) else " | "
        if "pct" in v:
            roof = f"{med(v['pct']):.0f} % ({med(v['bw']):.1f})"
        elif v["cores"] in ceil:
            roof = f"{100 * tg / ceil[v['cores']]:.0f} %"
        else:
            roof = ""
        runs = ", ".join(f"{x:.2f}" for x in v["tg"])
        bp, bt = best[k]
        br = bref.get(v["cores"])
        bs = f"{bp:.1f} / {bt:.2f}" + (f" ({bp / br[0]:.2f} / {bt / br[1]:.2f})" if br and k.startswith("dllama") else "")
        print(f"| {k} | {pp:.2f} | {tg:.2f} | {rat} | {roof} | {bs} | {runs} |")
    print("\nmedians over rounds; ratios: dllama-mpi vs llama.cpp (repack on) on the same number of cores; "
          "roofline: weight bytes per token / measured read bandwidth (llama.cpp: against dllama-mpi's 1-rank "
          "ceiling on as many cores); best round: the fastest round of each (other load only slows a run down)")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: summarize_llamacpp.py OUT_DIR")
    main(sys.argv[1])
