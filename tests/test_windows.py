"""Temporal context windows (`context_frames`, `context_overlap`; docs/design.md#long-videos): the plan covers every
latent frame once in weight, the seams blend, a window as long as the clip is the plain call bit for bit, each window
is a sequence of its own (RoPE from 0, its slice of the video conditions), and bad settings fail before model work."""

from __future__ import annotations

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import UniPCMultistepScheduler

from bernini_diffusers import BerniniPipeline, pipeline_bernini
from bernini_diffusers.guidance import Guidance
from bernini_diffusers.testing import tiny_pipeline
from bernini_diffusers.windows import (
    blend_weights,
    check_context,
    condition_span,
    context_windows,
    latent_frames,
    plan_windows,
)

SMALL = dict(height=32, width=48, num_inference_steps=2, output_type="latent")
# A 33-frame source is 9 latent frames; windows of 17 frames (5 latents) overlapping by 8 (2 latents) make 3 windows:
# [0, 5), [2, 7), [4, 9).
WINDOWS = dict(context_frames=17, context_overlap=8)
SPANS = ((0, 5), (2, 7), (4, 9))


def _gen(seed: int = 42) -> torch.Generator:
    return torch.Generator("cpu").manual_seed(seed)


def _video(frames: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (frames, 32, 48, 3), dtype=np.uint8)


def _image(width: int, height: int, seed: int) -> PIL.Image.Image:
    return PIL.Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def pipe():
    pipe = tiny_pipeline()
    pipe.set_progress_bar_config(disable=True)
    return pipe


class Forwards:
    """Every expert forward of a call: which expert, the target's and each condition's latent frames, the output."""

    def __init__(self, pipe):
        self.calls = []
        self.handles = []
        for name in ("transformer", "transformer_2"):
            model = getattr(pipe, name)
            self.handles.append(model.register_forward_hook(self._record(name), with_kwargs=True))

    def _record(self, name):
        def hook(module, args, kwargs, output):
            conditions = kwargs.get("condition_latents") or []
            self.calls.append(
                {
                    "expert": name,
                    "frames": kwargs["hidden_states"].shape[2],
                    "conditions": [c.shape[2] for c in conditions],
                    "ids": list(kwargs.get("condition_source_ids") or []),
                    "output": output[0].detach().clone(),
                }
            )

        return hook

    def remove(self):
        for handle in self.handles:
            handle.remove()


# ------------------------------------------------------------------------------------------------ the plan


@pytest.mark.parametrize("clip", [1, 5, 6, 9, 21, 22, 30, 41, 60, 121])
@pytest.mark.parametrize("window, overlap", [(2, 0), (2, 1), (5, 2), (21, 4), (21, 0), (21, 10), (3, 2)])
def test_windows_cover_every_latent_frame_exactly_once_in_weight(clip, window, overlap):
    spans = plan_windows(clip, window, overlap)
    weights = blend_weights(spans, clip)
    assert spans[0][0] == 0 and spans[-1][1] == clip
    assert all(end - start == min(window, clip) for start, end in spans)
    for (_, end), (start, _) in zip(spans, spans[1:]):
        assert end - start >= overlap  # neighbours share at least the asked overlap: no gap, no hard seam
    if len(spans) > 1:
        # The fewest windows: one fewer, even packed as tightly as allowed, would not reach the end.
        assert (len(spans) - 1) * (window - overlap) + overlap < clip
    torch.testing.assert_close(weights.sum(dim=0), torch.ones(clip, dtype=torch.float64), rtol=0, atol=1e-12)
    for j, (start, end) in enumerate(spans):
        assert torch.all(weights[j, :start] == 0) and torch.all(weights[j, end:] == 0)
        assert torch.all(weights[j, start:end] > 0)


def test_overlap_frames_weigh_both_windows_and_the_rest_one():
    spans = plan_windows(30, 21, 4)
    assert spans == ((0, 21), (9, 30))
    weights = blend_weights(spans, 30)
    shared = weights[:, 9:21]
    assert torch.all((shared > 0) & (shared < 1))
    assert torch.all(weights[0, :9] == 1) and torch.all(weights[1, 21:] == 1)
    # sin^2 in, cos^2 out: the first window's weight falls monotonically across the overlap, symmetric about its middle
    assert torch.all(shared[0, 1:] < shared[0, :-1])
    torch.testing.assert_close(shared[0], shared[1].flip(0), rtol=0, atol=1e-12)


