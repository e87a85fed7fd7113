#!/usr/bin/env bash
# The GPU check of a lent machine without network (docs/gpu-check.md): installs the wheels carried in .whl/ that the
# machine lacks, then runs from the source tree (PYTHONPATH=src; `pip install -e .` needs the network) with the Hub
# offline: part 1 runs the GPU tests (pytest -m gpu) and bench_gpu's modes, backends and compile rows; part 2
# bench_gpu's memory profiles and cache presets. Each part fits one 10-minute command. Results go to DIR:
#   bench_part<N>.json  every figure, rewritten after each row (a killed run keeps what it measured)
#   bench_part<N>.md    the same rows as a markdown table
#   gpu_tests.log       the GPU tests' output (part 1)
#   summary.md          one block per part: the GPU tests' result line, then the table
# --dry-run runs the same steps on the CPU with the tiny model (the test suite does), installing nothing.
# The interpreter is $PYTHON (default python3, the one that holds torch on the GPU image).
#
# Usage: scripts/gpu_check.sh [--part 1|2] --out DIR [--dry-run]
# Exit status: 0 when every step passed, 1 when a step failed (its output is in DIR), 2 for a bad argument.
set -uo pipefail

part=1
out=""
dry_run=0
usage="usage: scripts/gpu_check.sh [--part 1|2] --out DIR [--dry-run]"
while [ $# -gt 0 ]; do
    case "$1" in
        --part) part="${2:-}"; shift 2 || { echo "$usage" >&2; exit 2; } ;;
        --out) out="${2:-}"; shift 2 || { echo "$usage" >&2; exit 2; } ;;
        --dry-run) dry_run=1; shift ;;
        -h|--help) echo "$usage"; exit 0 ;;
        *) echo "gpu_check: unknown argument '$1'; $usage" >&2; exit 2 ;;
    esac
done
if [ "$part" != 1 ] && [ "$part" != 2 ]; then
    echo "gpu_check: --part must be 1 or 2, got '$part'" >&2; exit 2
fi
if [ -z "$out" ]; then
    echo "gpu_check: --out DIR is required; $usage" >&2; exit 2
fi

root="$(cd "$(dirname "$0")/.." && pwd)"
mkdir -p "$out" || exit 1
out="$(cd "$out" && pwd)"
cd "$root" || exit 1
export PYTHONPATH="$root/src${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1
py="${PYTHON:-python3}"
started=$SECONDS
# Seconds this script may take: a device command runs at most 600 s; the margin covers the row running at the
# deadline.
budget="${GPU_CHECK_BUDGET_S:-480}"
status=0

# 1. The carried wheels, for what is missing only (module:requirement), into a folder of their own put on PYTHONPATH
# (the image's environment is left as it is); --no-deps, as the rest is on the machine.
site="${TMPDIR:-/tmp}/bernini_gpu_site"
export PYTHONPATH="$site:$PYTHONPATH"
missing=()
for pair in diffusers:diffusers imageio_ffmpeg:imageio-ffmpeg ftfy:ftfy wcwidth:wcwidth; do
    module="${pair%%:*}"
    if ! "$py" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('$module') is None)" 2>/dev/null; then
        missing+=("${pair#*:}")
    fi
done
if [ ${#missing[@]} -eq 0 ]; then
    echo "gpu_check: every needed package is present"
elif [ $dry_run -eq 1 ]; then
    echo "gpu_check: would install from .whl/: ${missing[*]}"
else
    echo "gpu_check: installing from .whl/: ${missing[*]}"
    "$py" -m pip install --quiet --no-index --no-deps --no-compile --target "$site" --find-links "$root/.whl" \
        "${missing[@]}" || {
        echo "gpu_check: installing the carried wheels failed (run scripts/gpu_wheels.sh here and carry .whl)" >&2
        exit 1
    }
fi
"$py" -c "import torch, diffusers; print(f'gpu_check: torch {torch.__version__} (CUDA {torch.version.cuda}), \
diffusers {diffusers.__version__}, cuda available: {torch.cuda.is_available()}')" || status=1

# 2. The GPU tests (part 1): only the files that hold one, so a module needing a package the machine lacks (gradio,
# openai) is not collected.
tests_line="GPU tests: not run in part $part"
if [ "$part" = 1 ]; then
    mapfile -t files < <(grep -l "pytest.mark.gpu" tests/test_*.py)
    timeout 240 "$py" -m pytest -m gpu -q -p no:cacheprovider -o addopts="" "${files[@]}" > "$out/gpu_tests.log" 2>&1
    code=$?
    # pytest's 5: every test deselected (none marked gpu), not a failure
    if [ $code -ne 0 ] && [ $code -ne 5 ]; then status=1; fi
    tests_line="GPU tests (pytest -m gpu, exit status $code): $(grep -E "passed|failed|skipped|error|deselected|no tests" \
        "$out/gpu_tests.log" | tail -1)"
    echo "gpu_check: $tests_line"
fi

# 3. bench_gpu's part, with a deadline that leaves the margin of the command's limit.
left=$((budget - (SECONDS - started)))
[ $left -lt 30 ] && left=30
bench=("$py" benchmarks/bench_gpu.py --part "$part" --deadline_s "$left" --json "$out/bench_part$part.json"
       --markdown "$out/bench_part$part.md")
if [ $dry_run -eq 1 ]; then
    bench+=(--tiny --steps 1 --short_steps 1 --cache_steps 1 --threads 1 --quiet)
fi
timeout $((left + 90)) "${bench[@]}" > "$out/bench_part$part.log" 2>&1 || status=1
tail -n 3 "$out/bench_part$part.log"

{
    echo "## GPU check, part $part$([ $dry_run -eq 1 ] && echo ' (dry run on the CPU, tiny model)')"
    echo
    echo "$tests_line"
    echo
    if [ -f "$out/bench_part$part.md" ]; then cat "$out/bench_part$part.md"; else echo "bench_gpu wrote no table"; fi
    echo
} >> "$out/summary.md"
echo "gpu_check: part $part done in $((SECONDS - started)) s, exit status $status; results in $out"
exit $status
