"""The GPU check runs on a machine with no network and fewer packages (docs/gpu-check.md): the package imports without
imageio-ffmpeg, and scripts/gpu_check.sh runs its steps on the CPU (--dry-run) and writes its JSON and table."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}


def test_the_package_imports_without_imageio_ffmpeg(tmp_path):
    code = """
import sys
sys.modules["imageio_ffmpeg"] = None  # as on a machine without it: importing it raises ImportError
import numpy as np
from bernini_diffusers import BerniniPipeline, media
from bernini_diffusers.cli import main

print(media.write_output(np.zeros((1, 16, 16, 3), np.uint8), sys.argv[1] + "/frame.png", 16).name)
for call in (lambda: media.write_output(np.zeros((5, 16, 16, 3), np.uint8), sys.argv[1] + "/clip.mp4", 16),
             lambda: media.read_video(sys.argv[1] + "/frame.png")):
    try:
        call()
    except ImportError as err:
        print(err)
"""
    done = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, env=_env(), timeout=300
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "frame.png"
    assert len(lines) == 3 and all("pip install imageio-ffmpeg" in line for line in lines[1:]), lines
    assert sorted(p.name for p in tmp_path.iterdir()) == ["frame.png"]  # the refused video left nothing behind


def test_gpu_check_refuses_a_bad_part(tmp_path):
    done = subprocess.run(["bash", str(SCRIPT), "--part", "3", "--out", str(tmp_path)], capture_output=True, text=True)
    assert done.returncode == 2 and "--part must be 1 or 2" in done.stderr


def _dry_run(tmp_path, part: int) -> dict:
    out = tmp_path / "out"
    done = subprocess.run(
        ["bash", str(SCRIPT), "--part", str(part), "--out", str(out), "--dry-run"],
        capture_output=True, text=True, env=_env(), timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads((out / f"bench_part{part}.json").read_text())
    assert report["tiny"] is True and report["part"] == part and report["complete"] is True
    table = (out / f"bench_part{part}.md").read_text()
    assert table.splitlines()[2].startswith("| group | mode |")
    assert len(table.splitlines()) == 4 + len(report["rows"])
    for row in report["rows"]:
        assert row["status"] == "ok" or row["status"].startswith("skipped: "), row
    assert table in (out / "summary.md").read_text()
    return report


def test_gpu_check_dry_run_part_2(tmp_path):
    report = _dry_run(tmp_path, 2)
    assert {row["group"] for row in report["rows"]} == {"memory", "cache"}
    assert all(row.get("attention_share") is None for row in report["rows"])  # part 2 runs without the profiler


@pytest.mark.slow
def test_gpu_check_dry_run_part_1(tmp_path):
    report = _dry_run(tmp_path, 1)
    assert {row["group"] for row in report["rows"]} == {"modes", "backends", "compile"}
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert "GPU tests (pytest -m gpu, exit status 0)" in summary and "skipped" in summary