def test_a_clip_within_one_window_is_one_span_of_weight_one():
    windows = context_windows(9, 81, 16)
    assert windows.spans == ((0, 9),) and torch.equal(windows.weights, torch.ones(1, 9, dtype=torch.float64))
    assert context_windows(9, None, 16).spans == ((0, 9),)
    assert latent_frames(81) == 21 and latent_frames(17) == 5 and latent_frames(1) == 1


def test_condition_spans_stay_aligned_or_fit_inside_a_shorter_video():
    assert condition_span((4, 9), 9) == (4, 9)  # as long as the target: the same frames
    assert condition_span((4, 9), 20) == (4, 9)  # longer: still aligned
    assert condition_span((4, 9), 7) == (2, 7)  # ends inside the window: the window's length from its end
    assert condition_span((4, 9), 3) == (0, 3)  # no longer than a window: whole, as a plain call sees it


@pytest.mark.parametrize(
    "frames, overlap, message",
    [
        (80, 16, r"`context_frames`=80 is not on the latent grid.*77 and 81"),
        (3, 0, r"`context_frames`=3 is not on the latent grid"),
        (1, 0, r"`context_frames`=1 is not on the latent grid"),
        (81.0, 16, r"`context_frames`=81.0 is not on the latent grid"),
        (True, 0, r"`context_frames`=True"),
        ("81", 16, r"`context_frames`='81'"),
        (81, 18, r"`context_overlap`=18 must be a multiple of 4"),
        (81, -4, r"`context_overlap`=-4 must be a multiple of 4 frames >= 0"),
        (81, None, r"`context_overlap`=None"),
        (81, 84, r"`context_overlap`=84 must be shorter than the window `context_frames`=81"),
        (17, 20, r"`context_overlap`=20 must be shorter"),
        (None, 6, r"`context_overlap`=6"),
    ],
)
def test_bad_settings_name_the_argument(frames, overlap, message):
    with pytest.raises(ValueError, match=message):
        check_context(frames, overlap)


def test_numpy_integers_are_integers():
    check_context(np.int64(17), np.int32(8))
    assert context_windows(9, np.int64(17), np.int64(8)).spans == ((0, 5), (2, 7), (4, 9))


def test_a_window_longer_than_the_rope_table_is_refused():
    with pytest.raises(ValueError, match=r"`context_frames`=129 is longer than the experts' RoPE table holds \(125"):
        check_context(129, 16, max_window=125)
    check_context(125, 16, max_window=125)


# ------------------------------------------------------------------------------------------------ the call


@pytest.mark.parametrize(
    "frames, overlap", [(80, 16), (17, 17), (17, 20), (17, 6), (2, 0)], ids=["off-grid", "equal", "longer", "odd", "2"]
)
def test_bad_settings_fail_before_any_model_work(pipe, monkeypatch, frames, overlap):
    touched = []
    for component in (pipe.vae, pipe.text_encoder, pipe.transformer, pipe.transformer_2):
        monkeypatch.setattr(component, "forward", lambda *a, _c=component, **k: touched.append(_c))
    monkeypatch.setattr(pipe.vae, "encode", lambda *a, **k: touched.append("encode"))
    call = dict(prompt="make it snow", task_type="v2v", video=_video(9), context_frames=frames, context_overlap=overlap)
    with pytest.raises(ValueError, match="`context_"):
        pipe(**call, **SMALL)
    with pytest.raises(ValueError, match="`context_"):
        BerniniPipeline.validate_call(**call)
    assert touched == []


@pytest.mark.parametrize(
    "call",
    [
        dict(task_type="t2v", num_frames=17),
        dict(task_type="v2v", video=_video(17), num_frames=17),
        dict(task_type="rv2v", video=_video(17), num_frames=17, images=[_image(32, 32, seed=4)]),
    ],
    ids=["t2v", "v2v", "rv2v"],
)
@pytest.mark.parametrize("context_frames", [17, 81])
def test_a_window_as_long_as_the_clip_is_the_plain_call_bit_for_bit(pipe, call, context_frames):
    plain = pipe(prompt="a red car", **call, **SMALL, generator=_gen()).frames
    windowed = pipe(
        prompt="a red car", **call, **SMALL, context_frames=context_frames, context_overlap=4, generator=_gen()
    ).frames
    assert torch.equal(plain, windowed)


