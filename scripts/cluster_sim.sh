#!/usr/bin/env bash
# Simulated cluster: run `dllama-mpi benchmark` with one rank per Linux network namespace, the
# namespaces joined by veth links through a bridge, optionally rate-limited (tbf), over real TCP.
#
#   scripts/cluster_sim.sh N RATE MODEL.m TOKENIZER.t [OUT_DIR] [-- extra benchmark options]
#     N      ranks = simulated hosts (1-8)
#     RATE   none | <n>kbit | <n>mbit | <n>gbit (e.g. 1gbit, 100mbit): tbf on both directions of
#            every host's link (host eth0 egress + switch port egress), i.e. a full-duplex switch
#   env: TIMEOUT=900 (seconds for the whole mpiexec run, then killed), BURST=4kb (tbf burst),
#        TBF_LATENCY=50ms (tbf queue), MPIEXEC (default: the venv's MPICH mpiexec)
#   e.g. scripts/cluster_sim.sh 2 1gbit bench/llama3.2-1b-q40.m bench/llama3.2-1b.t out -- --sync dllama
#
# Output: OUT_DIR/n<N>-<RATE>-<sync>.json (the benchmark JSON), .log (its stderr), .net.tsv (bytes
# each host's eth0 sent/received during the run, from the kernel counters) and one row appended to
# OUT_DIR/summary.tsv. Prints the JSON path.
#
# Network: namespaces dllsim-sw (bridge br0) and dllsim-h0..h<N-1>, each with a veth `eth0`
# 10.77.0.<i+1>/24 whose peer p<i> is a port of br0. Nothing is added to the root namespace; all is
# deleted on exit (also on error/signal). mpiexec (MPICH hydra) runs inside dllsim-h0 and starts one
# proxy per host through scripts/nsagent.sh (a fake ssh: `ip netns exec dllsim-h<i> ...` with its own
# hostname). UCX is forced onto TCP (UCX_TLS=self,tcp, passed with -genvall): otherwise it sees one
# machine and uses shared memory across the namespaces. tc netem does not exist in this kernel, so
# only bandwidth is shaped, not latency. Needs root. One run at a time (flock).
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
usage() { sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }
[ $# -ge 4 ] || usage
n="$1"; rate="$2"; model="$3"; tok="$4"; shift 4
out="bench/cluster-sim"
if [ $# -gt 0 ] && [ "$1" != "--" ]; then out="$1"; shift; fi
[ "${1:-}" = "--" ] && shift
extra=("$@")
case "$n" in [1-8]) ;; *) echo "cluster_sim.sh: N must be 1-8, got '$n'" >&2; exit 2 ;; esac
case "$rate" in none) ;; [0-9]*[kmg]bit) ;; *) echo "cluster_sim.sh: RATE must be none or like 1gbit/100mbit, got '$rate'" >&2; exit 2 ;; esac
[ "$(id -u)" = 0 ] || { echo "cluster_sim.sh: needs root (ip netns)" >&2; exit 2; }
model="$(realpath "$model")"; tok="$(realpath "$tok")"
bin="$here/.venv/bin"
[ -x "$bin/dllama-mpi" ] || bin="$(dirname "$(command -v dllama-mpi)")"
mpiexec="${MPIEXEC:-$bin/mpiexec}"
agent="$here/scripts/nsagent.sh"
timeout_s="${TIMEOUT:-900}"
burst="${BURST:-4kb}"
tbf_latency="${TBF_LATENCY:-50ms}"
mkdir -p "$out"; out="$(realpath "$out")"

P=dllsim                        # namespace prefix (nsagent.sh maps 10.77.0.<i+1> -> $P-h<i>)
MAXN=8
lockdir=/run/lock; [ -d "$lockdir" ] && [ -w "$lockdir" ] || lockdir=/tmp
exec 9>"$lockdir/dllsim.lock"
flock -w 60 9 || { echo "cluster_sim.sh: another simulation is running (lock)" >&2; exit 1; }

ns_list() { echo "$P-sw"; for ((i = 0; i < MAXN; i++)); do echo "$P-h$i"; done; }
cleanup() {
  local ns pids
  for ns in $(ns_list); do
    [ -e "/run/netns/$ns" ] || continue
    # only processes inside our own namespaces (leftovers of this run, or of a killed earlier one)
    pids="$(ip netns pids "$ns" 2>/dev/null || true)"
    [ -n "$pids" ] && kill -9 $pids 2>/dev/null || true
    ip netns del "$ns" 2>/dev/null || true
  done
  if [ -n "${job:-}" ]; then wait "$job" 2>/dev/null || true; fi   # timeout + tee end with mpiexec
}
cleanup                           # stale namespaces of a killed earlier run (we hold the lock)
trap 'cleanup' EXIT
trap 'exit 130' INT
trap 'exit 143' TERM HUP

# ---- network ----
ip netns add "$P-sw"
ip -n "$P-sw" link set lo up
ip -n "$P-sw" link add br0 type bridge stp_state 0 forward_delay 0
ip -n "$P-sw" link set br0 up
hosts=()
for ((i = 0; i < n; i++)); do
  h="$P-h$i"; a="10.77.0.$((i + 1))"
  ip netns add "$h"
  ip -n "$h" link set lo up
  ip -n "$P-sw" link add "p$i" type veth peer name eth0 netns "$h"
  ip -n "$P-sw" link set "p$i" master br0 up
  ip -n "$h" addr add "$a/24" dev eth0
  ip -n "$h" link set eth0 up
  if [ "$rate" != none ]; then
    ip netns exec "$h" tc qdisc add dev eth0 root tbf rate "$rate" burst "$burst" latency "$tbf_latency"
    ip netns exec "$P-sw" tc qdisc add dev "p$i" root tbf rate "$rate" burst "$burst" latency "$tbf_latency"
  fi
  hosts+=("$a")
