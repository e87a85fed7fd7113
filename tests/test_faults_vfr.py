"""Media that lie about their length: a variable-frame-rate clip is sampled by its frames' presentation times, and
the pre-load length check (`check_video_length`, used by `validate_call` with context windows) agrees with
`load_video` on it. The VFR file is made here by ffmpeg: 2 s at 30 fps, then 4 s at 5 fps (80 frames, 6 s).
"""

from __future__ import annotations

import subprocess

import imageio_ffmpeg
import numpy as np
import pytest

from bernini_diffusers import media, pipeline_bernini
from bernini_diffusers.pipeline_bernini import BerniniPipeline
from bernini_diffusers.testing import make_test_video


@pytest.fixture(scope="module")
def vfr(tmp_path_factory):
    path = tmp_path_factory.mktemp("vfr") / "vfr.mp4"
    # testsrc shows a frame counter; `select` keeps all of the first 2 s and every 6th frame after, and
    # `-fps_mode vfr` keeps their timestamps: 60 frames 1/30 s apart, then 20 frames 1/5 s apart.
    subprocess.run(
        [imageio_ffmpeg.get_ffmpeg_exe(), "-v", "error", "-y", "-f", "lavfi", "-i", "testsrc=size=64x48:rate=30",
         "-t", "6", "-vf", "select='lt(t,2)+not(mod(n,6))'", "-fps_mode", "vfr", "-pix_fmt", "yuv420p",
         "-c:v", "libx264", "-g", "1", str(path)],
        check=True,
    )  # fmt: skip
    return path


def test_the_file_is_variable_rate(vfr):
    times = media._frame_times(vfr)
    assert len(times) == 80 and times[59] == pytest.approx(59 / 30) and times[-1] == pytest.approx(5.8)
    assert media._variable_rate_times(vfr, "video") == times


@pytest.mark.parametrize("fps, frames", [(16, 97), (30, 181), (5, 29)])
def test_duration_gives_the_frame_count(vfr, fps, frames):
    # 6 s at `fps`: 4k+1 frames, as a constant-rate 6 s clip gives (6 s at 16 fps: 97 frames, not 12.4 s of them)
    clip = media.load_video(vfr, 64, fps, None)
    assert clip.shape == (3, frames, 48, 64)
    assert (frames - 1) / fps == pytest.approx(6, abs=4 / fps)


def test_frames_are_taken_by_time(vfr, tmp_path):
    # At 5 fps each sample of the 6 s is the frame on screen then: in the 30 fps part every 6th source frame, in the
    # 5 fps part each frame once. The frames are compared with a constant-rate decode of the same file at 5 fps.
    clip = media.load_video(vfr, 64, 5, None)
    cfr = tmp_path / "cfr5.mp4"
    subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-v", "error", "-y", "-i", str(vfr), "-vf", "fps=5",
                    "-c:v", "libx264", "-qp", "0", str(cfr)], check=True)  # fmt: skip
    reference = media.load_video(cfr, 64, 5, None)
    assert clip.shape == reference.shape == (3, 29, 48, 64)
    assert (clip - reference).abs().mean() < 0.05  # the same frames (lossless re-encode, yuv rounding only)


def test_num_frames_caps_the_timed_clip(vfr):
    assert media.load_video(vfr, 64, 16, 33).shape[1] == 33
    assert media.load_video(vfr, 64, 16, 2).shape[1] == 1


@pytest.mark.parametrize("limit", [61, 96, 97, 200])
def test_pre_load_check_agrees_with_load_video(vfr, limit):
    def outcome(call):
        try:
            call()
        except ValueError as err:
            return str(err)
        return None

    checked = outcome(lambda: media.check_video_length(vfr, 16, None, limit))
    loaded = outcome(lambda: media.load_video(vfr, 64, 16, None, max_frames=limit))
    assert checked == loaded
    if limit < 97:
        assert checked == (
            f"`video`: the clip is 97 frames at 16 fps (6.0 s), longer than the limit of {limit} frames "
            f"({(limit - 1) / 16:.1f} s at 16 fps); trim the clip or give a lower `fps`"
        )


def test_validate_call_with_windows_refuses_the_long_vfr_clip_before_loading(vfr, monkeypatch):
    monkeypatch.setattr(pipeline_bernini, "MAX_WINDOWED_FRAMES", 81)  # 5 s at 16 fps, under the clip's 6 s
    with pytest.raises(ValueError, match=r"`video`: the clip is 97 frames at 16 fps \(6.0 s\), longer than the limit"):
        BerniniPipeline.validate_call(prompt="p", task_type="v2v", video=str(vfr), fps=16, context_frames=33)
    monkeypatch.setattr(pipeline_bernini, "MAX_WINDOWED_FRAMES", 97)
    BerniniPipeline.validate_call(prompt="p", task_type="v2v", video=str(vfr), fps=16, context_frames=33)


def test_constant_rate_files_keep_the_index_sampling(tmp_path):
    path = make_test_video(tmp_path / "cfr.mp4", num_frames=21, fps=24)
    assert media._variable_rate_times(path, "video") is None
    frames, video_fps = media.read_video(path)
    indices = media.sample_frame_indices(len(frames), video_fps, 16, None)
    expected = media.to_model_tensor([frames[i] for i in indices], 64)
    assert np.array_equal(media.load_video(path, 64, 16, None).numpy(), expected.numpy())


def test_untimeable_file_is_refused_naming_it(vfr, monkeypatch):
    monkeypatch.setattr(media, "_decode_pass", lambda reader, sampler, path, argument: reader.close() or 79)
    with pytest.raises(ValueError, match=r"vfr.mp4. has a variable frame rate, and its 80 timed frames decode as 79"):
        media.load_video(vfr, 64, 16, None)