def test_an_image_task_is_one_window_and_the_plain_call(pipe):
    plain = pipe(prompt="a red car", task_type="t2i", **SMALL, generator=_gen()).frames
    windowed = pipe(prompt="a red car", task_type="t2i", **SMALL, context_frames=5, context_overlap=0, generator=_gen())
    assert torch.equal(plain, windowed.frames)


def test_no_windows_by_default_leaves_the_source_cut_at_num_frames(pipe):
    out = pipe(prompt="make it snow", task_type="v2v", video=_video(33), num_frames=9, **SMALL, generator=_gen())
    assert out.frames.shape[2] == latent_frames(9)


@pytest.mark.parametrize(
    "task, extra, branches",
    [("v2v", {}, 2), ("rv2v", {"images": [_image(48, 48, seed=4), _image(32, 32, seed=5)]}, 4)],
)
def test_three_windows_edit_the_whole_source_end_to_end(pipe, task, extra, branches):
    """A 33-frame source with `num_frames=9`: windows take the whole source; each forward is one window (5 latent
    frames), its video condition the same 5 frames of the source, the references whole."""
    forwards = Forwards(pipe)
    try:
        out = pipe(
            prompt="make it snow", task_type=task, video=_video(33), num_frames=9, **WINDOWS, **extra,
            height=32, width=48, num_inference_steps=2, output_type="np", generator=_gen(),
        )  # fmt: skip
    finally:
        forwards.remove()
    frames = out.frames
    assert frames.shape == (1, 33, 32, 48, 3) and np.isfinite(frames).all()
    assert len(forwards.calls) == 2 * len(SPANS) * branches  # steps x windows x distinct forwards
    assert all(call["frames"] == 5 for call in forwards.calls)
    videos = [[n for n in call["conditions"] if n > 1] for call in forwards.calls]
    assert all(v in ([], [5]) for v in videos) and any(v == [5] for v in videos)
    if task == "rv2v":
        full = [call for call in forwards.calls if len(call["conditions"]) == 3]
        assert full and all(call["conditions"] == [5, 1, 1] and call["ids"] == [1.0, 2.0, 3.0] for call in full)
    # Both experts ran every window: the high-noise step first, then the low-noise one.
    per_step = len(SPANS) * branches
    assert {c["expert"] for c in forwards.calls[:per_step]} == {"transformer"}
    assert {c["expert"] for c in forwards.calls[per_step:]} == {"transformer_2"}


def test_each_window_sees_its_own_slice_of_the_source(pipe, monkeypatch):
    """The video condition of window j is the source latent's frames [start, end): recorded per forward and compared
    with the encoded source."""
    seen = []
    original = pipe.build_conditions

    def spy(video_latents, image_latent, reference_latents):
        seen.append([v.clone() for v in video_latents])
        return original(video_latents, image_latent, reference_latents)

    monkeypatch.setattr(pipe, "build_conditions", spy)
    video = _video(33)
    pipe(prompt="make it snow", task_type="v2v", video=video, **WINDOWS, **SMALL, generator=_gen())
    whole = pipe.encode_condition(pipeline_bernini.media.load_video(video, 848, 16, None), torch.device("cpu"))
    assert len(seen) == len(SPANS)
    for (start, end), (window,) in zip(SPANS, seen):
        assert torch.equal(window, whole[:, :, start:end])


def test_each_windows_rope_positions_start_at_zero(pipe):
    """The second window (latent frames [4, 9) of a t2v clip) predicts exactly what a plain call on those latents
    predicts: its positions are 0..4, as in training, not 4..8."""
    noise = torch.randn(1, 16, 9, 4, 6, generator=_gen(7))
    forwards = Forwards(pipe)
    try:
        pipe(prompt="a red car", task_type="t2v", num_frames=33, latents=noise, **WINDOWS, **SMALL)
        windowed = [c["output"] for c in forwards.calls[:6]]  # step 0: 3 windows x (uncond, cond)
        forwards.calls.clear()
        pipe(prompt="a red car", task_type="t2v", num_frames=17, latents=noise[:, :, 4:9].contiguous(), **SMALL)
        plain = [c["output"] for c in forwards.calls[:2]]
    finally:
        forwards.remove()
    assert torch.equal(windowed[4], plain[0]) and torch.equal(windowed[5], plain[1])
    assert not torch.equal(windowed[0], plain[0])  # other latents, another prediction: the comparison can fail


