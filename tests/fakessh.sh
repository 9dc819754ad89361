#!/bin/sh
# A fake `ssh` for MPICH hydra (`mpiexec -launcher ssh -launcher-exec tests/fakessh.sh`): every host
# name is this machine, so a test can run a "cluster" of named hosts and lose one (tests/test_serve.py).
#   - it runs the proxy command here and writes its pid to $FAKESSH_DIR/<host>.pid: killing that
#     process and everything below it is the host and all it runs vanishing at once;
#   - a host listed in $FAKESSH_DIR/down cannot be reached: it fails as ssh does (exit 255,
#     "Connection refused"), before running anything.
# Hydra's ssh launcher passes flags such as `-x` before the host (none takes a value); they are dropped.
while [ "${1#-}" != "$1" ]; do shift; done
host="${1:?fakessh.sh: no host}"; shift
dir="${FAKESSH_DIR:?fakessh.sh: FAKESSH_DIR is not set}"
if grep -qx "$host" "$dir/down" 2>/dev/null; then
  echo "ssh: connect to host $host port 22: Connection refused" >&2
  exit 255
fi
echo $$ > "$dir/$host.pid"
exec sh -c "$*"
