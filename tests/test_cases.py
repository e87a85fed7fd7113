"""Case files (`--case`) and batches (`--inputs`) of `bernini generate`, on the tiny random model (offline, CPU)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bernini_diffusers import cases, cli
from bernini_diffusers.testing import make_test_image

FAST = ["--model", "tiny", "--num_frames", "5", "--height", "32", "--width", "48", "--num_inference_steps", "2"]


class Recorder:
    """The real pipeline, with each call's arguments kept."""

    def __init__(self, pipe):
        self.pipe, self.calls = pipe, []

    def __call__(self, **kwargs):
        self.calls.append(kwargs)
        return self.pipe(**kwargs)

    def __getattr__(self, name):
        return getattr(self.pipe, name)


class Loads:
    """The pipelines `cli.load_pipeline` built, each a `Recorder`."""

    def __init__(self):
        self.pipes: list[Recorder] = []

    @property
    def count(self) -> int:
        return len(self.pipes)


@pytest.fixture
def loads(monkeypatch):
    """Counts the model loads of the command (the real loader runs)."""
    real, loaded = cli.load_pipeline, Loads()

    def load(args):
        loaded.pipes.append(Recorder(real(args)))
        return loaded.pipes[-1]

    monkeypatch.setattr(cli, "load_pipeline", load)
    return loaded


def write_jsonl(path: Path, entries) -> Path:
    path.write_text("\n".join(json.dumps(e) for e in entries) + "\n")
    return path


def png(path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image)


def to_uint8(frames: np.ndarray) -> np.ndarray:
    return (np.clip(frames, 0, 1) * 255).astype(np.uint8)


# --- the file formats ------------------------------------------------------------------------------------------------


def test_check_entry_accepts_the_official_keys():
    values = cases.check_entry(
        {"task_type": "ads2v", "guidance_mode": "rv2v", "prompt": "p", "video": ["a.mp4", "b.mp4"],
         "images": "r.png", "output": "o.mp4"}, "case file 'x'",
    )  # fmt: skip
    assert values["video"] == ["a.mp4", "b.mp4"] and values["images"] == ["r.png"]  # one path becomes a list
    assert cases.check_entry({"prompt": "p", "video": ["a.mp4"]}, "x")["video"] == "a.mp4"
    assert cases.CASE_KEYS == (
        "task_type", "guidance_mode", "prompt", "video", "image", "images", "context_frames", "context_overlap",
        "output",
    )  # fmt: skip
    windows = {"prompt": "p", "context_frames": 17, "context_overlap": 8}
    assert cases.check_entry(windows, "x") == windows
    assert cases.check_entry({"prompt": "p", "context_frames": None}, "x")["context_frames"] is None  # null: off


@pytest.mark.parametrize(
    "entry, message",
    [
        ({"prompt": "p", "seed": 3}, "unknown key(s) ['seed']; allowed keys: task_type, guidance_mode, prompt"),
        ({"task_type": "t2v"}, "must set `prompt`"),
        ({"prompt": "  "}, "must set `prompt`"),
        ({"prompt": "p", "task_type": "x2v"}, "`task_type`='x2v' is not supported; choose one of: t2i, t2v"),
        ({"prompt": "p", "guidance_mode": "rv2v_wapg"}, "full Bernini planner model"),
        ({"prompt": "p", "guidance_mode": "cfg"}, "`guidance_mode`='cfg' is not supported"),
        ({"prompt": "p", "video": []}, "`video`=[] must be a path or a non-empty list of paths"),
        ({"prompt": "p", "images": [1]}, "`images`=[1] must be a path"),
        ({"prompt": "p", "image": ["a.png"]}, "`image`=['a.png'] must be a non-empty string"),
        ({"prompt": "p", "output": 5}, "`output`=5 must be a non-empty string"),
        ({"prompt": "p", "context_frames": 17.0}, "`context_frames`=17.0 must be a whole number of frames or null"),
        ({"prompt": "p", "context_frames": True}, "`context_frames`=True must be a whole number of frames"),
        ({"prompt": "p", "context_overlap": None}, "`context_overlap`=None must be a whole number of frames."),
        ({"prompt": "p", "context_overlap": "8"}, "`context_overlap`='8' must be a whole number of frames."),
        (["prompt"], "must be a JSON object, got list"),
    ],
)
def test_check_entry_errors_name_the_case_the_key_and_what_is_allowed(entry, message):
    with pytest.raises(ValueError, match="^case 3 of 'b.jsonl'") as error:
        cases.check_entry(entry, "case 3 of 'b.jsonl'")
    assert message in str(error.value)


