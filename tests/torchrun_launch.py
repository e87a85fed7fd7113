"""Launching `torchrun` from a test: a clean environment, and no process left behind on a timeout or a failure."""

from __future__ import annotations

import os
import subprocess
import sys

import psutil
import pytest

# What torchrun sets in its workers: a test process must not pass its own (a test run under torchrun) on.
TORCHRUN_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def torchrun_command(nproc: int, *args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *args]


def start(command: list[str], **kwargs) -> subprocess.Popen:
    """Start `command` without inherited torchrun variables (and one thread per process: 2 cores are shared)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    for var in TORCHRUN_VARS:
        env.pop(var, None)
    return subprocess.Popen(command, env=env, text=True, **kwargs)


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL `proc` and every process under it. torchrun starts each worker in a session of its own, so killing
    torchrun's process group would leave the workers running."""
    try:
        root = psutil.Process(proc.pid)
        procs = [*root.children(recursive=True), root]
    except psutil.NoSuchProcess:
        procs = []
    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=30)
    proc.wait(timeout=30)


def finish(proc: subprocess.Popen, timeout: float, what: str = "the parallel processes") -> str:
    """Wait for `proc` and return its output; on a timeout or a failure kill it and its workers and fail, so no
    process outlives the test."""
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(proc)
        output, _ = proc.communicate()
        pytest.fail(f"{what} did not finish within {timeout} s:\n{(output or '')[-6000:]}")
    finally:
        if proc.poll() is None:
            kill_tree(proc)
    if proc.returncode != 0:
        pytest.fail(f"torchrun exited with {proc.returncode}:\n{(output or '')[-6000:]}")
    return output or ""
