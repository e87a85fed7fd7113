"""Tests of media loading, resizing, frame sampling and output writing."""

from __future__ import annotations

import os
import subprocess
import weakref

import imageio_ffmpeg
import numpy as np
import pytest
import torch
from PIL import Image

from bernini_diffusers import media
from bernini_diffusers.media import (
    load_image,
    load_video,
    make_divisible,
    read_video,
    sample_frame_indices,
    target_size,
    to_model_tensor,
    write_output,
)


# --- sizes -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [(40, 32), (56, 64), (24, 32), (8, 16), (1, 16), (0, 16), (16, 16), (848, 848), (477, 480), (857, 864)],
)
def test_make_divisible_rounds_half_to_even(value, expected):
    assert make_divisible(value) == expected


def test_make_divisible_other_stride():
    assert make_divisible(12, stride=8) == 16  # 1.5 -> 2
    assert make_divisible(20, stride=8) == 16  # 2.5 -> 2


@pytest.mark.parametrize(
    ("size", "max_size", "expected"),
    [
        ((1920, 1080), 848, (848, 480)),  # scale 848/1920; h = 477 -> 480
        ((1080, 1920), 848, (480, 848)),
        ((40, 60), 848, (32, 64)),  # never upscaled; 40 -> 32 by banker's rounding
        ((100, 100), 848, (96, 96)),
        ((640, 480), 512, (512, 384)),
    ],
)
def test_target_size(size, max_size, expected):
    assert target_size(*size, max_size) == expected


def test_target_size_second_rescale():
    # scale 248/253: w = round(233.3) = 233 -> 240, h = 248 -> 256 > 248, so rescale by 248/256:
    # w = round(232.5) = 232 -> 224, h = round(248.0) -> 256. The long side may still exceed the limit.
    assert target_size(238, 253, 248) == (224, 256)


# --- frame sampling ----------------------------------------------------------------------------


def test_sample_resampled_to_target_fps():
    # 20 frames at 24 fps -> 13.33 frames at 16 fps -> 13 (4k+1)
    assert sample_frame_indices(20, 24.0, 16.0, 81) == [0, 2, 3, 5, 6, 8, 10, 11, 13, 14, 16, 17, 19]


def test_sample_long_video_is_cut_not_squeezed():
    assert sample_frame_indices(17, 16.0, 16.0, 13) == list(range(13))
    assert sample_frame_indices(1000, 16.0, 16.0, 81) == list(range(81))


def test_sample_same_fps_past_the_end_is_clamped():
    # 20 frames -> span 21, 21 samples over 0..20; index 20 does not exist and becomes 19
    assert sample_frame_indices(20, 16.0, 16.0, 81) == list(range(20)) + [19]


def test_sample_minimum_five_frames():
    # 3 frames at 24 fps -> 2 at 16 fps -> 1 -> raised to 5 over 0..2 (numpy rounds halves to even)
    assert sample_frame_indices(3, 24.0, 16.0, 81) == [0, 0, 1, 2, 2]


def test_sample_num_frames_cap_is_four_k_plus_one():
    assert sample_frame_indices(100, 16.0, 16.0, 10) == list(range(9))
    assert sample_frame_indices(100, 16.0, 16.0, 1) == [0]


def test_sample_rejects_bad_num_frames():
    with pytest.raises(ValueError, match="num_frames"):
        sample_frame_indices(20, 16.0, 16.0, 0)


# --- images ------------------------------------------------------------------------------------


def test_load_image_white_l_is_plus_one():
    out = load_image(Image.new("L", (64, 32), 255), 848)
    assert out.shape == (3, 1, 32, 64)
    assert out.dtype == torch.float32
    assert torch.all(out == 1.0)


def test_load_image_rgba_alpha_dropped():
    out = load_image(Image.new("RGBA", (32, 32), (255, 0, 0, 0)), 848)
    assert torch.all(out[0] == 1.0)
    assert torch.all(out[1:] == -1.0)


