"""Tests of media loading, resizing, frame sampling and output writing."""

from __future__ import annotations

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
