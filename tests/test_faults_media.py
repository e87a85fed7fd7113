"""Faults around media: an output exists only if it is complete and readable, and bad input media or frame rates
fail before the model loads. Each case checks the message, the error or exit status, and what is on disk after."""

from __future__ import annotations

import errno
import json
import os
import resource
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import imageio_ffmpeg
import numpy as np
import pytest
from PIL import Image

from bernini_diffusers import cli, demo, media
from bernini_diffusers.media import OutputWriteError, write_output
from bernini_diffusers.pipeline_bernini import BerniniPipeline, BerniniPipelineOutput
from bernini_diffusers.testing import make_test_image, make_test_video

TINY = ["--model", "tiny", "--prompt", "a cat", "--num_frames", "5", "--height", "32", "--width", "32",
        "--num_inference_steps", "2"]  # fmt: skip
SRC = str(Path(media.__file__).resolve().parents[1])  # the package under test, for child processes


def noise(frames: int, height: int = 32, width: int = 32, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (frames, height, width, 3), dtype=np.uint8)


def listing(folder: Path) -> list[str]:
    """Every name in `folder`, hidden temporaries included."""
    return sorted(p.name for p in folder.iterdir())


def file_size_limit(limit: int):
    """A `preexec_fn`: the child may write files of at most `limit` bytes, and a write past it fails with EFBIG
    instead of killing the process (SIGXFSZ ignored): a full disk without root."""

    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def run_limited(argv: list[str], limit: int, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONDONTWRITEBYTECODE": "1", "PYTHONPATH": SRC}
    return subprocess.run(
        [sys.executable, *argv], capture_output=True, text=True, env=env, timeout=timeout,
        preexec_fn=file_size_limit(limit),
    )  # fmt: skip


needs_rlimit = pytest.mark.skipif(not hasattr(resource, "RLIMIT_FSIZE"), reason="needs a POSIX file-size limit")


# --- disk full ------------------------------------------------------------------------------------------------

WRITE_IN_CHILD = textwrap.dedent(
    """
    import sys
    import numpy as np
    from bernini_diffusers import media

    frames = np.random.default_rng(0).integers(0, 256, (int(sys.argv[2]), 96, 96, 3), dtype=np.uint8)
    try:
        media.write_output(frames, sys.argv[1], 16)
    except media.OutputWriteError as err:
        print(f"{err.errno} {err}")
        sys.exit(3)
    """
)


@needs_rlimit
@pytest.mark.parametrize(("frames", "name"), [(9, "clip.mp4"), (1, "still.png")])
def test_write_output_past_the_file_size_limit_leaves_nothing(tmp_path, frames, name):
    # 96x96 noise is ~27 kB per frame as PNG and more as a near-lossless video: 8 kB cannot hold either.
    target = tmp_path / name
    result = run_limited(["-c", WRITE_IN_CHILD, str(target), str(frames)], limit=8000)
    assert result.returncode == 3, result.stderr
    code, message = result.stdout.strip().split(" ", 1)
    assert int(code) == errno.EFBIG
    assert f"cannot write '{target}'" in message and "file too large" in message and "nothing was written" in message
    assert listing(tmp_path) == []


@needs_rlimit
def test_write_output_past_the_limit_keeps_the_previous_output(tmp_path):
    target = tmp_path / "clip.mp4"
    write_output(noise(3, 16, 16), target, fps=16)
    before = target.read_bytes()
    result = run_limited(["-c", WRITE_IN_CHILD, str(target), "9"], limit=8000)
    assert result.returncode == 3 and "file too large" in result.stdout
    assert listing(tmp_path) == ["clip.mp4"] and target.read_bytes() == before


# `bernini generate`, with a disk that fills once the model is loaded (loading `--model tiny` writes its tokenizer
# to a temporary folder, which a limit from the start would refuse).
GENERATE_IN_CHILD = textwrap.dedent(
    """
    import resource, sys
    from bernini_diffusers import cli

    limit, load = int(sys.argv[1]), cli.load_pipeline

    def load_then_fill_the_disk(args):
        pipe = load(args)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
        return pipe

    cli.load_pipeline = load_then_fill_the_disk
    sys.exit(cli.main(sys.argv[2:]))
    """
)


@needs_rlimit
def test_generate_past_the_file_size_limit_fails_and_leaves_nothing(tmp_path):
    out = tmp_path / "out" / "x.mp4"
    (tmp_path / "out").mkdir()
    # The tiny model's 5 noisy 32x32 frames take a few kB; 1 kB cannot hold them.
    argv = ["generate", *TINY, "--task_type", "t2v", "--output", str(out)]
    result = run_limited(["-c", GENERATE_IN_CHILD, "1024", *argv], limit=resource.RLIM_INFINITY)
    assert result.returncode == 1, result.stderr  # an environment failure, not a usage error (2)
    assert f"cannot write '{out}'" in result.stderr and "file too large" in result.stderr
    assert listing(tmp_path / "out") == []
    assert result.stdout.strip() == ""  # no path is reported as written


# --- a failing encoder ----------------------------------------------------------------------------------------


def test_encoder_refusing_the_frames_leaves_nothing(tmp_path):
    # libx264 with yuv420p needs even sizes: ffmpeg fails, and its reason is the message.
    target = tmp_path / "odd.mp4"
    with pytest.raises(OutputWriteError, match=r"cannot write '.*odd\.mp4': ffmpeg failed .*width not divisible by 2"):
        write_output(noise(5, 32, 33), target, fps=16)
    assert listing(tmp_path) == []


def test_a_failed_write_removes_the_folders_it_made_and_only_those(tmp_path):
    (tmp_path / "kept").mkdir()
    (tmp_path / "kept" / "mine.txt").write_text("a user's file")
    with pytest.raises(OutputWriteError, match="width not divisible by 2"):
        write_output(noise(5, 32, 33), tmp_path / "kept" / "new" / "deeper" / "odd.mp4", fps=16)
    assert listing(tmp_path) == ["kept"] and listing(tmp_path / "kept") == ["mine.txt"]


def test_encoder_dying_by_signal_is_reported(tmp_path, monkeypatch):
    def killed(pixels, path, fps):
        path.write_bytes(b"\0" * 100)
        return subprocess.CompletedProcess([], -signal.SIGKILL, b"", b"")

    monkeypatch.setattr(media, "_encode_mp4", killed)
    with pytest.raises(OutputWriteError, match=r"ffmpeg failed with signal 9") as info:
        write_output(noise(5), tmp_path / "k.mp4", fps=16)
    assert info.value.errno == errno.EIO
    assert listing(tmp_path) == []


@pytest.mark.parametrize(
    ("log", "code", "words"),
    [
        ("[out#0/mp4 @ 0x1] Error writing trailer: No space left on device", errno.ENOSPC, "no space left on device"),
        ("av_interleaved_write_frame(): Disk quota exceeded", errno.EDQUOT, "disk quota exceeded"),
    ],
)
def test_encoder_system_errors_are_said_in_words(tmp_path, monkeypatch, log, code, words):
    def full(pixels, path, fps):
        path.write_bytes(b"\0" * 10)
        return subprocess.CompletedProcess([], 228, b"", f"[libx264 @ 0x2] frame I:1\n{log}\n".encode())

    monkeypatch.setattr(media, "_encode_mp4", full)
    target = tmp_path / "full.mp4"
    with pytest.raises(OSError, match=f"cannot write '{target}': {words}") as info:
        write_output(noise(5), target, fps=16)
    assert info.value.errno == code and log.split(": ", 1)[1] in str(info.value)
    assert listing(tmp_path) == []


def test_png_write_error_is_said_in_words(tmp_path, monkeypatch):
    def no_space(self, fp, *args, **kwargs):
        Path(fp).write_bytes(b"\x89PNG")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(Image.Image, "save", no_space)
    target = tmp_path / "still.png"
    with pytest.raises(OutputWriteError, match=f"cannot write '{target}': no space left on device") as info:
        write_output(noise(1), target, fps=16)
    assert info.value.errno == errno.ENOSPC
    assert listing(tmp_path) == []


def test_encoder_that_exits_0_with_missing_frames_is_caught(tmp_path, monkeypatch):
    # ffmpeg can log a write error and still exit 0; the frames read back are what counts.
    real = media._encode_mp4
    monkeypatch.setattr(media, "_encode_mp4", lambda pixels, path, fps: real(pixels[:-1], path, fps))
    target = tmp_path / "short.mp4"
    with pytest.raises(OutputWriteError, match=r"'.*short\.mp4': the encoded file holds 8 frame\(s\), expected 9"):
        write_output(noise(9), target, fps=16)
    assert listing(tmp_path) == []


def test_encoder_that_exits_0_with_an_empty_file_is_caught(tmp_path, monkeypatch):
    monkeypatch.setattr(media, "_encode_mp4", lambda pixels, path, fps: subprocess.CompletedProcess([], 0, b"", b""))
    with pytest.raises(OutputWriteError, match=r"does not read back: the file is empty: 0 bytes"):
        write_output(noise(5), tmp_path / "e.mp4", fps=16)
    assert listing(tmp_path) == []


def test_save_and_demo_share_the_verified_writer(tmp_path):
    odd = np.zeros((1, 5, 32, 33, 3), np.float32)
    with pytest.raises(OutputWriteError, match="width not divisible by 2"):
        BerniniPipelineOutput(frames=odd, fps=16, output_type="np").save(tmp_path / "save.mp4")

    class OddPipe:  # the demo checks the request, runs the "model", then writes its frames
        validate_call = BerniniPipeline.validate_call

        def __call__(self, **kwargs):
            return BerniniPipelineOutput(frames=odd, fps=kwargs["fps"], output_type="np")

    request = {**demo.default_values(), **{name: None for name in demo.MEDIA_INPUTS}}
    request.update(task_type="t2v", guidance_mode="t2v_apg", prompt="p", seed=1)
    with pytest.raises(OutputWriteError, match="width not divisible by 2"):
        demo.generate(OddPipe(), request, save_dir=tmp_path / "demo")
    assert listing(tmp_path) == []  # the folder the failed write made is gone too


# --- absurd frame rates ---------------------------------------------------------------------------------------

ABSURD_FPS = [1e300, 1e-9, float("nan"), float("inf"), 0, -16, 0.5, 241]


@pytest.mark.parametrize("fps", ABSURD_FPS)
def test_absurd_fps_is_refused_by_the_pipeline_check(fps):
    with pytest.raises(ValueError, match=r"`fps`=.* must be a number of frames per second from 1 to 240"):
        BerniniPipeline.validate_call(prompt="x", task_type="t2v", fps=fps)


@pytest.mark.parametrize("fps", ["1e300", "1e-9", "nan", "inf", "0", "-1"])
def test_absurd_fps_is_refused_by_the_cli_before_loading(monkeypatch, capsys, tmp_path, fps):
    monkeypatch.setattr(cli, "load_pipeline", lambda args: pytest.fail("the model must not load"))
    code = cli.main(["generate", *TINY, "--task_type", "t2v", "--fps", fps, "--output", str(tmp_path / "x.mp4")])
    assert code == 2
    assert "fps" in capsys.readouterr().err
    assert listing(tmp_path) == []


@pytest.mark.parametrize("fps", [1e300, 1e-9, float("nan"), 0])
def test_absurd_fps_is_refused_by_the_writer(tmp_path, fps):
    with pytest.raises(ValueError, match="`fps`"):
        write_output(noise(5), tmp_path / "x.mp4", fps=fps)
    assert listing(tmp_path) == []


@pytest.mark.parametrize("fps", [1, 240])
def test_the_fps_range_ends_encode(tmp_path, fps):
    out = write_output(noise(5), tmp_path / "x.mp4", fps=fps)
    assert media.probe_video(out).fps == pytest.approx(fps) and media.is_complete_output(out)


# --- bad input media ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bad_media(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bad_media")
    good = make_test_video(root / "good.mp4", num_frames=9)
    data = good.read_bytes()
    files = {"good": good}
    files["empty"] = root / "empty.mp4"
    files["empty"].write_bytes(b"")
    files["truncated"] = root / "truncated.mp4"
    files["truncated"].write_bytes(data[: len(data) // 2])
    files["corrupt header"] = root / "corrupt.mp4"
    files["corrupt header"].write_bytes(b"\0" * 64 + data[64:])
    ffmpeg = imageio_ffmpeg.get_ffmpeg_exe()
    files["audio only"] = root / "audio.mp4"
    subprocess.run([ffmpeg, "-v", "error", "-f", "lavfi", "-i", "sine=duration=0.5", str(files["audio only"])],
                   check=True)  # fmt: skip
    files["0 frames"] = root / "zero_frames.mp4"
    subprocess.run([ffmpeg, "-v", "error", "-i", str(good), "-c", "copy", "-frames:v", "0", str(files["0 frames"])],
                   check=True)  # fmt: skip
    image = make_test_image(root / "good.png", width=48, height=32)
    image_data = image.read_bytes()
    files["image"] = image
    files["image: garbage"] = root / "garbage.png"
    files["image: garbage"].write_bytes(b"not an image at all")
    files["image: empty"] = root / "empty.png"
    files["image: empty"].write_bytes(b"")
    files["image: truncated"] = root / "truncated.png"
    files["image: truncated"].write_bytes(image_data[: len(image_data) // 2])
    return files


BAD_VIDEOS = {
    "empty": "the file is empty: 0 bytes",
    "truncated": "truncated or not a video",
    "corrupt header": "truncated or not a video",
    "0 frames": "no video stream: 0 frames",
    "audio only": "no video stream, only audio",
}
BAD_IMAGES = {"image: garbage": "cannot identify image file", "image: empty": "empty: 0 bytes",
              "image: truncated": ""}  # fmt: skip


def test_good_media_pass_the_probes(bad_media):
    BerniniPipeline.validate_call(prompt="x", task_type="v2v", video=str(bad_media["good"]))
    BerniniPipeline.validate_call(prompt="x", task_type="i2i", image=str(bad_media["image"]),
                                  images=[str(bad_media["image"])])  # fmt: skip


@pytest.mark.parametrize("case", BAD_VIDEOS)
def test_bad_video_is_refused_by_validate_call(bad_media, case):
    path = bad_media[case]
    with pytest.raises(ValueError, match="`video`: not a readable video") as info:
        BerniniPipeline.validate_call(prompt="x", task_type="v2v", video=str(path))
    assert str(path) in str(info.value) and BAD_VIDEOS[case] in str(info.value)
    with pytest.raises(ValueError, match=r"`video\[1\]`: not a readable video"):
        BerniniPipeline.validate_call(prompt="x", task_type="ads2v", video=[str(bad_media["good"]), str(path)])


@pytest.mark.parametrize("case", BAD_VIDEOS)
def test_bad_video_given_to_load_video_is_a_value_error_naming_it(bad_media, case):
    # load_video counts the frames before it decodes them: a file the counter cannot read is still refused by the
    # decode, with the same kind of error as before, whatever the counter said.
    path = bad_media[case]
    with pytest.raises(ValueError, match=r"^`video\[1\]`: (cannot decode video|video has no frames)") as info:
        media.load_video(path, 848, 16, None, argument="video[1]", max_frames=961)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("case", BAD_IMAGES)
def test_bad_image_is_refused_by_validate_call(bad_media, case):
    path = bad_media[case]
    with pytest.raises(ValueError, match="`image`: not a readable image") as info:
        BerniniPipeline.validate_call(prompt="x", task_type="i2i", image=str(path))
    assert str(path) in str(info.value) and BAD_IMAGES[case] in str(info.value)
    with pytest.raises(ValueError, match=r"`images\[1\]`: not a readable image"):
        BerniniPipeline.validate_call(prompt="x", task_type="r2v", images=[str(bad_media["image"]), str(path)])


@pytest.mark.parametrize(
    ("case", "flags", "named"),
    [(case, ["--task_type", "v2v", "--video"], "`video`") for case in BAD_VIDEOS]
    + [(case, ["--task_type", "i2i", "--image"], "`image`") for case in BAD_IMAGES]
    + [("image: garbage", ["--task_type", "r2v", "--images"], "`images[0]`")],
)
def test_bad_media_are_refused_by_the_cli_before_loading(monkeypatch, capsys, tmp_path, bad_media, case, flags,
                                                         named):  # fmt: skip
    monkeypatch.setattr(cli, "load_pipeline", lambda args: pytest.fail("the model must not load"))
    out = tmp_path / "out"
    assert cli.main(["generate", *TINY, *flags, str(bad_media[case]), "--output", f"{out}/o.mp4"]) == 2
    err = capsys.readouterr().err
    assert named.strip("`") in err and str(bad_media[case]) in err
    assert not out.exists() or listing(out) == []


# --- reruns of a batch ----------------------------------------------------------------------------------------


def test_batch_rerun_redoes_empty_and_unreadable_outputs(monkeypatch, capsys, tmp_path):
    outputs = {name: tmp_path / f"{name}.mp4" for name in ("done", "empty", "cut", "image")}
    outputs["image"] = tmp_path / "image.png"
    write_output(noise(5), outputs["done"], fps=16)
    outputs["empty"].write_bytes(b"")
    whole = write_output(noise(5), tmp_path / "whole.mp4", fps=16).read_bytes()
    (tmp_path / "whole.mp4").unlink()
    outputs["cut"].write_bytes(whole[: len(whole) - 200])  # its index, at the end, is cut off
    outputs["image"].write_bytes(b"\x89PNG\r\n\x1a\n")  # a PNG signature and nothing else
    batch = tmp_path / "batch.jsonl"
    batch.write_text("".join(
        json.dumps({"task_type": "t2i" if name == "image" else "t2v", "prompt": name, "output": str(path)}) + "\n"
        for name, path in outputs.items()
    ))  # fmt: skip
    before = outputs["done"].read_bytes()
    calls = []

    def fake_pipe(**kwargs):
        calls.append(kwargs["prompt"])
        frames = 1 if kwargs["task_type"] == "t2i" else 5
        return SimpleNamespace(frames=noise(frames, seed=len(calls))[None] / 255.0, fps=kwargs["fps"])

    monkeypatch.setattr(cli, "load_pipeline", lambda args: fake_pipe)
    assert cli.main(["generate", *TINY, "--inputs", str(batch)]) == 0
    err = capsys.readouterr().err
    assert calls == ["empty", "cut", "image"]
    for name in ("empty", "cut", "image"):
        assert f"{outputs[name]} exists but is empty or unreadable: generating it again" in err
        assert media.is_complete_output(outputs[name])
    assert "1 skipped" in err and "3 done" in err
    assert outputs["done"].read_bytes() == before
    assert sorted(listing(tmp_path)) == sorted(["batch.jsonl", *(p.name for p in outputs.values())])

    # A second rerun finds everything complete: nothing is generated and the model does not load.
    monkeypatch.setattr(cli, "load_pipeline", lambda args: pytest.fail("the model must not load"))
    assert cli.main(["generate", *TINY, "--inputs", str(batch)]) == 0
    assert "4 skipped" in capsys.readouterr().err


def test_is_complete_output(tmp_path, bad_media):
    assert media.is_complete_output(bad_media["good"]) and media.is_complete_output(bad_media["image"])
    for case in [*BAD_VIDEOS, *BAD_IMAGES]:
        assert not media.is_complete_output(bad_media[case]), case
    assert not media.is_complete_output(tmp_path)  # a folder
    assert not media.is_complete_output(tmp_path / "missing.mp4")


def test_an_image_given_as_a_video_is_refused_before_loading(monkeypatch, capsys, tmp_path):
    # ffmpeg reads a PNG as a one-frame video, but the video reader refuses the name: this used to fail after loading.
    monkeypatch.setattr(cli, "load_pipeline", lambda args: pytest.fail("the model must not load"))
    image = make_test_image(tmp_path / "still.png")
    out = tmp_path / "out"
    assert cli.main(["generate", *TINY, "--task_type", "v2v", "--video", str(image), "--output", f"{out}/o.mp4"]) == 2
    err = capsys.readouterr().err
    assert f"--video: not a readable video: '{image}' (the video reader refuses it" in err and "Traceback" not in err
    assert not out.exists()