def test_load_image_matches_direct_pil_bicubic(tmp_path):
    rng = np.random.default_rng(0)
    src = Image.fromarray(rng.integers(0, 256, (90, 150, 3), dtype=np.uint8), "RGB")
    src.save(tmp_path / "in.png")
    w, h = target_size(150, 90, 64)
    assert (w, h) == (64, 32)  # scale 64/150: h = round(38.4) = 38 -> 32
    ref = np.asarray(src.resize((w, h), Image.BICUBIC), dtype=np.float32) / 255.0 * 2.0 - 1.0
    expected = torch.from_numpy(ref).permute(2, 0, 1)[:, None]
    assert torch.equal(load_image(tmp_path / "in.png", 64), expected)
    assert torch.equal(load_image(str(tmp_path / "in.png"), 64), expected)


def test_load_image_no_resize_when_size_fits():
    arr = np.arange(32 * 16 * 3, dtype=np.uint8).reshape(16, 32, 3)
    out = load_image(Image.fromarray(arr, "RGB"), 848)
    assert torch.equal(out[:, 0].permute(1, 2, 0), torch.from_numpy(arr.astype(np.float32)) / 255.0 * 2.0 - 1.0)


def test_load_image_missing_file_names_argument(tmp_path):
    missing = tmp_path / "x.png"
    with pytest.raises(FileNotFoundError, match=r"`images\[1\]`.*x\.png"):
        load_image(missing, 848, argument="images[1]")


def test_load_image_not_an_image_names_argument(tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image at all")
    with pytest.raises(ValueError, match=r"`ref`.*bad\.png"):
        load_image(bad, 848, argument="ref")


def test_load_image_wrong_type_names_argument():
    with pytest.raises(ValueError, match=r"`image`.*int"):
        load_image(42, 848)


def test_to_model_tensor_resizes_all_frames_to_first_size():
    frames = [Image.new("RGB", (64, 48), (0, 0, 0)), Image.new("RGB", (80, 80), (255, 255, 255))]
    out = to_model_tensor(frames, 32)
    assert out.shape == (3, 2, 32, 32)  # 64x48 at 32: (32, 24) -> 24 rounds to 32
    assert torch.all(out[:, 0] == -1.0) and torch.all(out[:, 1] == 1.0)


# --- video -------------------------------------------------------------------------------------


def _gradient_video(t: int, h: int, w: int) -> np.ndarray:
    ramp = np.linspace(0.1, 0.9, t, dtype=np.float32)[:, None, None, None]
    return np.broadcast_to(ramp, (t, h, w, 3)).copy()


def test_video_round_trip(tmp_path):
    written = write_output(_gradient_video(9, 48, 32), tmp_path / "sub" / "clip.mp4", fps=8)
    assert written == tmp_path / "sub" / "clip.mp4" and written.is_file()
    frames, fps = read_video(written)
    assert len(frames) == 9
    assert fps == pytest.approx(8.0)
    assert frames[0].size == (32, 48)
    # Near-lossless encode of a flat grey: values survive within a couple of levels.
    assert abs(np.asarray(frames[4]).astype(int).mean() - int(0.5 * 255)) <= 2

    # 9 frames at 8 fps resampled to 16 fps -> 18 -> 17 samples over 0..8
    out = load_video(written, 848, fps=16, num_frames=81)
    assert out.shape == (3, 17, 48, 32)
    assert out.dtype == torch.float32 and out.min() >= -1.0 and out.max() <= 1.0


def test_load_video_in_memory_inputs_agree():
    arr = (np.arange(7 * 16 * 16 * 3) % 256).astype(np.uint8).reshape(7, 16, 16, 3)
    from_array = load_video(arr, 848, fps=16, num_frames=81)
    from_list = load_video(list(arr), 848, fps=16, num_frames=81)
    from_pil = load_video([Image.fromarray(f) for f in arr], 848, fps=16, num_frames=81)
    assert from_array.shape == (3, 5, 16, 16)  # 7 -> 5 (4k+1)
    assert torch.equal(from_array, from_list) and torch.equal(from_array, from_pil)
    assert torch.equal(from_array[:, 4], torch.from_numpy(arr[4].astype(np.float32)).permute(2, 0, 1) / 255 * 2 - 1)


def test_load_video_bad_inputs_name_argument(tmp_path):
    with pytest.raises(ValueError, match="`clip`"):
        load_video([], 848, 16, 81, argument="clip")
    with pytest.raises(ValueError, match="`clip`"):
        load_video(3.5, 848, 16, 81, argument="clip")
    with pytest.raises(ValueError, match="`clip`"):
        load_video([np.zeros((4, 4, 3), np.float32)], 848, 16, 81, argument="clip")
    with pytest.raises(FileNotFoundError, match=r"`clip`.*nope\.mp4"):
        load_video(tmp_path / "nope.mp4", 848, 16, 81, argument="clip")
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"garbage" * 10)
    with pytest.raises(ValueError, match=r"`clip`.*bad\.mp4"):
        read_video(bad, argument="clip")


