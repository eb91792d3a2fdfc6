#!/usr/bin/env bash
# The test suite as a busy machine runs it: CPU-bound loops (two by default) run beside pytest the
# whole time, as other work on a small machine would, then the suite runs again under
# ATEN_CPU_CAPABILITY=default (ATen's scalar kernels, as an older or other CPU sums), the loops
# still beside it. A test that races the clock or another process fails here before it fails in
# someone's CI. Both runs include the slow end-to-end tests (--slow) and, as pytest.ini says, use
# both cores (pytest-xdist). Exit status: non-zero when either run failed.
#
#   bash scripts/busy_tests.sh                                   # the whole suite, both runs
#   bash scripts/busy_tests.sh tests/test_resume.py -k dassl     # pytest arguments
#   BUSY=4 KERNELS=0 bash scripts/busy_tests.sh                  # four loops; one run only
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-python}
BUSY=${BUSY:-2}
KERNELS=${KERNELS:-1}

loops=()
stop_loops() {
    if [[ ${#loops[@]} -gt 0 ]]; then
        kill "${loops[@]}" 2>/dev/null
        wait "${loops[@]}" 2>/dev/null
        loops=()
    fi
}
trap stop_loops EXIT
trap 'exit 130' INT TERM
for ((i = 0; i < BUSY; i++)); do
    "$PYTHON" -c "while True: pass" &
    loops+=($!)
done
echo "busy_tests: ${BUSY} busy loops beside the tests (pids ${loops[*]:-none})"

status=0
"$PYTHON" -m pytest -q --slow "$@" || status=$?
if [[ $KERNELS == 1 ]]; then
    echo "busy_tests: again under ATEN_CPU_CAPABILITY=default"
    ATEN_CPU_CAPABILITY=default "$PYTHON" -m pytest -q --slow "$@" || status=$?
fi
exit "$status"