def test_read_case_file(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"prompt": "p", "task_type": "t2i"}))
    assert cases.read_case_file(path) == {"prompt": "p", "task_type": "t2i"}
    with pytest.raises(FileNotFoundError, match="`case`: no such file"):
        cases.read_case_file(tmp_path / "missing.json")
    path.write_text("{'prompt': 1}")
    with pytest.raises(ValueError, match="is not JSON"):
        cases.read_case_file(path)
    path.write_text("[]")
    with pytest.raises(ValueError, match="must be a JSON object, got list"):
        cases.read_case_file(path)


def test_read_batch_file_json_and_jsonl(tmp_path):
    (tmp_path / "b.json").write_text(json.dumps([{"prompt": "a"}, {"prompt": "b"}]))
    assert cases.read_batch_file(tmp_path / "b.json") == [{"prompt": "a"}, {"prompt": "b"}]
    (tmp_path / "b.jsonl").write_text('{"prompt": "a"}\n\n{"prompt": "b"}\n')  # blank lines are skipped
    assert cases.read_batch_file(tmp_path / "b.jsonl") == [{"prompt": "a"}, {"prompt": "b"}]
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a"}\n{prompt: b}\n')
    with pytest.raises(ValueError, match="line 2 is not JSON"):
        cases.read_batch_file(tmp_path / "bad.jsonl")
    (tmp_path / "one.json").write_text('{"prompt": "a"}')
    with pytest.raises(ValueError, match="must hold a JSON list .* use --case"):
        cases.read_batch_file(tmp_path / "one.json")
    (tmp_path / "empty.json").write_text("[]")
    with pytest.raises(ValueError, match="holds no cases"):
        cases.read_batch_file(tmp_path / "empty.json")
    with pytest.raises(ValueError, match=r"must be a JSON list \(.json\) or JSON lines \(.jsonl\)"):
        cases.read_batch_file(tmp_path / "b.txt")


def test_output_names():
    assert cases.is_single_frame("t2i", 81) and cases.is_single_frame("t2v", 3) and not cases.is_single_frame("t2v", 4)
    assert cases.output_path("o/x.mp4", single_frame=True) == Path("o/x.png")
    assert cases.output_path("o/x.png", single_frame=False) == Path("o/x.mp4")
    assert cases.output_path("o/x.MP4", single_frame=False) == Path("o/x.MP4")
    assert cases.derived_output("out", 3, 10, "t2v", False) == Path("out/0003_t2v.mp4")
    assert cases.derived_output("out", 7, 12345, "i2i", True) == Path("out/00007_i2i.png")


# --- --case ----------------------------------------------------------------------------------------------------------


def test_case_values_override_the_flags(tmp_path, loads, monkeypatch):
    monkeypatch.chdir(tmp_path)
    make_test_image(tmp_path / "media" / "house.png")
    case = {"task_type": "i2i", "guidance_mode": "v2v_apg", "prompt": "make it winter", "image": "media/house.png",
            "output": "results/winter.mp4"}  # fmt: skip
    (tmp_path / "case.json").write_text(json.dumps(case))
    argv = ["generate", *FAST, "--case", "case.json", "--prompt", "flag prompt", "--task_type", "t2v",
            "--guidance_mode", "t2v", "--output", "flag.mp4", "--seed", "5"]  # fmt: skip
    assert cli.main(argv) == 0
    (call,) = loads.pipes[0].calls
    assert (call["prompt"], call["task_type"], call["guidance_mode"]) == ("make it winter", "i2i", "v2v_apg")
    assert call["image"] == "media/house.png" and call["num_inference_steps"] == 2  # flags still set the rest
    assert (tmp_path / "results" / "winter.png").is_file() and not (tmp_path / "flag.mp4").exists()