# --- output ------------------------------------------------------------------------------------


def test_write_single_frame_goes_to_png(tmp_path):
    frame = np.full((1, 16, 24, 3), 0.999, dtype=np.float32)
    written = write_output(frame, tmp_path / "x.mp4", fps=16)
    assert written == tmp_path / "x.png"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.png"]
    with Image.open(written) as img:
        data = np.asarray(img)
    assert data.shape == (16, 24, 3)
    assert np.all(data == 254)  # truncation: 0.999 * 255 = 254.7 -> 254


def test_write_multi_frame_png_path_becomes_mp4(tmp_path):
    written = write_output(_gradient_video(3, 16, 16), tmp_path / "y.png", fps=8)
    assert written == tmp_path / "y.mp4" and written.is_file()


def test_write_accepts_pil_and_uint8(tmp_path):
    img = Image.new("RGB", (8, 8), (10, 20, 30))
    written = write_output([img], tmp_path / "p.png", fps=8)
    with Image.open(written) as back:
        assert back.getpixel((0, 0)) == (10, 20, 30)
    written = write_output(np.full((1, 8, 8, 3), 7, np.uint8), tmp_path / "u.png", fps=8)
    with Image.open(written) as back:
        assert back.getpixel((3, 3)) == (7, 7, 7)


def test_failed_write_leaves_nothing(tmp_path, monkeypatch):
    def broken_encoder(pixels, path, fps):
        path.write_bytes(b"partial")
        raise RuntimeError("encoder died")

    monkeypatch.setattr(media, "_encode_mp4", broken_encoder)
    with pytest.raises(RuntimeError, match="encoder died"):
        write_output(_gradient_video(3, 16, 16), tmp_path / "z.mp4", fps=8)
    assert list(tmp_path.iterdir()) == []


def test_failed_write_keeps_previous_output(tmp_path, monkeypatch):
    target = tmp_path / "keep.mp4"
    target.write_bytes(b"old")
    monkeypatch.setattr(media, "_encode_mp4", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError):
        write_output(_gradient_video(3, 16, 16), target, fps=8)
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["keep.mp4"]


def test_video_encoding_is_imageios_official_one(tmp_path):
    # The writer runs ffmpeg itself (to see its exit status) with the command imageio builds for the official
    # renderer's call: the bytes must be the same, at a whole and at a fractional rate.
    import imageio

    pixels = (np.random.default_rng(0).random((9, 32, 48, 3)) * 255).astype(np.uint8)
    for fps in (16, 23.976):
        ours = write_output(pixels, tmp_path / "ours.mp4", fps=fps)
        imageio.mimwrite(
            tmp_path / "official.mp4", list(pixels), codec="libx264", fps=fps, quality=10, macro_block_size=1,
            output_params=["-pix_fmt", "yuv420p", "-crf", "8"],
        )
        assert ours.read_bytes() == (tmp_path / "official.mp4").read_bytes()