def _record_blend(monkeypatch):
    """Record each window's guided prediction and what the scheduler receives, step by step."""
    guided, blended = [], []
    guidance_call, step = Guidance.__call__, UniPCMultistepScheduler.step

    def record_guidance(self, latents, outputs, weights, sigma):
        result = guidance_call(self, latents, outputs, weights, sigma)
        guided.append(result.detach().clone())
        return result

    def record_step(self, model_output, *args, **kwargs):
        blended.append(model_output.detach().clone())
        return step(self, model_output, *args, **kwargs)

    monkeypatch.setattr(Guidance, "__call__", record_guidance)
    monkeypatch.setattr(UniPCMultistepScheduler, "step", record_step)
    return guided, blended


def test_seams_blend_between_the_windows(pipe, monkeypatch):
    """On the frames two windows share, the blended prediction lies between the two windows' predictions and equals
    neither; elsewhere it is the one window's prediction, bit for bit."""
    guided, blended = _record_blend(monkeypatch)
    pipe(prompt="make it snow", task_type="v2v", video=_video(33), **WINDOWS, **SMALL, generator=_gen())
    assert len(guided) == 2 * len(SPANS) and len(blended) == 2
    for step in range(2):
        windows, result = guided[step * 3 : step * 3 + 3], blended[step]
        (s0, e0), (s1, e1), (s2, e2) = SPANS
        torch.testing.assert_close(result[:, :, :s1], windows[0][:, :, : s1 - s0], rtol=0, atol=0)
        torch.testing.assert_close(result[:, :, e1:], windows[2][:, :, e1 - s2 :], rtol=0, atol=0)
        for (a, (sa, ea)), (b, (sb, eb)) in [((windows[0], SPANS[0]), (windows[1], SPANS[1])),
                                             ((windows[1], SPANS[1]), (windows[2], SPANS[2]))]:  # fmt: skip
            overlap = range(sb, ea)
            for frame in overlap:
                if frame in range(s2, e0):
                    continue  # three windows share no frame here; kept general
                x, y, z = a[:, :, frame - sa], b[:, :, frame - sb], result[:, :, frame]
                low, high = torch.minimum(x, y), torch.maximum(x, y)
                assert torch.all(z >= low - 1e-6) and torch.all(z <= high + 1e-6)
                differ = (x - y).abs() > 1e-3
                assert differ.any()
                assert torch.all((z - x).abs()[differ] > 0) and torch.all((z - y).abs()[differ] > 0)


def test_equal_window_predictions_blend_to_themselves(pipe, monkeypatch):
    """If every window predicts the same field, the blend is that field on every latent frame: the weights sum to one
    everywhere, in the call."""
    _, blended = _record_blend(monkeypatch)
    monkeypatch.setattr(Guidance, "__call__", lambda self, latents, *a: torch.full_like(latents, 0.75))
    pipe(prompt="make it snow", task_type="v2v", video=_video(33), **WINDOWS, **SMALL, generator=_gen())
    for result in blended:
        torch.testing.assert_close(result, torch.full_like(result, 0.75), rtol=0, atol=1e-6)


def test_a_windowed_source_is_bounded_by_the_documented_limit(pipe, monkeypatch):
    monkeypatch.setattr(pipeline_bernini, "MAX_WINDOWED_FRAMES", 29)
    with pytest.raises(ValueError, match=r"`video`.*33 frames.*29"):
        pipe(prompt="make it snow", task_type="v2v", video=_video(33), **WINDOWS, **SMALL, generator=_gen())
    with pytest.raises(ValueError, match=r"`num_frames`=33 must be an integer in \[1, 29\]"):
        pipe(prompt="a red car", task_type="t2v", num_frames=33, **WINDOWS, **SMALL, generator=_gen())


