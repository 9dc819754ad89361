# Sourced by the benchmark drivers (slow_rank.sh, pipeline_links.sh): their common arguments
#   MODEL.m TOKENIZER.t [OUT_DIR] [-- extra benchmark options]
# Also sets `here`, the checkout.
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# parse_bench_args NAME DEFAULT_BENCH "$@" sets model, tok, out (default bench/NAME-<date>), the array
# extra, and the array bench from $BENCH (default DEFAULT_BENCH: the benchmark options of every run).
parse_bench_args() {
  local name="$1"; shift
  read -r -a bench <<< "${BENCH:-$1}"; shift
  model="${1:?model .m}"; tok="${2:?tokenizer .t}"; shift 2
  out="bench/$name-$(date +%Y%m%d-%H%M%S)"
  if [ $# -gt 0 ] && [ "$1" != "--" ]; then out="$1"; shift; fi
  [ "${1:-}" = "--" ] && shift
  extra=("$@")
}