def test_probes_accept_good_media(tmp_path):
    video = write_output(_gradient_video(9, 32, 48), tmp_path / "v.mp4", fps=16)
    probe = media.probe_video(video, "video")
    assert probe.fps == 16 and probe.size == (48, 32) and probe.num_frames == 9
    image = write_output(_gradient_video(1, 32, 48), tmp_path / "i.png", fps=16)
    assert media.probe_image(image, "image") == (48, 32)
    assert media.is_complete_output(video) and media.is_complete_output(image)
    assert not media.is_complete_output(tmp_path / "missing.mp4")


@pytest.mark.parametrize("fps", [1, 23.976, 240, np.float32(16)])
def test_check_fps_accepts_the_range(fps):
    assert media.check_fps(fps) == pytest.approx(float(fps))


@pytest.mark.parametrize("fps", [0, -16, 0.5, 241, 1e300, 1e-9, float("nan"), float("inf"), True, "16", None])
def test_check_fps_refuses_the_rest(fps):
    with pytest.raises(ValueError, match=r"`fps`=.*from 1 to 240"):
        media.check_fps(fps)


# --- long videos: sampling while decoding ----------------------------------------------------------


def _old_to_model_tensor(frames, max_image_size):
    """`to_model_tensor` as it was before it filled its result frame by frame (float32 copies, then arithmetic)."""
    width, height = target_size(*frames[0].size, max_image_size)
    arrays = []
    for frame in frames:
        frame = frame if frame.mode == "RGB" else frame.convert("RGB")
        if frame.size != (width, height):
            frame = frame.resize((width, height), Image.BICUBIC)
        arrays.append(np.asarray(frame, dtype=np.float32))
    pixels = torch.from_numpy(np.stack(arrays)) / 255.0
    pixels = pixels * 2.0 - 1.0
    return pixels.permute(3, 0, 1, 2).contiguous()


def _old_load_video(video, max_image_size, fps, num_frames):
    """`load_video` as it was: every frame of the file read, then sampled, then converted."""
    if isinstance(video, (str, os.PathLike)):
        frames, video_fps = read_video(video)
    else:
        frames = [f.convert("RGB") if isinstance(f, Image.Image) else Image.fromarray(f, "RGB") for f in video]
        video_fps = fps
    return _old_to_model_tensor([frames[i] for i in sample_frame_indices(len(frames), video_fps, fps, num_frames)],
                                max_image_size)


def _noise_video(path, frames, width, height, fps, seed=0):
    """A clip whose frames all differ (so a wrong frame is seen), written as the renderer writes its outputs."""
    pixels = np.random.default_rng(seed).integers(0, 256, (frames, height, width, 3), dtype=np.uint8)
    return write_output(pixels, path, fps)


class _ReaderSpy:
    """Wraps media's video reader: counts the frames decoded and the PIL images alive as each frame arrives."""

    def __init__(self, monkeypatch):
        self.decoded = 0
        self.most_images_alive = 0
        self.images = []  # weak references: PIL images are unhashable, so no WeakSet
        get_reader, init = media.imageio.get_reader, Image.Image.__init__
        spy = self

        def tracked_init(image, *args, **kwargs):
            init(image, *args, **kwargs)
            spy.images.append(weakref.ref(image))

        class Reader:
            def __init__(self, *args, **kwargs):
                self.reader = get_reader(*args, **kwargs)

            def __iter__(self):
                for frame in self.reader:
                    spy.decoded += 1
                    spy.most_images_alive = max(spy.most_images_alive, spy.alive())
                    yield frame

            def __getattr__(self, name):
                return getattr(self.reader, name)


        monkeypatch.setattr(Image.Image, "__init__", tracked_init)
        monkeypatch.setattr(media.imageio, "get_reader", Reader)

    def alive(self) -> int:
        return sum(ref() is not None for ref in self.images)


