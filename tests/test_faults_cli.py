"""Faults of `bernini generate` that must surface before the model loads, and batches run concurrently.

Each test asserts the message, the exit status and what is on disk afterwards. The model is the tiny random one, or
no model at all where the point is that none loads.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from huggingface_hub.errors import LocalEntryNotFoundError

from bernini_diffusers import attention, cases, cli, demo, options
from bernini_diffusers.media import read_video
from bernini_diffusers.testing import make_test_image, make_test_video

TINY = ["--model", "tiny", "--num_frames", "5", "--height", "32", "--width", "32", "--num_inference_steps", "2"]


@pytest.fixture
def no_load(monkeypatch):
    """Fails the test if the command gets as far as loading a model."""
    monkeypatch.setattr(cli, "load_pipeline", lambda args: pytest.fail("the model must not load"))


@pytest.fixture
def fake_load(monkeypatch):
    """A stand-in pipeline that records its calls and returns black frames (for tests about what happens around it)."""
    calls = []

    def pipe(**kwargs):
        calls.append(kwargs)
        frames = 1 if kwargs["task_type"] in ("t2i", "i2i") else 5
        return SimpleNamespace(frames=np.zeros((1, frames, 16, 16, 3), np.float32), fps=kwargs["fps"])

    monkeypatch.setattr(cli, "load_pipeline", lambda args: pipe)
    return calls


def error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("bernini: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def live_pid() -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


# --- device, attention backend, seed: refused before loading, naming the flag -----------------------------------


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_device_cuda_without_cuda(tmp_path, capsys, no_load):
    out = tmp_path / "o.mp4"
    assert cli.main(["generate", *TINY, "--prompt", "p", "--device", "cuda", "--output", str(out)]) == 2
    line = error_line(capsys)
    assert "--device='cuda': no cuda device is available here" in line and "use --device cpu" in line
    assert list(tmp_path.iterdir()) == []


def test_unknown_device(tmp_path, capsys, no_load):
    assert cli.main(["generate", *TINY, "--prompt", "p", "--device", "gpu0", "--output", str(tmp_path / "o")]) == 2
    assert "--device='gpu0' is not a torch device" in error_line(capsys)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("backend", ["fa2", "fa3"])
def test_flash_attention_on_the_cpu(tmp_path, capsys, no_load, backend):
    argv = ["generate", *TINY, "--prompt", "p", "--device", "cpu", "--attention_backend", backend]
    assert cli.main([*argv, "--output", str(tmp_path / "o.mp4")]) == 2
    line = error_line(capsys)
    assert f"--attention_backend='{backend}'" in line and ("CUDA" in line or "cuda" in line)
    assert list(tmp_path.iterdir()) == []


def test_flash_attention_from_the_environment_names_the_variable(tmp_path, capsys, no_load, monkeypatch):
    monkeypatch.setenv("BERNINI_ATTENTION_BACKEND", "fa2")
    assert cli.main(["generate", *TINY, "--prompt", "p", "--device", "cpu", "--output", str(tmp_path / "o")]) == 2
    assert "$BERNINI_ATTENTION_BACKEND='fa2'" in error_line(capsys)


def test_flash_attention_needs_half_precision(monkeypatch):
    args = cli.build_parser().parse_args(["generate", "--model", "tiny", "--attention_backend", "fa2"])
    monkeypatch.setattr(attention, "resolve_attention_backend", lambda name, dtype: "fa2")  # as on a GPU with flash-attn
    with pytest.raises(ValueError, match="takes bf16 or fp16 weights, not float32"):
        options._attention_backend(args, torch.device("cuda"), torch.float32)
    assert options._attention_backend(args, torch.device("cuda"), torch.bfloat16) == "fa2"
    # `auto` off CUDA is sdpa whatever is installed: the flash kernels would fail on the first step.
    auto = cli.build_parser().parse_args(["generate", "--model", "tiny", "--attention_backend", "auto"])
    assert options._attention_backend(auto, torch.device("cpu"), torch.bfloat16) == "sdpa"


@pytest.mark.parametrize("seed", [str(2**64), str(-(2**63) - 1)])
def test_seed_outside_the_generator_range(tmp_path, capsys, no_load, seed):
    assert cli.main(["generate", *TINY, "--prompt", "p", "--seed", seed, "--output", str(tmp_path / "o")]) == 2
    assert f"--seed={seed} is outside the generator's range [-2**63, 2**64-1]" in error_line(capsys)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("seed", [2**64 - 1, -(2**63)])
def test_seeds_at_the_ends_of_the_range_run(tmp_path, fake_load, seed):
    assert cli.main(["generate", *TINY, "--prompt", "p", "--seed", str(seed), "--output", str(tmp_path / "o")]) == 0
    expected = torch.Generator().manual_seed(seed)
    assert torch.equal(torch.randn(3, generator=fake_load[0]["generator"]), torch.randn(3, generator=expected))


# --- outputs that cannot be written ------------------------------------------------------------------------------


def _read_only(folder: Path, monkeypatch) -> None:
    """Make `folder` refuse new files: by its mode, or for root (whom modes do not stop) as the kernel would."""
    folder.mkdir()
    if os.geteuid() != 0:
        folder.chmod(0o555)
        return
    real = cases.tempfile.mkstemp

    def mkstemp(*args, dir=None, **kwargs):
        if Path(dir).resolve() == folder.resolve():
            raise PermissionError(errno.EACCES, "Permission denied", str(dir))
        return real(*args, dir=dir, **kwargs)

    monkeypatch.setattr(cases.tempfile, "mkstemp", mkstemp)


@pytest.mark.parametrize(
    "kind, message",
    [
        ("read_only", "cannot be written in '{tmp}/ro': the folder is not writable (Permission denied)"),
        ("parent_is_a_file", "cannot be written: '{tmp}/file.txt' is a file, not a folder"),
        ("existing_directory", "--output='{tmp}/folder.mp4' is a directory"),
        ("existing_directory_without_suffix", "--output='{tmp}/folder' is a directory"),
        ("empty", "--output='' is empty"),
        ("trailing_slash", "--output='{tmp}/new/' names a folder (it ends with '/')"),
        ("dev_null", "--output='/dev/null' is not a regular file"),
    ],
)
def test_unwritable_outputs_fail_before_loading(tmp_path, capsys, no_load, monkeypatch, kind, message):
    (tmp_path / "file.txt").write_text("keep me")
    (tmp_path / "folder.mp4").mkdir()
    (tmp_path / "folder").mkdir()
    output = {
        "read_only": f"{tmp_path}/ro/out.mp4",
        "parent_is_a_file": f"{tmp_path}/file.txt/sub/out.mp4",
        "existing_directory": f"{tmp_path}/folder.mp4",
        "existing_directory_without_suffix": f"{tmp_path}/folder",
        "empty": "",
        "trailing_slash": f"{tmp_path}/new/",
        "dev_null": "/dev/null",
    }[kind]
    if kind == "read_only":
        _read_only(tmp_path / "ro", monkeypatch)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    assert cli.main(["generate", *TINY, "--prompt", "p", "--output", output]) == 2
    assert message.format(tmp=tmp_path) in error_line(capsys)
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before  # nothing made, nothing left
    assert (tmp_path / "file.txt").read_text() == "keep me"


def test_every_batch_case_output_is_checked_before_loading(tmp_path, capsys, fake_load):
    (tmp_path / "file.txt").write_text("x")
    entries = [
        {"task_type": "t2i", "prompt": "fine", "output": str(tmp_path / "ok" / "a.png")},
        {"task_type": "t2i", "prompt": "parent is a file", "output": str(tmp_path / "file.txt" / "b.png")},
    ]
    batch = tmp_path / "b.jsonl"
    batch.write_text("\n".join(map(json.dumps, entries)))
    assert cli.main(["generate", *TINY, "--inputs", str(batch)]) == 1
    err = capsys.readouterr().err
    assert "1 done, 0 skipped, 1 failed" in err and f"'{tmp_path}/file.txt' is a file, not a folder" in err
    assert f"failed   [2] {tmp_path}/file.txt/b.png: `output`=" in err  # a key of the batch file, not the flag
    assert [call["prompt"] for call in fake_load] == ["fine"]  # the unwritable case never ran
    assert (tmp_path / "ok" / "a.png").is_file() and (tmp_path / "file.txt").read_text() == "x"


def test_check_writable_leaves_nothing_behind(tmp_path):
    cases.check_writable(tmp_path / "new" / "deeper" / "out.mp4")
    assert list(tmp_path.iterdir()) == []  # the folders are made by the writer, not by the check


# --- messages in flag names, exit statuses ---------------------------------------------------------------------


def test_pipeline_errors_name_the_flags(tmp_path, capsys, no_load):
    assert cli.main(["generate", *TINY, "--prompt", "p", "--task_type", "t2v", "--num_frames", "0"]) == 2
    line = error_line(capsys)
    assert "--num_frames=0 must be an integer" in line and "`num_frames`" not in line
    assert cli.main(["generate", *TINY, "--prompt", "p", "--task_type", "v2v"]) == 2
    assert "--task_type='v2v' requires --video" in error_line(capsys)


def test_case_file_keys_keep_their_names(tmp_path, capsys, no_load):
    case = tmp_path / "case.json"
    case.write_text(json.dumps({"task_type": "v2v", "prompt": "p"}))
    assert cli.main(["generate", *TINY, "--case", str(case)]) == 2
    line = error_line(capsys)
    assert "task_type='v2v' requires `video`" in line and "--video" not in line  # keys of the file, not flags


@pytest.mark.parametrize(
    "error, expected",
    [
        (OSError(errno.ENOSPC, "No space left on device"), "[Errno 28] No space left on device"),
        (LocalEntryNotFoundError("Cannot find the requested files in the disk cache and outgoing traffic has been "
                                 "disabled."), "LocalEntryNotFoundError: Cannot find the requested files"),
        (RuntimeError("Found no NVIDIA driver on your system."), "RuntimeError: Found no NVIDIA driver"),
    ],
)  # fmt: skip
def test_environment_failures_exit_1_in_one_line(tmp_path, capsys, monkeypatch, error, expected):
    def load(args):
        raise error

    monkeypatch.setattr(cli, "load_pipeline", load)
    monkeypatch.delenv("BERNINI_DEBUG", raising=False)
    argv = ["generate", *TINY, "--prompt", "p", "--output", str(tmp_path / "o.mp4")]
    assert cli.main(argv) == 1
    line = error_line(capsys)
    assert expected in line and "--debug or BERNINI_DEBUG=1 shows the traceback" in line
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(type(error)):  # --debug: the traceback
        cli.main([*argv, "--debug"])
    with pytest.raises(type(error)):
        cli.main(["--debug", *argv])
    monkeypatch.setenv("BERNINI_DEBUG", "1")
    with pytest.raises(type(error)):
        cli.main(argv)


def test_a_missing_local_model_folder_is_named(tmp_path, capsys, no_load):
    assert cli.main(["generate", "--model", str(tmp_path / "nowhere"), "--prompt", "p"]) == 2
    assert f"--model: no such folder: '{tmp_path / 'nowhere'}'" in error_line(capsys)


# --- the size budget --------------------------------------------------------------------------------------------


def test_an_absurd_size_is_refused_with_the_estimate_the_limit_and_the_override(tmp_path, capsys, no_load):
    argv = ["generate", "--model", "org/real-model", "--prompt", "p", "--task_type", "t2v", "--height", "16384",
            "--width", "16384", "--num_frames", "4093", "--output", str(tmp_path / "o.mp4")]  # fmt: skip
    assert cli.main(argv) == 2
    line = error_line(capsys)
    assert "about 1,073,741,824 transformer tokens" in line and "limit of 1,048,576" in line
    assert "--max_tokens N (or $BERNINI_MAX_TOKENS=N)" in line and "--num_frames" in line
    assert list(tmp_path.iterdir()) == []


def test_the_official_720p_rv2v_example_fits(tmp_path, fake_load):
    video = make_test_video(tmp_path / "v.mp4", num_frames=9, width=48, height=32, fps=24)
    refs = [make_test_image(tmp_path / f"r{i}.png") for i in range(2)]
    argv = ["generate", "--model", "org/real-model", "--prompt", "p", "--task_type", "rv2v", "--video", str(video),
            "--images", *map(str, refs), "--max_image_size", "1280", "--num_frames", "121", "--fps", "24",
            "--output", str(tmp_path / "o.mp4")]  # fmt: skip
    assert cli.main(argv) == 0 and len(fake_load) == 1


def test_the_token_limit_can_be_set(tmp_path, capsys, no_load, monkeypatch):
    argv = ["generate", *TINY, "--prompt", "p", "--task_type", "t2v", "--output", str(tmp_path / "o.mp4")]
    # 5 frames at 32x32: 2 latent frames x 2 x 2 patches = 8 tokens per stream
    assert cli.main([*argv, "--max_tokens", "7"]) == 2
    assert "about 8 transformer tokens" in error_line(capsys)
    monkeypatch.setenv("BERNINI_MAX_TOKENS", "7")
    assert cli.main(argv) == 2
    assert "limit of 7" in error_line(capsys)
    monkeypatch.setenv("BERNINI_MAX_TOKENS", "lots")
    assert cli.main(argv) == 2
    assert "$BERNINI_MAX_TOKENS='lots' must be an integer >= 1" in error_line(capsys)


def test_the_rope_table_of_the_tiny_model_is_checked_before_loading(tmp_path, capsys, no_load):
    argv = ["generate", *TINY, "--prompt", "p", "--task_type", "t2i", "--height", "2048", "--width", "32"]
    assert cli.main([*argv, "--output", str(tmp_path / "o.png")]) == 2
    line = error_line(capsys)
    assert "1x128x2 latent positions" in line and "rope table of 64 per axis" in line and "--height" in line


def test_the_rope_table_of_a_local_folder_is_read_from_its_config(tmp_path, capsys, no_load):
    model = tmp_path / "model"
    (model / "transformer").mkdir(parents=True)
    (model / "transformer" / "config.json").write_text(json.dumps({"rope_max_seq_len": 4}))
    assert options.known_rope_length(str(model)) == 4 and options.known_rope_length("org/repo") is None
    argv = ["generate", "--model", str(model), "--prompt", "p", "--task_type", "t2v", "--num_frames", "17",
            "--height", "32", "--width", "32", "--output", str(tmp_path / "o.mp4")]  # fmt: skip
    assert cli.main(argv) == 2
    assert "5x2x2 latent positions" in error_line(capsys)


# --- locks: concurrent batches split the work -------------------------------------------------------------------


def test_a_case_lock_is_exclusive_and_stale_locks_of_dead_processes_are_taken_over(tmp_path):
    output = tmp_path / "out.mp4"
    first, second = cases.CaseLock(output), cases.CaseLock(output)
    assert first.acquire() and not second.acquire()
    assert first.holder() == f"{os.getpid()} {socket.gethostname()}"
    first.release()
    assert not first.path.exists() and second.acquire()
    second.release()

    first.path.write_text(f"{dead_pid()} {socket.gethostname()}\n")
    assert second.acquire() and second.took_over is not None and second.holder() == second.owner
    second.release()

    first.path.write_text(f"{dead_pid()} some-other-host\n")  # a pid elsewhere cannot be checked: left alone
    assert not second.acquire() and first.path.exists()
    second.release()  # never removes a lock it does not hold
    assert first.path.read_text().endswith("some-other-host\n")


def test_a_held_case_is_skipped_and_its_temporary_kept(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    entries = [{"task_type": "t2i", "prompt": f"ball {i}"} for i in range(2)]
    batch = tmp_path / "b.jsonl"
    batch.write_text("\n".join(map(json.dumps, entries)))
    holder = live_pid()
    try:
        (out / ".0001_t2i.png.lock").write_text(f"{holder.pid} {socket.gethostname()}\n")
        in_flight = out / ".0001_t2i.tmp-abcd.png"
        in_flight.write_bytes(b"being written")
        assert cli.main(["generate", *TINY, "--inputs", str(batch), "--output", f"{out}/"]) == 0
    finally:
        holder.kill()
        holder.wait()
    err = capsys.readouterr().err
    assert f"skipped  [1] {out}/0001_t2i.png is being written by another run (pid {holder.pid}" in err
    assert "1 done, 1 skipped, 0 failed" in err
    assert in_flight.read_bytes() == b"being written" and (out / ".0001_t2i.png.lock").exists()
    assert not (out / "0001_t2i.png").exists() and (out / "0002_t2i.png").is_file()
    assert not (out / ".0002_t2i.png.lock").exists()  # released after the write


def test_a_stale_lock_is_taken_over_with_its_temporary(tmp_path, capsys):
    output = tmp_path / "o.png"
    (tmp_path / ".o.png.lock").write_text(f"{dead_pid()} {socket.gethostname()}\n")
    (tmp_path / ".o.tmp-dead.png").write_bytes(b"half")
    assert cli.main(["generate", *TINY, "--prompt", "p", "--task_type", "t2i", "--output", str(output)]) == 0
    assert "took over the lock" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o.png"]


def test_a_single_case_held_by_another_run_exits_1(tmp_path, capsys, fake_load):
    holder = live_pid()
    try:
        (tmp_path / ".o.png.lock").write_text(f"{holder.pid} {socket.gethostname()}\n")
        assert cli.main(["generate", *TINY, "--prompt", "p", "--task_type", "t2i", "--output", str(tmp_path / "o")]) == 1
    finally:
        holder.kill()
        holder.wait()
    assert f"is being written by another run (pid {holder.pid}" in error_line(capsys)
    assert fake_load == [] and not (tmp_path / "o.png").exists()


DIARY = "my private diary: do not print\n"


def _odd_lock(kind: str, lock: Path, user_file: Path) -> None:
    """Put something that is not a lock file of ours at `lock`."""
    if kind == "folder":
        lock.mkdir()
    elif kind == "symlink_to_dev_zero":
        lock.symlink_to("/dev/zero")
    elif kind == "symlink_to_user_file":
        lock.symlink_to(user_file)
    elif kind == "dangling_symlink":
        lock.symlink_to(lock.parent / "nowhere" / "pid a on process")
    elif kind == "fifo":
        os.mkfifo(lock)
    else:
        raise AssertionError(kind)


ODD_LOCKS = {
    "folder": "a folder",
    "symlink_to_dev_zero": "a symbolic link",
    "symlink_to_user_file": "a symbolic link",
    "dangling_symlink": "a symbolic link",
    "fifo": "a FIFO (named pipe)",
}


@pytest.mark.parametrize("kind", sorted(ODD_LOCKS))
def test_a_lock_that_is_not_a_lock_file_stops_a_single_case_before_the_model_loads(kind, tmp_path, capsys, no_load):
    user_file = tmp_path / "diary.txt"
    user_file.write_text(DIARY)
    lock = tmp_path / ".o.png.lock"
    _odd_lock(kind, lock, user_file)
    argv = ["generate", *TINY, "--prompt", "p", "--task_type", "t2i", "--output", str(tmp_path / "o.png")]
    assert cli.main(argv) == 1  # no_load: the model never loads
    line = error_line(capsys)
    assert f"is locked: its lock {str(lock)!r} is {ODD_LOCKS[kind]}, not a lock file" in line, line
    assert "wait for it, or choose another --output" in line and "diary" not in line and "\\x00" not in line
    assert user_file.read_text() == DIARY and os.path.lexists(lock) and not (tmp_path / "o.png").exists()
    assert cases.CaseLock(tmp_path / "o.png").acquire() is False  # and the lock itself refuses, as the message


def test_odd_locks_in_a_batch_are_skipped_before_the_model_loads(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    user_file = tmp_path / "diary.txt"
    user_file.write_text(DIARY)
    kinds = ["fifo", "symlink_to_user_file", "folder"]
    for number, kind in enumerate(kinds, start=1):
        _odd_lock(kind, out / f".{number:04}_t2i.png.lock", user_file)
    entries = [{"task_type": "t2i", "prompt": f"ball {i}"} for i in range(len(kinds) + 1)]
    batch = tmp_path / "b.jsonl"
    batch.write_text("\n".join(map(json.dumps, entries)))
    assert cli.main(["generate", *TINY, "--inputs", str(batch), "--output", f"{out}/"]) == 0
    err = capsys.readouterr().err
    lines = err.splitlines()
    loaded = next(i for i, line in enumerate(lines) if "random weights" in line)
    for number, kind in enumerate(kinds, start=1):
        skipped = next(i for i, line in enumerate(lines) if line.startswith(f"[{number}/4] skipped:"))
        assert skipped < loaded and f"is {ODD_LOCKS[kind]}, not a lock file" in lines[skipped]
    assert "1 done, 3 skipped, 0 failed" in err and "diary" not in err
    assert (out / "0004_t2i.png").is_file() and not (out / "0001_t2i.png").exists()
    assert user_file.read_text() == DIARY


def test_a_live_runs_lock_stops_a_single_case_before_the_model_loads(tmp_path, capsys, no_load):
    holder = live_pid()
    try:
        (tmp_path / ".o.png.lock").write_text(f"{holder.pid} {socket.gethostname()}\n")
        argv = ["generate", *TINY, "--prompt", "p", "--task_type", "t2i", "--output", str(tmp_path / "o.png")]
        assert cli.main(argv) == 1
    finally:
        holder.kill()
        holder.wait()
    assert f"is being written by another run (pid {holder.pid} on " in error_line(capsys)


def test_a_lock_is_read_only_as_far_as_pid_and_host(tmp_path):
    lock = cases.CaseLock(tmp_path / "o.png")
    lock.path.write_text("secret words " * 100000)  # 1.3 MB that is not `pid host`
    assert lock.holder() == "" and "secret" not in lock.blocked() and "a process" in lock.blocked()
    lock.path.write_text(f"{dead_pid()} {socket.gethostname()}\n")
    assert lock.blocked() is None  # stale: this run may take it over


def test_a_stale_lock_that_cannot_be_removed_is_reported(tmp_path, capsys, fake_load, monkeypatch):
    (tmp_path / ".o.png.lock").write_text(f"{dead_pid()} {socket.gethostname()}\n")
    replace = os.replace

    def refuse(source, target, *args, **kwargs):
        if str(source).endswith(".lock"):
            raise PermissionError(errno.EPERM, "Operation not permitted")
        return replace(source, target, *args, **kwargs)

    monkeypatch.setattr(cases.os, "replace", refuse)
    argv = ["generate", *TINY, "--prompt", "p", "--task_type", "t2i", "--output", str(tmp_path / "o.png")]
    assert cli.main(argv) == 1
    line = error_line(capsys)
    assert "cannot be claimed: its lock" in line and "cannot be created or removed (Operation not permitted)" in line
    assert not (tmp_path / "o.png").exists() and (tmp_path / ".o.png.lock").exists()


@pytest.mark.multiprocess
def test_two_batches_on_one_folder_split_the_cases(tmp_path):
    entries = [{"task_type": "t2v", "prompt": f"a ball number {i}"} for i in range(6)]
    batch = tmp_path / "same.jsonl"
    batch.write_text("\n".join(map(json.dumps, entries)))
    argv = [sys.executable, "-m", "bernini_diffusers.cli", "generate", *TINY, "--inputs", str(batch),
            "--output", f"{tmp_path}/out/"]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    runs = [subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for _ in range(2)]  # fmt: skip
    results = [run.communicate(timeout=400) for run in runs]
    assert [run.returncode for run in runs] == [0, 0], [err for _, err in results]
    written = [line for out, _ in results for line in out.split()]
    assert sorted(written) == [f"{tmp_path}/out/{i:04d}_t2v.mp4" for i in range(1, 7)]  # each case once, in all
    for path in written:
        frames, _ = read_video(path)
        assert len(frames) == 5 and frames[0].size == (32, 32)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [Path(p).name for p in sorted(written)]
    for _, err in results:  # how the cases split is up to the timing; each run accounts for all six
        assert "6 of 6 case(s)" in err and "0 failed" in err


def test_the_duplicate_output_check_sees_through_symlinked_folders(tmp_path, capsys, fake_load):
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    entries = [{"task_type": "t2i", "prompt": "a", "output": str(tmp_path / "real" / "x.png")},
               {"task_type": "t2i", "prompt": "b", "output": str(tmp_path / "link" / "x.png")}]  # fmt: skip
    batch = tmp_path / "b.jsonl"
    batch.write_text("\n".join(map(json.dumps, entries)))
    assert cli.main(["generate", *TINY, "--inputs", str(batch)]) == 1
    err = capsys.readouterr().err
    assert f"failed   [2] {tmp_path}/link/x.png: its output '{tmp_path}/link/x.png' is also the output of case 1" in err
    assert [call["prompt"] for call in fake_load] == ["a"] and sorted(os.listdir(tmp_path / "real")) == ["x.png"]


# --- the first ten minutes --------------------------------------------------------------------------------------


def test_a_first_run_makes_a_short_tiny_video_with_status_lines(tmp_path, capsys):
    out = tmp_path / "first.mp4"
    assert cli.main(["generate", "--model", "tiny", "--prompt", "a red ball", "--output", str(out)]) == 0
    err = capsys.readouterr().err
    assert "no --task_type given: t2v" in err and "--model tiny defaults to 9 frames, 64x96, 4 steps" in err
    assert "decoding..." in err and f"writing {out}" in err
    assert err.index("decoding...") < err.index(f"writing {out}")
    assert err.index("decoding...") > err.rindex("4/4")  # below the finished bar, not inside it
    frames, _ = read_video(out)
    assert len(frames) == 9 and frames[0].size == (96, 64)


def test_sizes_given_win_over_the_tiny_defaults(tmp_path, fake_load):
    assert cli.main(["generate", "--model", "tiny", "--prompt", "p", "--num_frames", "5", "--output",
                     str(tmp_path / "o")]) == 0  # fmt: skip
    (call,) = fake_load
    assert (call["num_frames"], call["height"], call["width"], call["num_inference_steps"]) == (5, 64, 96, 4)


@pytest.mark.parametrize(
    "media, task",
    [([], "t2v"), (["--video", "v.mp4"], "v2v"), (["--images", "a.png"], "r2v"), (["--image", "a.png"], "i2i"),
     (["--video", "v.mp4", "--images", "a.png"], "rv2v")],
)  # fmt: skip
def test_the_task_follows_the_media_when_not_given(tmp_path, fake_load, monkeypatch, media, task):
    monkeypatch.chdir(tmp_path)
    make_test_video(tmp_path / "v.mp4", num_frames=5, width=32, height=32)
    make_test_image(tmp_path / "a.png")
    assert cli.main(["generate", *TINY, "--prompt", "p", *media, "--output", "o"]) == 0
    assert fake_load[0]["task_type"] == task


def test_media_that_fit_no_single_task_say_which_to_pick(tmp_path, capsys, no_load, monkeypatch):
    monkeypatch.chdir(tmp_path)
    make_test_video(tmp_path / "v.mp4", num_frames=5, width=32, height=32)
    make_test_image(tmp_path / "a.png")
    assert cli.main(["generate", *TINY, "--prompt", "p", "--video", "v.mp4", "--image", "a.png"]) == 2
    assert "--task_type is not set and no single task takes --video --image: pick" in error_line(capsys)


def test_the_demo_starts_with_the_tiny_defaults(tmp_path, monkeypatch):
    seen = {}
    monkeypatch.setattr(options, "load_pipeline", lambda args: "pipe")

    def create_demo(pipe, **kwargs):
        seen.update(kwargs["defaults"])
        return SimpleNamespace(launch=lambda **kw: None)

    monkeypatch.setattr(demo, "create_demo", create_demo)
    args = cli.build_parser().parse_args(["demo", "--model", "tiny", "--save_dir", str(tmp_path)])
    demo.serve(args)
    assert {k: seen[k] for k in options.TINY_DEFAULTS} == options.TINY_DEFAULTS
    args = cli.build_parser().parse_args(["demo", "--model", "org/repo", "--num_inference_steps", "7"])
    args.save_dir = str(tmp_path)
    demo.serve(args)
    assert seen["num_inference_steps"] == 7 and seen["num_frames"] == 81 and seen["height"] == 480


def _readme() -> str:
    return (Path(__file__).resolve().parents[1] / "README.md").read_text()


def test_readme_command_1_installs_only_what_generation_needs_and_ci_runs_command_2():
    block = _readme().split("```bash\n", 1)[1].split("```", 1)[0].splitlines()
    first = block[block.index(next(line for line in block if line.startswith("# 1."))) + 1]
    second = block[block.index(next(line for line in block if line.startswith("# 2."))) + 1]
    install, run = first.split(" && ")
    assert install == 'python -m pip install "torch==2.13.0" -e .'  # no extra: the core dependencies generate
    assert run.startswith("bernini generate --model tiny --prompt") and "--num_frames" not in run
    assert "--task_type" not in run  # t2v without media
    ci = (Path(__file__).resolve().parents[1] / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert ci == second and '".[test]"' in second


def test_readme_tiny_pipeline_snippet_runs(tmp_path):
    blocks = [block.split("```", 1)[0] for block in _readme().split("```python\n")[1:]]
    (code,) = [block for block in blocks if "import tiny_pipeline" in block]
    exec(compile(code.replace("outputs/tiny.mp4", str(tmp_path / "tiny.mp4")), "README.md", "exec"), {})
    frames, _ = read_video(tmp_path / "tiny.mp4")
    assert len(frames) == 9 and frames[0].size == (96, 64)


def test_the_token_estimate_counts_the_streams_of_the_longest_branch():
    from bernini_diffusers.pipeline_bernini import BerniniPipeline

    call = {"prompt": "p", "task_type": "rv2v", "video": "v.mp4", "images": ["a.png", "b.png"], "num_frames": 121,
            "max_image_size": 1280, "fps": 24}  # fmt: skip
    sizes = {"video": (1280, 720), "images[0]": (1024, 1024), "images[1]": (512, 512)}
    # rv2v's VI branch: target and video 31 x 45 x 80 each, references 1 x 64 x 64 and 1 x 32 x 32
    assert BerniniPipeline.estimate_tokens(sizes, **call) == (2 * 31 * 45 * 80 + 64 * 64 + 32 * 32, (31, 64, 80))
    # unknown sizes: max_image_size squares, an upper bound
    assert BerniniPipeline.estimate_tokens(**call)[0] == 2 * 31 * 80 * 80 + 2 * 80 * 80
    # a mode that never looks at the conditions runs the target alone
    assert BerniniPipeline.estimate_tokens(sizes, **call, guidance_mode="t2v")[0] == 31 * 45 * 80


def test_an_output_that_is_a_dangling_symlink_creates_no_folder_for_its_target(tmp_path, capsys, fake_load):
    # The writer replaces the link itself; the lock used to be made (with its folders) at the link's missing target.
    (tmp_path / "out.png").symlink_to(tmp_path / "nowhere" / "deep" / "x.png")
    argv = ["generate", *TINY, "--task_type", "t2i", "--prompt", "p", "--output", str(tmp_path / "out.png")]
    assert cli.main(argv) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.png"]
    assert (tmp_path / "out.png").is_file() and not (tmp_path / "out.png").is_symlink()


@pytest.mark.parametrize("url", ["alice:hunter2pw@example.com/v1", "hunter2pw@example.com/v1?key=k"])
def test_a_base_url_without_scheme_is_refused_without_its_credentials(tmp_path, capsys, no_load, monkeypatch, url):
    # urlsplit reads 'alice:hunter2pw@host' as scheme 'alice' and a path: the message used to show the password.
    monkeypatch.setenv("BERNINI_PE_BASE_URL", url)
    monkeypatch.setenv("BERNINI_PE_API_KEY", "sk-test-key")
    argv = ["generate", *TINY, "--prompt", "p", "--use_pe", "--output", str(tmp_path / "o.mp4")]
    assert cli.main(argv) == 2
    line = error_line(capsys)
    assert "`BERNINI_PE_BASE_URL`='***@example.com/v1" in line and "must be an http(s) URL" in line
    assert "hunter2pw" not in line and "alice" not in line
    assert list(tmp_path.iterdir()) == []


def test_a_batch_output_ending_in_a_slash_is_refused_not_written_beside_the_folder(tmp_path, capsys, fake_load):
    entries = [{"task_type": "t2i", "prompt": "folder", "output": f"{tmp_path}/new/"},
               {"task_type": "t2i", "prompt": "file", "output": f"{tmp_path}/ok.png"}]  # fmt: skip
    batch = tmp_path / "b.jsonl"
    batch.write_text("\n".join(map(json.dumps, entries)))
    assert cli.main(["generate", *TINY, "--inputs", str(batch)]) == 1
    err = capsys.readouterr().err
    assert "1 done, 0 skipped, 1 failed" in err and "names a folder (it ends with '/')" in err
    assert [call["prompt"] for call in fake_load] == ["file"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.jsonl", "ok.png"]  # no new.png beside a folder


@pytest.mark.parametrize(("flag", "name"), [("--case", "case.json"), ("--inputs", "batch.jsonl")])
def test_a_binary_case_or_batch_file_is_named(tmp_path, capsys, no_load, flag, name):
    bad = tmp_path / name
    bad.write_bytes(b"\x89PNG\r\n\x1a\n\0\0")  # an image saved under the wrong name
    assert cli.main(["generate", *TINY, flag, str(bad), "--output", str(tmp_path / "o.mp4")]) == 2
    line = error_line(capsys)
    assert f"{flag}: '{bad}' is not UTF-8 JSON text" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]