def test_an_insert_video_shorter_than_the_source_is_seen_whole_or_by_its_end(pipe):
    """ads2v: the 33-frame source sets the length; a 13-frame insert (4 latents, shorter than a window) is seen whole
    by every window, next to the window's slice of the source."""
    forwards = Forwards(pipe)
    try:
        out = pipe(
            prompt="put it on the table", task_type="ads2v", video=[_video(33), _video(13, seed=3)], **WINDOWS, **SMALL,
            generator=_gen(),
        )  # fmt: skip
    finally:
        forwards.remove()
    assert out.frames.shape[2] == 9
    both = [call["conditions"] for call in forwards.calls if len(call["conditions"]) == 2]
    assert both and all(conditions == [5, 4] for conditions in both)


def test_estimate_tokens_counts_one_window(pipe):
    windowed, grid = BerniniPipeline.estimate_tokens(
        {"video": (48, 32)}, prompt="p", task_type="v2v", video="clip.mp4", num_frames=81, **WINDOWS
    )
    plain, plain_grid = BerniniPipeline.estimate_tokens(
        {"video": (48, 32)}, prompt="p", task_type="v2v", video="clip.mp4", num_frames=17
    )
    assert (windowed, grid) == (plain, plain_grid) and grid[0] == 5


def test_a_windowed_batch_equals_its_samples(pipe):
    video = _video(33)
    call = dict(prompt="make it snow", task_type="v2v", video=video, **WINDOWS, **{**SMALL, "num_inference_steps": 1})
    batch = pipe(**call, num_videos_per_prompt=2, generator=[_gen(1), _gen(2)]).frames
    single = [pipe(**call, generator=_gen(seed)).frames for seed in (1, 2)]
    torch.testing.assert_close(batch, torch.cat(single), rtol=0, atol=1e-5)


@pytest.mark.parametrize("profile", ["expert_offload", "group_offload"])
def test_windows_under_offload_equal_the_resident_run(pipe, profile):
    """The offload hooks see ordinary forwards: a windowed edit under each offload profile is the resident one, bit
    for bit (the CPU stands in for the accelerator: the hooks run, nothing moves)."""
    call = dict(prompt="make it snow", task_type="v2v", video=_video(33), **WINDOWS, **SMALL)
    resident = pipe(**call, generator=_gen()).frames
    offloaded = tiny_pipeline()
    offloaded.set_progress_bar_config(disable=True)
    offloaded.enable_memory_profile(profile, "cpu")
    assert torch.equal(offloaded(**call, generator=_gen()).frames, resident)


def test_step_caches_keep_one_state_per_window_and_branch(pipe, monkeypatch):
    """diffusers' cache hooks key their state by the cache-context name: each window's forwards get names of their
    own, so a cache never reuses one window's residual in another."""
    names = []
    for model in (pipe.transformer, pipe.transformer_2):
        original = model.cache_context

        def record(name, *args, _original=original, **kwargs):
            names.append(name)
            return _original(name, *args, **kwargs)

        monkeypatch.setattr(model, "cache_context", record)
    pipe(prompt="make it snow", task_type="v2v", video=_video(33), **WINDOWS, **SMALL, generator=_gen())
    expected = [f"{branch}_w{j}" for j in range(len(SPANS)) for branch in ("uncond_vi", "cond_vi")]
    assert names == expected * 2  # two steps


def test_validate_call_refuses_a_too_long_windowed_source_file_before_loading(tmp_path, monkeypatch):
    """The front ends call `validate_call` before loading the weights: a windowed source file over the limit is
    refused there (counted, not decoded); without windows the same file is fine (it is cut at `num_frames`)."""
    from bernini_diffusers.testing import make_test_video

    source = make_test_video(tmp_path / "long.mp4", num_frames=33, width=48, height=32, fps=16, seed=1)
    monkeypatch.setattr(pipeline_bernini, "MAX_WINDOWED_FRAMES", 29)
    decoded = []
    monkeypatch.setattr(pipeline_bernini.media, "_decode_pass", lambda *a, **k: decoded.append(1) or 0)
    call = dict(prompt="make it snow", task_type="v2v", video=str(source))
    with pytest.raises(ValueError, match=r"`video`: the clip is 33 frames at 16 fps \(2\.0 s\).*limit of 29 frames"):
        BerniniPipeline.validate_call(**call, **WINDOWS)
    BerniniPipeline.validate_call(**call)
    BerniniPipeline.validate_call(**call, context_frames=17, fps=8)  # 17 frames at 8 fps fit
    assert decoded == []