@pytest.mark.parametrize(
    ("source_fps", "fps", "num_frames", "size", "max_image_size"),
    [
        (24, 16, 81, (48, 32), 848),  # resampled down: frames skipped
        (8, 16, 81, (48, 32), 848),  # resampled up: frames repeated
        (16, 16, 81, (48, 32), 848),  # same rate: the span rounds up and the last frame is repeated
        (16, 16, 9, (48, 32), 848),  # cut at num_frames
        (24, 16, None, (200, 120), 64),  # resized (200x120 -> 64x32) and not cut
    ],
)
def test_load_video_file_is_bit_identical_to_reading_every_frame(tmp_path, source_fps, fps, num_frames, size,
                                                                 max_image_size):
    clip = _noise_video(tmp_path / "clip.mp4", 22, *size, source_fps)
    expected = _old_load_video(clip, max_image_size, fps, num_frames)
    out = load_video(clip, max_image_size, fps, num_frames)
    assert out.dtype == torch.float32 and out.is_contiguous()
    assert out.shape == expected.shape and torch.equal(out, expected)


def test_to_model_tensor_and_in_memory_frames_are_bit_identical_to_before():
    rng = np.random.default_rng(1)
    arrays = list(rng.integers(0, 256, (11, 40, 72, 3), dtype=np.uint8))
    mixed = [Image.fromarray(a) for a in arrays]
    mixed[3], mixed[5] = mixed[3].convert("L"), mixed[5].convert("RGBA")  # modes are made RGB per frame
    mixed[7] = mixed[7].resize((50, 30))  # a frame of another size is resized to the first one's
    assert torch.equal(to_model_tensor(mixed, 32), _old_to_model_tensor(mixed, 32))
    for video in (arrays, np.stack(arrays), mixed):
        for num_frames in (None, 5):
            assert torch.equal(load_video(video, 32, 16, num_frames), _old_load_video(list(video), 32, 16, num_frames))


def test_num_frames_none_takes_the_whole_resampled_source(tmp_path):
    assert sample_frame_indices(1000, 16.0, 16.0, None) == list(range(1000)) + [999]
    assert len(sample_frame_indices(1800, 30.0, 16.0, None)) == 961  # 60 s at 30 fps -> 960 at 16 fps -> 4k+1
    clip = _noise_video(tmp_path / "clip.mp4", 30, 32, 16, 24)  # 30 frames at 24 fps -> 20 at 16 fps -> 21
    assert load_video(clip, 848, 16, None).shape == (3, 21, 16, 32)
    assert load_video(clip, 848, 16, 17).shape == (3, 17, 16, 32)
    assert load_video(clip, 848, 16, 9).shape == (3, 9, 16, 32)
    assert load_video(np.zeros((30, 16, 32, 3), np.uint8), 848, 16, None).shape == (3, 29, 16, 32)


def test_a_file_longer_than_max_frames_is_refused_before_decoding(tmp_path, monkeypatch):
    clip = _noise_video(tmp_path / "long.mp4", 34, 32, 16, 16)  # 34 frames at 16 fps -> 33 frames, 2 s
    assert load_video(clip, 848, 16, None, max_frames=33).shape[1] == 33  # at the limit: accepted
    spy = _ReaderSpy(monkeypatch)
    with pytest.raises(ValueError) as info:
        load_video(clip, 848, 16, None, argument="video[1]", max_frames=17)
    message = str(info.value)
    assert message.startswith("`video[1]`: the clip is 33 frames at 16 fps (2.0 s)")
    assert "limit of 17 frames (1.0 s at 16 fps)" in message and "trim the clip" in message and "`fps`" in message
    assert spy.decoded == 0  # counted, not decoded
    # At 8 fps the same file is 17 frames: the lower rate fits; the num_frames cap counts before the limit.
    assert load_video(clip, 848, 8, None, max_frames=17).shape[1] == 17
    assert load_video(clip, 848, 16, 17, max_frames=17).shape[1] == 17