done
hostlist="$(IFS=,; echo "${hosts[*]}")"
# wait until every host answers on TCP from h0 (bridge ports come up asynchronously)
ip netns exec "$P-h0" "$bin/python" - "${hosts[@]}" <<'PY'
import socket, sys, time
for a in sys.argv[1:]:
    t0 = time.time()
    while True:
        s = socket.socket(); s.settimeout(0.5)
        try:
            s.connect((a, 9)); break          # discard port: refused = reachable
        except ConnectionRefusedError:
            break
        except OSError:
            if time.time() - t0 > 10: sys.exit(f"cluster_sim.sh: {a} unreachable from h0")
            time.sleep(0.1)
        finally:
            s.close()
PY

net_counters() {   # host  tx_bytes  rx_bytes
  for ((i = 0; i < n; i++)); do
    printf "h%d\t%s\t%s\n" "$i" "$(ip netns exec "$P-h$i" cat /sys/class/net/eth0/statistics/tx_bytes)" \
      "$(ip netns exec "$P-h$i" cat /sys/class/net/eth0/statistics/rx_bytes)"
  done
}

# ---- run ----
tmp="$out/.run-$$"
before="$(net_counters)"
echo "== cluster_sim: N=$n rate=$rate hosts=$hostlist ${extra[*]}" >&2
set +e
# in the background + `wait`, so that a signal runs the traps at once (bash defers them while a
# foreground command runs)
{ timeout -k 10 "$timeout_s" ip netns exec "$P-h0" unshare --uts \
  env UCX_TLS=self,tcp UCX_NET_DEVICES=eth0 DLLSIM_PREFIX="$P" PATH="$bin:$PATH" \
  sh -c 'hostname "$DLLSIM_PREFIX-h0"; exec "$@"' sh \
  "$mpiexec" -launcher ssh -launcher-exec "$agent" -iface eth0 -hosts "$hostlist" -ppn 1 -n "$n" -genvall \
  "$bin/dllama-mpi" benchmark --model "$model" --tokenizer "$tok" "${extra[@]}" \
  2>&1 > "$tmp.json" | tee "$tmp.log" >&2; exit "${PIPESTATUS[0]}"; } &
job=$!
wait "$job"; rc=$?
job=
set -e
after="$(net_counters)"
if [ $rc -ne 0 ]; then
  [ $rc = 124 ] && echo "cluster_sim.sh: timed out after ${timeout_s}s" >&2
  echo "cluster_sim.sh: benchmark failed (exit $rc), log: $tmp.log" >&2
  exit $rc
fi
# stdout may have UCX log lines around the JSON (UCX logs to stdout): move them to the log
sync="$("$bin/python" - "$tmp.json" "$tmp.log" <<'PY'
import json, sys
lines = open(sys.argv[1]).read().splitlines(True)
i = next(k for k, l in enumerate(lines) if l.startswith("{"))
text = "".join(lines[i:])
doc, end = json.JSONDecoder().raw_decode(text)      # UCX may log after the document too
open(sys.argv[2], "a").writelines(lines[:i] + [text[end:].lstrip("\n")])
open(sys.argv[1], "w").write(text[:end] + "\n")
c = doc["config"]
print(c["sync"] + ("" if c.get("pp", 1) == 1 else f"-pp{c['pp']}"))
PY
)"
name="n$n-$rate-$sync"
mv "$tmp.json" "$out/$name.json"; mv "$tmp.log" "$out/$name.log"
paste <(echo "$before") <(echo "$after") | awk -F'\t' 'BEGIN{print "host\ttx_bytes\trx_bytes"} {print $1 "\t" $5-$2 "\t" $6-$3}' > "$out/$name.net.tsv"

[ -s "$out/summary.tsv" ] || printf "nodes\trate\tsync\tpp\tdecode_tok_s\tdecode_ms_per_token\tsync_wait_ms_max\tbytes_sent_per_token_min\tbytes_sent_per_token_max\twire_tx_MB_max\tmessage_rounds_per_token\tone_way_us\tparallel_streams\taggregate_decode_tok_s\tjson\n" > "$out/summary.tsv"
"$bin/python" - "$out/$name.json" "$out/$name.net.tsv" "$rate" >> "$out/summary.tsv" <<'PY'
import json, sys
d = json.load(open(sys.argv[1])); s = d["summary"]; c = d["config"]; pr = d["per_rank"]
wait = max(r["mpi_wait_ms_uninstrumented"] for r in pr)
b = [r["bytes_sent_per_token"] for r in pr]
tx = max(int(l.split("\t")[1]) for l in open(sys.argv[2]).read().splitlines()[1:])
par = d.get("parallel") or [{}]
print(f"{c['nodes']}\t{sys.argv[3]}\t{c['sync']}\t{c.get('pp', 1)}\t{s['decode_tok_s']}\t{s['decode_ms_per_token']}\t{wait:.3f}\t{min(b)}\t{max(b)}\t{tx / 1e6:.1f}\t{s.get('message_rounds_per_token', '-')}\t{s.get('one_way_us', '-')}\t{par[-1].get('streams', '-')}\t{par[-1].get('aggregate_decode_tok_s', '-')}\t{sys.argv[1]}")
PY
tail -n 1 "$out/summary.tsv" >&2
echo "$out/$name.json"