def test_case_without_output_uses_the_output_flag(tmp_path, loads):
    (tmp_path / "case.json").write_text(json.dumps({"task_type": "t2i", "prompt": "a red ball"}))
    argv = ["generate", *FAST, "--case", str(tmp_path / "case.json"), "--output", str(tmp_path / "ball.png")]
    assert cli.main(argv) == 0
    assert (tmp_path / "ball.png").is_file() and loads.pipes[0].calls[0]["guidance_mode"] is None


@pytest.mark.parametrize(
    "case, message",
    [
        ({"prompt": "p", "negative_prompt": "x"}, "unknown key(s) ['negative_prompt']; allowed keys:"),
        ({"task_type": "t2v"}, "must set `prompt`"),
        ({"prompt": "p", "guidance_mode": "vae_txt_vit_wapg"}, "full Bernini planner model"),
        ({"prompt": "p", "task_type": "v2v", "video": "missing.mp4"}, "`video`: no such file: 'missing.mp4'"),
        ({"prompt": "p", "task_type": "t2v", "context_frames": 80}, "`context_frames`=80 is not on the latent grid"),
        ({"prompt": "p", "task_type": "t2v", "context_frames": 17, "context_overlap": 20},
         "`context_overlap`=20 must be shorter than the window `context_frames`=17"),
        ({"prompt": "p", "task_type": "t2v", "context_overlap": 2.5},
         "`context_overlap`=2.5 must be a whole number of frames"),
    ],
)  # fmt: skip
def test_bad_case_files_fail_before_loading(tmp_path, loads, capsys, monkeypatch, case, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "case.json").write_text(json.dumps(case))
    assert cli.main(["generate", *FAST, "--case", "case.json"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("bernini: error:") and message in err and "Traceback" not in err
    assert loads.count == 0 and "random weights" not in err


def test_case_context_windows_override_the_flags(tmp_path, loads):
    # A one-window clip (5 frames): the windowed call runs as the plain one, in the time of one.
    case = {"task_type": "t2v", "prompt": "a fox runs", "context_frames": 5, "context_overlap": 0}
    (tmp_path / "case.json").write_text(json.dumps(case))
    argv = ["generate", *FAST, "--case", str(tmp_path / "case.json"), "--context_frames", "81", "--context_overlap",
            "12", "--output", str(tmp_path / "fox.mp4")]  # fmt: skip
    assert cli.main(argv) == 0
    (call,) = loads.pipes[0].calls
    assert (call["context_frames"], call["context_overlap"]) == (5, 0)
    (tmp_path / "case.json").write_text(json.dumps({**case, "context_frames": None}))  # null: off, whatever the flag
    assert cli.main(argv) == 0
    assert loads.pipes[1].calls[0]["context_frames"] is None


def test_batch_cases_set_their_own_context_windows(tmp_path, loads, capsys):
    entries = [
        {"task_type": "t2v", "prompt": "own windows", "context_frames": 5, "context_overlap": 0},
        {"task_type": "t2v", "prompt": "the flags' windows"},
        {"task_type": "t2v", "prompt": "off the grid", "context_frames": 80},
    ]
    batch = write_jsonl(tmp_path / "b.jsonl", entries)
    argv = ["generate", *FAST, "--inputs", str(batch), "--output", f"{tmp_path}/out/", "--context_frames", "9",
            "--context_overlap", "4"]  # fmt: skip
    assert cli.main(argv) == 1
    calls = {call["prompt"]: call for call in loads.pipes[0].calls}
    assert set(calls) == {"own windows", "the flags' windows"}
    assert (calls["own windows"]["context_frames"], calls["own windows"]["context_overlap"]) == (5, 0)
    assert (calls["the flags' windows"]["context_frames"], calls["the flags' windows"]["context_overlap"]) == (9, 4)
    err = capsys.readouterr().err
    assert "failed   [3] " in err and "`context_frames`=80 is not on the latent grid" in err


# --- --inputs -------------------------------------------------------------------------------------------------------


@pytest.fixture
def mixed_batch(tmp_path, monkeypatch):
    """A batch with good cases and invalid ones (among them a file that is not a video, refused before the load)."""
    monkeypatch.chdir(tmp_path)
    make_test_image(tmp_path / "house.png")
    (tmp_path / "broken.mp4").write_bytes(b"not a video")
    entries = [
        {"task_type": "t2i", "prompt": "a red ball", "output": "named/ball.png"},
        {"task_type": "t2v", "prompt": "a fox runs"},
        {"task_type": "v2v", "prompt": "make it red", "video": "missing.mp4"},
        {"task_type": "t2i", "prompt": "a blue ball", "colour": "blue"},
        {"task_type": "v2v", "prompt": "make it red", "video": "broken.mp4"},
        {"task_type": "i2i", "prompt": "make it winter", "image": "house.png", "guidance_mode": "t2v"},
        {"prompt": "the --task_type flag decides"},
        "not a case",
        {"task_type": "t2i", "prompt": "same file again", "output": "named/ball.png"},
    ]
    return write_jsonl(tmp_path / "batch.jsonl", entries)


def test_a_batch_runs_valid_cases_with_one_load_reports_the_rest_and_restarts(mixed_batch, loads, capsys):
    argv = ["generate", *FAST, "--inputs", "batch.jsonl", "--task_type", "t2i", "--output", "out/x.mp4"]
    assert cli.main(argv) == 1  # some cases failed
    assert loads.count == 1
    captured = capsys.readouterr()
    done = ["named/ball.png", "out/0002_t2v.mp4", "out/0006_i2i.png", "out/0007_t2i.png"]
    assert captured.out.split() == done
    assert all(Path(p).is_file() for p in done)
    assert not Path("out/0003_v2v.mp4").exists() and not Path("out/0005_v2v.mp4").exists()
    err = captured.err
    assert "[1/9] t2i -> named/ball.png" in err and "[2/9] t2v -> out/0002_t2v.mp4" in err
    assert "9 of 9 case(s): 4 done, 0 skipped, 5 failed" in err
    assert "failed   [3] out/0003_v2v.mp4: `video`: no such file: 'missing.mp4'" in err
    assert "failed   [4] case 4 of 'batch.jsonl' has unknown key(s) ['colour']" in err
    assert "failed   [5] out/0005_v2v.mp4: `video`: not a readable video: 'broken.mp4'" in err
    assert "failed   [8] case 8 of 'batch.jsonl' must be a JSON object, got str" in err
    assert "failed   [9] named/ball.png: its output 'named/ball.png' is also the output of case 1" in err
    assert "`guidance_mode` of case(s) 6 in 'batch.jsonl' is ignored" in err
    calls = {call["prompt"]: call for call in loads.pipes[0].calls}
    assert calls["make it winter"]["guidance_mode"] is None  # the flag's (unset), not the case's
    assert calls["the --task_type flag decides"]["task_type"] == "t2i"
    assert calls["a fox runs"]["video"] is None  # media come from the case itself, not from flags

    # Run again: what exists is skipped, untouched; the invalid cases fail again, and nothing loads the model.
    stamps = {p: os.stat(p).st_mtime_ns for p in done}
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert "9 of 9 case(s): 0 done, 4 skipped, 5 failed" in err
    assert "skipped  [1] named/ball.png exists (--overwrite to redo it)" in err
    assert {p: os.stat(p).st_mtime_ns for p in stamps} == stamps
    assert [len(p.calls) for p in loads.pipes] == [4]  # the bad video was refused before the first load, too


def test_nothing_pending_loads_nothing(tmp_path, loads, capsys):
    batch = write_jsonl(tmp_path / "b.jsonl", [{"task_type": "v2v", "prompt": "p", "video": str(tmp_path / "no.mp4")}])
    assert cli.main(["generate", *FAST, "--inputs", str(batch)]) == 1
    assert loads.count == 0 and "0 done, 0 skipped, 1 failed" in capsys.readouterr().err
    done = make_test_image(tmp_path / "done.png")  # complete: an empty or unreadable one would be redone
    batch = write_jsonl(tmp_path / "c.jsonl", [{"task_type": "t2i", "prompt": "p", "output": str(done)}])
    assert cli.main(["generate", *FAST, "--inputs", str(batch)]) == 0
    assert loads.count == 0 and "0 done, 1 skipped, 0 failed" in capsys.readouterr().err


def test_each_case_equals_its_single_run_and_overwrite_redoes_it(tmp_path, loads, tiny_pipe):
    entries = [{"task_type": "t2i", "prompt": "a red ball"}, {"task_type": "t2i", "prompt": "a green cube"}]
    (tmp_path / "b.json").write_text(json.dumps(entries))  # the JSON list form
    argv = ["generate", *FAST, "--inputs", str(tmp_path / "b.json"), "--output", str(tmp_path / "x.mp4")]
    assert cli.main(argv) == 0
    for number, entry in enumerate(entries, start=1):
        expected = tiny_pipe(entry["prompt"], task_type="t2i", height=32, width=48, num_inference_steps=2,
                             norm_threshold=[50.0, 50.0, 50.0], generator=torch.Generator().manual_seed(42)).frames[0]
        np.testing.assert_array_equal(png(tmp_path / f"{number:04d}_t2i.png"), to_uint8(expected[0]))  # fmt: skip
    first = tmp_path / "0001_t2i.png"
    stale = make_test_image(first, width=48, height=32).read_bytes()  # readable, so a rerun keeps it
    assert cli.main(argv) == 0 and first.read_bytes() == stale  # skipped
    assert cli.main([*argv, "--overwrite"]) == 0 and first.read_bytes() != stale
    assert loads.count == 2


def test_output_folder_of_derived_names(tmp_path, loads):
    batch = write_jsonl(tmp_path / "b.jsonl", [{"task_type": "t2i", "prompt": "a red ball"}])
    assert cli.main(["generate", *FAST, "--inputs", str(batch), "--output", f"{tmp_path}/batch/"]) == 0
    assert (tmp_path / "batch" / "0001_t2i.png").is_file()


def test_a_killed_batch_restarted_finishes_only_what_is_missing(tmp_path):
    entries = [{"task_type": "t2i", "prompt": f"a ball number {i}"} for i in range(6)]
    batch = write_jsonl(tmp_path / "b.jsonl", entries)
    argv = ["generate", *FAST, "--inputs", str(batch), "--output", str(tmp_path / "out" / "x.png")]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen(
        [sys.executable, "-m", "bernini_diffusers.cli", *argv], env=env, start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    first = tmp_path / "out" / "0001_t2i.png"
    try:
        deadline = time.monotonic() + 240
        while not first.exists() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        os.killpg(process.pid, signal.SIGKILL)  # the whole session: no process is left behind
        process.wait(timeout=30)
    assert first.exists()
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "out").glob("*.png")}
    assert 1 <= len(before) < 6, before  # killed part-way
    # What a kill mid-write leaves: the case's lock, naming the dead process, and its temporary. The lock is taken
    # over, and only then is the temporary removed (a live run's temporary is never touched: test_faults_cli.py).
    (tmp_path / "out" / ".0006_t2i.png.lock").write_text(f"{process.pid} {socket.gethostname()}\n")
    (tmp_path / "out" / ".0006_t2i.tmp-killed.png").write_bytes(b"half")

    assert cli.main(argv) == 0
    after = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "out").glob("*.png")}
    assert sorted(after) == [f"{i:04d}_t2i.png" for i in range(1, 7)]
    assert all(after[name] == stamp for name, stamp in before.items())  # finished cases were not redone
    assert not list((tmp_path / "out").glob(".*tmp*"))  # no temporary left
    assert not list((tmp_path / "out").glob(".*.lock"))  # the killed run's locks were taken over and released
    for path in (tmp_path / "out").glob("*.png"):
        assert png(path).shape == (32, 48, 3)  # every output is whole