def test_in_memory_frames_longer_than_max_frames_are_refused():
    frames = [np.zeros((16, 16, 3), np.uint8)] * 40  # -> 41 frames at 16 fps (the span rounds up to 4k+1)
    with pytest.raises(ValueError, match=r"^`clip`: the clip is 41 frames at 16 fps \(2\.5 s\), longer than the "
                                         r"limit of 33 frames \(2\.0 s at 16 fps\); trim the clip"):
        load_video(frames, 848, 16, None, argument="clip", max_frames=33)
    assert load_video(frames, 848, 16, 33, argument="clip", max_frames=33).shape[1] == 33
    with pytest.raises(ValueError, match="`max_frames`"):
        load_video(frames, 848, 16, None, max_frames=0)


def test_decoding_keeps_no_source_frame_but_the_current_one(tmp_path, monkeypatch):
    clip = _noise_video(tmp_path / "clip.mp4", 40, 96, 64, 16)
    spy = _ReaderSpy(monkeypatch)
    out = load_video(clip, 32, 16, 5)  # 5 of 40 frames, each resized to 32x16 as decoded
    assert out.shape == (3, 5, 16, 32) and spy.decoded == 40
    # Reading every frame first held all 40 as PIL images; now at most the decoded frame and its resized copy live.
    assert spy.most_images_alive <= 2
    assert spy.alive() == 0


@pytest.mark.parametrize("count", [9, 5, 60, "fails"])
def test_a_wrong_frame_count_still_gives_the_true_frames(tmp_path, monkeypatch, count):
    clip = _noise_video(tmp_path / "clip.mp4", 22, 32, 16, 24)
    expected = _old_load_video(clip, 848, 16, None)

    def counted(path):
        if count == "fails":
            raise RuntimeError("Could not get number of frames")
        return count

    monkeypatch.setattr(media, "_count_frames", counted)
    assert torch.equal(load_video(clip, 848, 16, None), expected)
    assert torch.equal(load_video(clip, 848, 24, 5), _old_load_video(clip, 848, 24, 5))
    # The length is checked on the frames read: a count too low does not let a long clip in, one too high does
    # not keep a short one out.
    with pytest.raises(ValueError, match=r"`video`: the clip is 13 frames at 16 fps"):
        load_video(clip, 848, 16, None, max_frames=9)
    assert torch.equal(load_video(clip, 848, 16, None, max_frames=13), expected)


def test_a_variable_frame_rate_file_gives_the_frames_the_reader_yields(tmp_path):
    # ffmpeg counts this file's 20 coded frames; the reader's constant-rate output repeats some of them.
    ffmpeg = imageio_ffmpeg.get_ffmpeg_exe()
    clip = tmp_path / "vfr.mp4"
    subprocess.run(
        [ffmpeg, "-v", "error", "-f", "lavfi", "-i", "testsrc=size=32x32:rate=10", "-frames:v", "20",
         "-vf", "setpts='if(lt(N,10),N*2,10+N)/(10*TB)'", "-fps_mode", "vfr", "-c:v", "libx264",
         "-pix_fmt", "yuv420p", str(clip)],
        check=True,
    )  # fmt: skip
    frames, _ = read_video(clip)  # the reader's constant 10 fps output, which repeats the slow part's frames
    assert imageio_ffmpeg.count_frames_and_secs(str(clip))[0] != len(frames)  # the case this test is about
    # Sampled by time: 3 s are 49 frames at 16 fps (the reader's 30 frames taken as 10 fps would say the same, but
    # the frame count, 20, would say 2 s), each one of the file's frames, in order, converted bit for bit.
    source = _old_to_model_tensor(frames, 848)
    for num_frames, length in ((None, 49), (9, 9)):
        clip_tensor = load_video(clip, 848, 16, num_frames)
        assert clip_tensor.shape[1] == length
        picks = []
        for k in range(length):
            matches = [j for j in range(len(frames)) if torch.equal(clip_tensor[:, k], source[:, j])]
            assert matches, f"frame {k} is none of the file's frames"
            picks.append(matches[-1])
        assert picks == sorted(picks) and picks[-1] >= (28 if num_frames is None else 0)
