"""benchmarks/bench_parallel.py: its weight-sharding rows on the CPU at the smallest size (two torchrun launches)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_parallel.py"


@pytest.mark.slow
@pytest.mark.multiprocess
def test_shard_rows_on_the_cpu():
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    run = subprocess.run(
        [sys.executable, str(SCRIPT), "--shard", "2", "--shard_layers", "1", "--repeats", "1", "--warmup", "0"],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    rows = {line.split("|")[1].strip(): line.split("|")[-2].strip() for line in run.stdout.splitlines()
            if line.startswith("| ") and not line.startswith("| per rank")}  # fmt: skip
    assert 0.45 <= float(rows["parameter bytes"]) <= 0.6  # half of the expert per rank, plus what stays whole
    assert "max |sharded - whole| of the forward output: 0.000e+00" in run.stdout
