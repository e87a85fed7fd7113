"""benchmarks/bench_long.py: its smallest run on the CPU, the clip lengths it plans, and its refusal of bad settings."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bernini_diffusers import windows

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_long.py"


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(SCRIPT.parent))  # the script imports its neighbour `_common`, as when run directly
    spec = importlib.util.spec_from_file_location("bench_long", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    yield module
    sys.path.remove(str(SCRIPT.parent))


@pytest.mark.parametrize("context_frames, context_overlap", [(17, 4), (17, 8), (81, 16), (9, 0)])
def test_clip_lengths_give_exactly_the_requested_windows(bench, context_frames, context_overlap):
    for count in range(1, 9):
        frames = bench.clip_frames(count, context_frames, context_overlap)
        assert frames % 4 == 1
        context = windows.context_windows(windows.latent_frames(frames), context_frames, context_overlap)
        assert len(context) == count
        # the longest such clip: its windows overlap by exactly the requested frames, one more latent frame adds one
        window = windows.latent_frames(context_frames)
        assert all(b[0] - a[0] == window - context_overlap // 4 for a, b in zip(context.spans, context.spans[1:]))
        longer = windows.context_windows(windows.latent_frames(frames) + 1, context_frames, context_overlap)
        assert len(longer) == count + 1


def test_bad_window_settings_exit_with_the_argument_named(bench):
    with pytest.raises(SystemExit, match="context_frames"):
        bench.main(["--context_frames", "18"])
    with pytest.raises(SystemExit, match="context_overlap"):
        bench.main(["--context_overlap", "17"])
    with pytest.raises(SystemExit, match="--windows"):
        bench.main(["--windows", "0,2"])


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="the memory figures need Linux's /proc")
def test_smallest_run_prints_the_table_and_writes_the_figures(tmp_path):
    out = tmp_path / "long.json"
    args = ["--windows", "1,2", "--repeats", "1", "--warmup", "0", "--steps", "1", "--height", "32", "--width", "48",
            "--no_contrast", "--json", str(out)]  # fmt: skip
    # the checkout's package first, as the test process itself imports it
    paths = [str(SCRIPT.parents[1] / "src"), os.environ.get("PYTHONPATH")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p)}
    command = [sys.executable, str(SCRIPT), *args]
    done = subprocess.run(command, check=False, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.splitlines()
    header = next(line for line in lines if line.startswith("windows "))
    assert "loop peak MB" in header and "ms/frame/step" in header
    assert any(line.startswith("1 (plain) ") for line in lines)
    assert any(line.startswith("2 ") for line in lines)
    assert any(line.startswith("RESULT per_frame_ratio_2w_vs_2w=1.00 loop_peak_ratio_2w_vs_2w=1.00") for line in lines)
    report = json.loads(out.read_text())
    rows = report["rows"]
    assert [(r["windows"], r["frames"], r["latent_frames"], r["forwards_per_step"]) for r in rows] == [
        (1, 17, 5, 2),
        (2, 33, 9, 4),
    ]
    assert [r["context_frames"] for r in rows] == [None, 17]
    for row in rows:  # figures are measured, not asserted on: only that they exist and are positive
        assert row["s_per_step"] > 0 and row["loop_peak_mb"] > 0
        assert row["call_peak_rss_mb"] >= row["loop_peak_mb"]
    assert report["environment"]["device"] == "cpu"
