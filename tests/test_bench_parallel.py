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
    rows = {cells[0]: cells for line in run.stdout.splitlines() if line.startswith("| ") and not
            line.startswith("| per rank") for cells in [[c.strip() for c in line.split("|")[1:-1]]]}  # fmt: skip
    sharded, fp8 = float(rows["parameter bytes"][5]), float(rows["parameter bytes"][7])
    assert 0.45 <= sharded <= 0.6  # half of the expert per rank, plus what stays whole
    assert fp8 < sharded  # the float8 shards take half the bytes of the bf16 ones (norms and embedders stay bf16)
    assert "|sharded - whole| of the forward output's sum: 0.000e+00" in run.stdout
