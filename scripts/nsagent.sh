#!/bin/sh
# Fake `ssh` for MPICH hydra (`-launcher ssh -launcher-exec scripts/nsagent.sh`), used by
# scripts/cluster_sim.sh: runs the proxy command inside the network namespace of the simulated host.
#   nsagent.sh [ssh options] 10.77.0.<i+1> CMD...  ->  ip netns exec <prefix>-h<i> (own hostname) CMD
# Hydra passes ssh options such as `-x`; they are dropped. The address -> namespace map is fixed:
# 10.77.0.1 = <prefix>-h0, 10.77.0.2 = <prefix>-h1, ... (<prefix> from $DLLSIM_PREFIX, default dllsim).
while [ $# -gt 0 ]; do
  case "$1" in
    -[bcDEeFIiJLlmOopQRSWw]) shift 2 ;;   # ssh options that take a value
    -*) shift ;;
    *) break ;;
  esac
done
host="${1:?nsagent.sh: no host}"; shift
case "$host" in 10.77.0.*) ;; *) echo "nsagent.sh: unknown host $host" >&2; exit 255 ;; esac
ns="${DLLSIM_PREFIX:-dllsim}-h$(( ${host##*.} - 1 ))"
exec ip netns exec "$ns" unshare --uts sh -c "hostname $ns; $*"
