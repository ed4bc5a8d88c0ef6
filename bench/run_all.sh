#!/usr/bin/env bash
# Run every benchmark and record the figures.
#   bash bench/run_all.sh            # full sizes when a GPU is visible, --quick (CPU sizes) otherwise
#   bash bench/run_all.sh --quick    # force the CPU sizes
#   RESULTS_OUT=/some/dir bash bench/run_all.sh   # also copy the results there (the GPU check uses $OUT)
# Writes bench/results/<host>-<date>.json (all benchmarks) and appends a section to bench/RESULTS.md; each
# benchmark's log and JSON go to a temporary folder (tarred to $RESULTS_OUT if set). A benchmark that fails is
# recorded as failed; the others still run. BENCHES="cache memory" limits the run; BENCH_TIMEOUT (seconds, default
# 900) bounds each one.
set -uo pipefail
cd "$(dirname "$0")/.."
export RAY_AUTH_MODE=disabled PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PY:-python3}
mode=()
if [ "${1:-}" = "--quick" ] || ! $PY -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  mode=(--quick)
fi
benches=${BENCHES:-"trial_throughput input_pipeline packing cache out_of_core overhead memory scaling cluster probe_batch"}
stamp="$(hostname)-$(date -u +%Y%m%dT%H%MZ)"
run="$(mktemp -d)/$stamp"  # per-benchmark JSON and logs; only the collected JSON stays in bench/results
mkdir -p "$run" bench/results
for b in $benches; do
  echo "== $b ${mode[*]:-(full)}"
  start=$(date +%s)
  timeout "${BENCH_TIMEOUT:-900}" $PY "bench/$b.py" "${mode[@]}" --json "$run/$b.json" 2>&1 | tee "$run/$b.log" \
    | grep -E "^($b|case|k |joint|n_trials|phase|m |trials|[a-z_]+: )" || true
  echo "   ($(( $(date +%s) - start )) s)"
done
cp bench/results/scaling-*.png "$run/" 2>/dev/null || true
label="$([ ${#mode[@]} -gt 0 ] && echo "CPU, --quick" || echo "GPU, full") — $stamp"
$PY bench/collect.py "$run" "bench/results/$stamp.json" bench/RESULTS.md --label "$label"
if [ -n "${RESULTS_OUT:-}" ]; then
  mkdir -p "$RESULTS_OUT"
  cp "bench/results/$stamp.json" "$RESULTS_OUT/bench-results.json"
  tar czf "$RESULTS_OUT/bench-logs.tgz" -C "$(dirname "$run")" "$stamp"
  cp bench/RESULTS.md "$RESULTS_OUT/RESULTS.md"
fi
