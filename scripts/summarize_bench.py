"""Median over several benchmark JSON files per configuration: python scripts/summarize_bench.py FILES..."""
import json
import statistics
import sys
from collections import defaultdict

groups = defaultdict(list)
for f in sys.argv[1:]:
    d = json.load(open(f))
    c = d["config"]
    groups[(c["nodes"], c["nthreads"], c["repack"], c["batch"])].append(d)
print(f"{'N x T':>6} {'repack':>6} {'batch':>5} {'runs':>4} {'decode tok/s':>13} {'(min-max)':>13} {'prefill':>8} "
      f"{'% ceil':>6} {'py %':>5} {'MPI ms':>6}")
for (n, t, rp, b), ds in sorted(groups.items()):
    dec = [d["summary"]["decode_tok_s"] for d in ds]
    pre = [d["summary"]["prefill_tok_s"] for d in ds]
    pct = [d["summary"]["pct_of_bandwidth_ceiling"] or 0 for d in ds]
    py = [d["summary"]["python_pct_max"] for d in ds]
    mpi = [max(r["mpi_wait_ms"] for r in d["per_rank"]) for d in ds]
    print(f"{n:>2} x {t:<2} {str(rp):>6} {b:>5} {len(ds):>4} {statistics.median(dec):>13.2f} "
          f"{min(dec):>6.1f}-{max(dec):<6.1f} {statistics.median(pre):>8.1f} {statistics.median(pct):>6.1f} "
          f"{statistics.median(py):>5.1f} {statistics.median(mpi):>6.2f}")
