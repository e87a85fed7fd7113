"""BerniniPipeline end to end: every task type, parity with diffusers' WanPipeline, conditions, loading and saving."""

import importlib.util
import json

import numpy as np
import pytest
import torch
from diffusers import UniPCMultistepScheduler, WanPipeline

from bernini_diffusers import BerniniPipeline, BerniniTransformer3DModel
from bernini_diffusers.guidance import GUIDANCE_SPECS
from bernini_diffusers.scheduling import official_flow_sigmas
from bernini_diffusers.tasks import DEFAULT_NEGATIVE_PROMPT, TASKS, TaskType
from bernini_diffusers.testing import get_tiny_components, save_tiny_pretrained, tiny_pipeline

SMALL = dict(num_frames=5, height=32, width=48, num_inference_steps=3)


def _gen(seed=42):
    return torch.Generator("cpu").manual_seed(seed)


def _task_media(task: TaskType, media_dir):
    refs = [str(media_dir / "ref_a.png"), str(media_dir / "ref_b.png")]
    return {
        TaskType.T2I: {},
        TaskType.T2V: {},
        TaskType.I2I: {"image": str(media_dir / "source.png")},
        TaskType.V2V: {"video": str(media_dir / "source.mp4")},
        TaskType.MV2V: {"video": str(media_dir / "source.mp4")},
        TaskType.R2V: {"images": refs},
        TaskType.RV2V: {"video": str(media_dir / "source.mp4"), "images": refs},
        TaskType.ADS2V: {"video": [str(media_dir / "source.mp4"), str(media_dir / "insert.mp4")]},
    }[task]


class ForwardSpy:
    """Records what each transformer forward received (expert, text sign, condition shapes and source ids)."""

    def __init__(self, pipe, monkeypatch):
        self.calls = []
        for name in ("transformer", "transformer_2"):
            model = getattr(pipe, name)
            if model is None:
                continue
            original = model.forward

            def spy(*args, _name=name, _original=original, **kwargs):
                conds = kwargs.get("condition_latents") or []
                self.calls.append(
                    {
                        "expert": _name,
                        "text": kwargs["encoder_hidden_states"],
                        "shapes": [tuple(c.shape) for c in conds],
                        "ids": list(kwargs.get("condition_source_ids") or []),
                    }
                )
                return _original(*args, **kwargs)

            monkeypatch.setattr(model, "forward", spy)


# Video tasks take the source's first `num_frames` (5) frames; image tasks make one frame.
EXPECTED_SHAPES = {task: ((1 if TASKS[task].is_image else 5), 32, 48) for task in TaskType}


@pytest.mark.parametrize("task", list(TaskType), ids=lambda t: t.value)
def test_every_task_end_to_end(task, tiny_pipe, media_dir, monkeypatch):
    spy = ForwardSpy(tiny_pipe, monkeypatch)
    out = tiny_pipe("a red ball", task_type=task, generator=_gen(), **_task_media(task, media_dir), **SMALL)
    frames = out.frames
    assert frames.shape == (1, *EXPECTED_SHAPES[task], 3)
    assert np.isfinite(frames).all() and frames.min() >= 0 and frames.max() <= 1
    mode = TASKS[task].default_guidance_mode
    # Every branch of the default mode runs once per step when the media make the combos distinct.
    assert len(spy.calls) == SMALL["num_inference_steps"] * GUIDANCE_SPECS[mode].forwards_per_step
    latent = tiny_pipe("a red ball", task_type=task, generator=_gen(), output_type="latent",
                       **_task_media(task, media_dir), **SMALL).frames
    t, h, w = EXPECTED_SHAPES[task]
    assert latent.shape == (1, 16, (t - 1) // 4 + 1, h // 8, w // 8) and latent.dtype == torch.float32


def test_video_output_follows_the_source_clip(tiny_pipe, media_dir):
    # The source clip is 12 frames at 24 fps: resampled to 16 fps that is 8 -> 4k+1 = 9 frames
    # (docs/design.md#frame-sampling); the output takes its length and size, not num_frames/height/width.
    out = tiny_pipe("x", task_type="v2v", video=str(media_dir / "source.mp4"), num_frames=81, height=64, width=64,
                    num_inference_steps=1, generator=_gen())
    assert out.frames.shape == (1, 9, 32, 48, 3)
    out = tiny_pipe("x", task_type="i2i", image=str(media_dir / "ref_b.png"), height=64, width=64,
                    num_inference_steps=1, generator=_gen())
    assert out.frames.shape == (1, 1, 64, 32, 3)  # 40x60 -> 32x64 (banker's rounding, docs/design.md#resize)


@pytest.mark.parametrize("num_frames, expected", [(1, 1), (4, 5), (5, 5), (8, 9), (9, 9), (11, 9)])
def test_generated_frame_count_follows_the_4k_plus_1_rule(num_frames, expected, tiny_pipe):
    latent = tiny_pipe("x", task_type="t2v", num_frames=num_frames, height=32, width=32, num_inference_steps=1,
                       generator=_gen(), output_type="latent").frames
    assert latent.shape[2] == (expected - 1) // 4 + 1  # T_lat = (T // 4 * 4 + 1 - 1) / 4 + 1


def test_rv2v_branches_streams_and_ids(tiny_pipe, media_dir, monkeypatch):
    spy = ForwardSpy(tiny_pipe, monkeypatch)
    tiny_pipe("edit", task_type="rv2v", generator=_gen(), num_inference_steps=1, **_task_media(TaskType.RV2V, media_dir))
    video, ref_a, ref_b = (1, 16, 3, 4, 6), (1, 16, 1, 4, 4), (1, 16, 1, 8, 4)  # ref_b: 40x60 -> 32x64, rounded
    assert [c["shapes"] for c in spy.calls] == [[], [video], [video, ref_a, ref_b], [video, ref_a, ref_b]]
    assert [c["ids"] for c in spy.calls] == [[], [1.0], [1.0, 2.0, 3.0], [1.0, 2.0, 3.0]]
    neg, pos = spy.calls[2]["text"], spy.calls[3]["text"]
    assert all(torch.equal(c["text"], neg) for c in spy.calls[:3]) and not torch.equal(neg, pos)


def test_ads2v_insert_video_is_second_source_and_r2v_uses_images_alone(tiny_pipe, media_dir, monkeypatch):
    spy = ForwardSpy(tiny_pipe, monkeypatch)
    refs = _task_media(TaskType.R2V, media_dir)["images"]
    tiny_pipe("ad", task_type="ads2v", images=refs[:1], generator=_gen(), num_inference_steps=1,
              **_task_media(TaskType.ADS2V, media_dir))
    source, insert, ref = (1, 16, 3, 4, 6), (1, 16, 3, 4, 4), (1, 16, 1, 4, 4)
    assert [c["shapes"] for c in spy.calls] == [[], [source], [source, insert, ref], [source, insert, ref]]
    assert spy.calls[2]["ids"] == [1.0, 2.0, 3.0]
    spy.calls.clear()
    tiny_pipe("subject", task_type="r2v", generator=_gen(), num_inference_steps=1, images=refs, **{
        k: v for k, v in SMALL.items() if k != "num_inference_steps"})
    assert [c["ids"] for c in spy.calls] == [[], [1.0, 2.0], [1.0, 2.0]]


def test_more_than_five_references_get_interpolated_ids(tiny_pipe, media_dir, monkeypatch):
    spy = ForwardSpy(tiny_pipe, monkeypatch)
    refs = [str(media_dir / "ref_a.png")] * 6
    tiny_pipe("six", task_type="r2v", images=refs, generator=_gen(), num_inference_steps=1, height=32, width=32)
    assert spy.calls[1]["ids"] == pytest.approx([1.0, 1.8, 2.6, 3.4, 4.2, 5.0])


def test_identical_branches_share_one_forward_with_the_same_result(tiny_pipe, monkeypatch):
    # rv2v on a text-only task: none/V/VI coincide, so two forwards serve four branches.
    spy = ForwardSpy(tiny_pipe, monkeypatch)
    fast = tiny_pipe("x", task_type="t2v", guidance_mode="rv2v", generator=_gen(), output_type="latent", **SMALL).frames
    assert len(spy.calls) == 2 * SMALL["num_inference_steps"]
    # The same chain computed from the two outputs by hand: e0 + w_vid*0 + w_img*0 + w_txt*(e+ - e0) == t2v CFG.
    plain = tiny_pipe("x", task_type="t2v", guidance_mode="t2v", generator=_gen(), output_type="latent", **SMALL).frames
    torch.testing.assert_close(fast, plain, rtol=0, atol=1e-6)


class _OfficialSigmasUniPC(UniPCMultistepScheduler):
    """For WanPipeline: the official (0.35) flow sigmas, which `set_timesteps(N)` no longer gives in 0.42."""

    def set_timesteps(self, num_inference_steps=None, device=None, sigmas=None, mu=None):
        super().set_timesteps(device=device, sigmas=official_flow_sigmas(num_inference_steps))


def test_t2v_cfg_equals_diffusers_wan_pipeline(tiny_pipe):
    """Plain CFG text-to-video on the same weights, schedule and seed is WanPipeline's computation exactly."""
    scheduler = _OfficialSigmasUniPC.from_config(tiny_pipe.scheduler.config, flow_shift=5.0)
    wan = WanPipeline(
        tokenizer=tiny_pipe.tokenizer, text_encoder=tiny_pipe.text_encoder, vae=tiny_pipe.vae, scheduler=scheduler,
        transformer=tiny_pipe.transformer, transformer_2=tiny_pipe.transformer_2, boundary_ratio=0.875,
    )
    negative, steps, omega_txt, omega_scale = "blurry, low quality", 6, 4.0, 0.8
    common = dict(num_frames=5, height=32, width=48, num_inference_steps=steps)
    ours = tiny_pipe("a cat walks", task_type="t2v", guidance_mode="t2v", system_prompt="", negative_prompt=negative,
                     omega_txt=omega_txt, omega_scale=omega_scale, generator=_gen(7), output_type="latent", **common)
    theirs = wan("a cat walks", negative_prompt=negative, guidance_scale=omega_txt,
                 guidance_scale_2=omega_txt * omega_scale, generator=_gen(7), output_type="latent", **common)
    assert torch.equal(ours.frames, theirs.frames[0][None] if theirs.frames.ndim == 4 else theirs.frames)
    ours_np = tiny_pipe("a cat walks", task_type="t2v", guidance_mode="t2v", system_prompt="", negative_prompt=negative,
                        omega_txt=omega_txt, omega_scale=omega_scale, generator=_gen(7), **common).frames
    theirs_np = wan("a cat walks", negative_prompt=negative, guidance_scale=omega_txt,
                    guidance_scale_2=omega_txt * omega_scale, generator=_gen(7), **common).frames
    np.testing.assert_allclose(ours_np, theirs_np, atol=1e-5)


def test_initial_noise_is_wan_prepare_latents_with_a_cpu_generator(tiny_pipe):
    shape = (1, 16, 2, 4, 6)
    ours = tiny_pipe.prepare_latents(shape, _gen(3), None, torch.device("cpu"))
    wan = WanPipeline(**{k: v for k, v in get_tiny_components().items() if k != "boundary_ratio"})
    theirs = wan.prepare_latents(1, 16, 32, 48, 5, torch.float32, torch.device("cpu"), _gen(3))
    assert torch.equal(ours, theirs)


def test_system_prompt_and_negative_prompt_texts(tiny_pipe, monkeypatch):
    seen = []
    original = tiny_pipe.encode_prompt
    monkeypatch.setattr(tiny_pipe, "encode_prompt", lambda p, n, *a: seen.append((p, n)) or original(p, n, *a))
    tiny_pipe("  Add a &amp;amp; snowman  ", task_type="v2v", video=np.zeros((5, 32, 48, 3), np.uint8),
              num_inference_steps=1, generator=_gen())
    assert seen[-1] == ("You are a helpful assistant specialized in video editing.Add a & snowman",
                        DEFAULT_NEGATIVE_PROMPT)
    tiny_pipe("x", task_type="mv2v", video=np.zeros((5, 32, 48, 3), np.uint8), negative_prompt="  raw  &amp; ",
              system_prompt="SYS:", num_inference_steps=1, generator=_gen())
    assert seen[-1] == ("SYS:x", "  raw  &amp; ")


def test_default_negative_prompt_keeps_the_stored_normalizer(tmp_path):
    """transformers 5 drops tokenizer.json's normalizer; the pipeline restores it
    (docs/design.md#library-differences)."""
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    save_tiny_pretrained(tmp_path / "wan", layout="wan")
    pipe = BerniniPipeline.from_pretrained(tmp_path / "wan")
    stored = Tokenizer.from_file(str(tmp_path / "wan" / "tokenizer" / "tokenizer.json"))
    expected = stored.encode(DEFAULT_NEGATIVE_PROMPT).ids
    ids = pipe.tokenizer(DEFAULT_NEGATIVE_PROMPT).input_ids
    assert ids == expected
    assert pipe.tokenizer.unk_token_id not in ids  # "，" normalised to "," by NFKC
    plain = AutoTokenizer.from_pretrained(tmp_path / "wan" / "tokenizer")(DEFAULT_NEGATIVE_PROMPT).input_ids
    assert plain != expected  # without the restore the default negative prompt tokenizes differently


def _latent(pipe, **kwargs):
    return pipe("a cat", task_type="t2v", generator=_gen(), output_type="latent", **{**SMALL, **kwargs}).frames


@pytest.mark.parametrize("layout", ["wan", "bernini", "diffusers"])
def test_from_pretrained_layouts(layout, tmp_path, tiny_pipe):
    save_tiny_pretrained(tmp_path / layout, layout=layout)
    pipe = BerniniPipeline.from_pretrained(tmp_path / layout)
    assert type(pipe.transformer) is BerniniTransformer3DModel
    assert type(pipe.transformer_2) is BerniniTransformer3DModel
    assert pipe.config.boundary_ratio == 0.875
    assert torch.equal(_latent(pipe), _latent(tiny_pipe))


@pytest.mark.parametrize("layout", ["wan", "bernini"])
def test_single_expert_layouts(layout, tmp_path, tiny_pipe_1p3b):
    save_tiny_pretrained(tmp_path / layout, layout=layout, two_experts=False)
    pipe = BerniniPipeline.from_pretrained(tmp_path / layout)
    assert pipe.transformer_2 is None and type(pipe.transformer) is BerniniTransformer3DModel
    assert torch.equal(_latent(pipe), _latent(tiny_pipe_1p3b))


def test_save_pretrained_round_trip(tmp_path, tiny_pipe):
    tiny_pipe.save_pretrained(tmp_path / "saved")
    index = json.loads((tmp_path / "saved" / "model_index.json").read_text())
    assert index["_class_name"] == ["pipeline_bernini", "BerniniPipeline"] and index["boundary_ratio"] == 0.875
    pipe = BerniniPipeline.from_pretrained(tmp_path / "saved")
    assert torch.equal(_latent(pipe), _latent(tiny_pipe))


def test_dtypes_bf16_experts_fp32_vae(tmp_path):
    save_tiny_pretrained(tmp_path / "wan", layout="wan")
    pipe = BerniniPipeline.from_pretrained(tmp_path / "wan", dtype=torch.bfloat16)
    assert pipe.transformer.dtype == pipe.transformer_2.dtype == torch.bfloat16
    assert pipe.text_encoder.dtype == torch.bfloat16
    assert pipe.vae.dtype == torch.float32
    # diffusers keeps the modulation tables and time embedder in fp32 (docs/design.md#dtypes)
    assert pipe.transformer.scale_shift_table.dtype == torch.float32
    latent = pipe("a cat", task_type="t2v", generator=_gen(), output_type="latent",
                  num_frames=1, height=32, width=32, num_inference_steps=2).frames
    assert latent.dtype == torch.float32 and torch.isfinite(latent).all()


def test_from_pretrained_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="model_index.json"):
        BerniniPipeline.from_pretrained(tmp_path / "empty")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text('{"model_type": "bernini"}')
    with pytest.raises(ValueError, match="bernini_renderer"):
        BerniniPipeline.from_pretrained(tmp_path / "other")


def test_pipeline_rejects_a_plain_wan_transformer():
    from diffusers import WanTransformer3DModel

    components = get_tiny_components()
    components["transformer"] = WanTransformer3DModel(**dict(components["transformer"].config))
    with pytest.raises(ValueError, match="BerniniTransformer3DModel"):
        BerniniPipeline(**components)


def test_flow_shift_is_honoured_per_call(tiny_pipe):
    a = _latent(tiny_pipe, flow_shift=5.0)
    b = _latent(tiny_pipe, flow_shift=3.0)
    assert not torch.equal(a, b)
    assert torch.equal(a, _latent(tiny_pipe))  # the default is 5.0 ...
    assert tiny_pipe.scheduler.config.flow_shift == 5.0  # ... and a call leaves the registered scheduler alone


def test_callback_and_progress_bar(tiny_pipe):
    steps = []

    def callback(pipe, i, t, kwargs):
        steps.append((i, int(t)))
        return {"latents": kwargs["latents"]}

    tiny_pipe("x", task_type="t2v", callback_on_step_end=callback, generator=_gen(), output_type="latent", **SMALL)
    assert [i for i, _ in steps] == [0, 1, 2] and steps[0][1] == 999


def test_output_types(tiny_pipe):
    pil = tiny_pipe("x", task_type="t2v", output_type="pil", generator=_gen(), **SMALL).frames
    pt = tiny_pipe("x", task_type="t2v", output_type="pt", generator=_gen(), **SMALL).frames
    npy = tiny_pipe("x", task_type="t2v", output_type="np", generator=_gen(), **SMALL).frames
    assert len(pil[0]) == 5 and pil[0][0].size == (48, 32)
    assert pt.shape == (1, 5, 3, 32, 48)
    np.testing.assert_allclose(pt.permute(0, 1, 3, 4, 2).numpy(), npy, atol=1e-6)


def test_output_save_writes_png_or_mp4(tiny_pipe, tmp_path):
    from bernini_diffusers.media import read_video

    video = tiny_pipe("x", task_type="t2v", generator=_gen(), **SMALL)
    path = video.save(tmp_path / "v.mp4")
    frames, fps = read_video(path)
    assert len(frames) == 5 and fps == 16
    image = tiny_pipe("x", task_type="t2i", generator=_gen(), **SMALL)
    assert image.save(tmp_path / "i.mp4").name == "i.png"
    pt = tiny_pipe("x", task_type="t2v", generator=_gen(), output_type="pt", **SMALL)
    assert len(read_video(pt.save(tmp_path / "pt.mp4"))[0]) == 5
    pil = tiny_pipe("x", task_type="t2v", generator=_gen(), output_type="pil", **SMALL)
    assert len(read_video(pil.save(tmp_path / "pil.mp4"))[0]) == 5
    latent = tiny_pipe("x", task_type="t2v", generator=_gen(), output_type="latent", num_frames=9, height=32, width=48,
                       num_inference_steps=1)
    with pytest.raises(ValueError, match="latent"):
        latent.save(tmp_path / "latent.mp4")


def test_vae_encode_uses_the_mode_in_float32(tiny_pipe, monkeypatch):
    seen = []
    original = tiny_pipe.vae.encode

    def encode(x, *args, **kwargs):
        seen.append(x.dtype)
        return original(x, *args, **kwargs)

    monkeypatch.setattr(tiny_pipe.vae, "encode", encode)
    pixels = torch.rand(3, 5, 32, 48) * 2 - 1
    a = tiny_pipe.encode_condition(pixels, torch.device("cpu"))
    b = tiny_pipe.encode_condition(pixels, torch.device("cpu"))
    assert torch.equal(a, b) and seen == [torch.float32, torch.float32]  # mode(): deterministic, no sampling
    raw = original(pixels[None]).latent_dist.mode()
    mean = torch.tensor(tiny_pipe.vae.config.latents_mean).view(1, 16, 1, 1, 1)
    std = torch.tensor(tiny_pipe.vae.config.latents_std).view(1, 16, 1, 1, 1)
    torch.testing.assert_close(a, (raw - mean) / std, rtol=0, atol=0)


def _record_offload_events(pipe) -> list[str]:
    """Wrap the accelerate hooks of `enable_model_cpu_offload` to log `load X` / `offload X` (consecutive repeats
    merged). `maybe_free_model_hooks` re-creates the hooks after each call, so wrap again before every call."""
    names = {id(getattr(pipe, n)): n for n in ("text_encoder", "transformer", "transformer_2", "vae")}
    events: list[str] = []

    def record(event):
        if not events or events[-1] != event:
            events.append(event)

    for user_hook in pipe._all_hooks:
        name = names[id(user_hook.model)]
        hook, original_pre, original_offload = user_hook.hook, user_hook.hook.pre_forward, user_hook.offload

        def pre_forward(module, *args, _name=name, _original=original_pre, **kwargs):
            record(f"load {_name}")
            return _original(module, *args, **kwargs)

        def offload(_name=name, _original=original_offload):
            record(f"offload {_name}")
            return _original()

        hook.pre_forward = pre_forward
        user_hook.offload = offload
    return events


def test_model_cpu_offload_keeps_at_most_one_expert_loaded(media_dir):
    """diffusers' model offload chain: loading the low-noise expert offloads the high-noise one and the loop never
    goes back, so at most one expert is on the accelerator; the VAE leaves right after encoding the conditions.
    Run here with the CPU standing in for the accelerator: the hooks' load/offload calls are what is checked."""
    pipe = tiny_pipeline()
    pipe.enable_model_cpu_offload(device="cpu")
    events = _record_offload_events(pipe)
    pipe("x", task_type="t2v", generator=_gen(), **SMALL)
    assert [e for e in events if e.startswith("load")] == [
        "load text_encoder", "load transformer", "load transformer_2", "load vae"
    ]
    # Loading an expert offloads its predecessor in the chain (accelerate skips that when it is already on the CPU,
    # which the CPU stand-in always is, so the chain itself is checked).
    assert pipe.transformer_2._hf_hook.prev_module_hook.model is pipe.transformer
    assert pipe.transformer._hf_hook.prev_module_hook.model is pipe.text_encoder
    events = _record_offload_events(pipe)
    pipe("x", task_type="v2v", video=str(media_dir / "source.mp4"), generator=_gen(), **SMALL)
    assert events == [
        "load text_encoder", "load vae", "offload vae", "load transformer", "load transformer_2", "load vae"
    ]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.skipif(
    importlib.util.find_spec("imageio_ffmpeg") is None, reason="its source video needs ffmpeg: pip install imageio-ffmpeg"
)
def test_model_cpu_offload_keeps_one_expert_on_the_gpu(media_dir):
    pipe = tiny_pipeline()
    pipe.enable_model_cpu_offload()
    devices = []

    def callback(p, i, t, kwargs):
        devices.append((p.transformer.device.type, p.transformer_2.device.type, p.vae.device.type))
        return {}

    pipe("x", task_type="v2v", video=str(media_dir / "source.mp4"), callback_on_step_end=callback, generator=_gen(),
         **SMALL)
    assert all(high == "cpu" or low == "cpu" for high, low, _ in devices)
    assert all(vae == "cpu" for _, _, vae in devices)
    assert devices[0][0] == "cuda" and devices[-1][1] == "cuda"


def test_tiny_bf16_casts_like_from_pretrained(tmp_path):
    save_tiny_pretrained(tmp_path / "wan", layout="wan")
    loaded = BerniniPipeline.from_pretrained(tmp_path / "wan", dtype=torch.bfloat16)
    built = tiny_pipeline(torch_dtype=torch.bfloat16)
    for name in ("transformer", "transformer_2", "text_encoder", "vae"):
        loaded_dtypes = {k: v.dtype for k, v in getattr(loaded, name).state_dict().items()}
        built_dtypes = {k: v.dtype for k, v in getattr(built, name).state_dict().items()}
        assert loaded_dtypes == built_dtypes, name


def test_validate_call_checks_without_a_model(tmp_path):
    BerniniPipeline.validate_call(prompt="x", task_type="t2v")
    with pytest.raises(FileNotFoundError, match="video"):
        BerniniPipeline.validate_call(prompt="x", task_type="v2v", video=str(tmp_path / "missing.mp4"))
    with pytest.raises(ValueError, match="num_frames"):
        BerniniPipeline.validate_call(prompt="x", task_type="t2v", num_frames=0)
    with pytest.raises(ValueError, match="images"):
        BerniniPipeline.validate_call(prompt="x", task_type="r2v")


def test_media_a_mode_does_not_use_are_not_encoded(tiny_pipe, media_dir, monkeypatch):
    encoded = []
    original = tiny_pipe.encode_condition
    monkeypatch.setattr(tiny_pipe, "encode_condition", lambda p, d: encoded.append(tuple(p.shape)) or original(p, d))
    media = _task_media(TaskType.RV2V, media_dir)
    tiny_pipe("x", task_type="rv2v", guidance_mode="t2v", generator=_gen(), num_inference_steps=1, **media)
    assert encoded == []  # text-only guidance: no condition at all
    tiny_pipe("x", task_type="rv2v", guidance_mode="r2v_apg", generator=_gen(), num_inference_steps=1, **media)
    assert encoded == [(3, 1, 32, 32), (3, 1, 64, 32)]  # the references alone
    encoded.clear()
    tiny_pipe("x", task_type="rv2v", generator=_gen(), num_inference_steps=1, **media)
    assert len(encoded) == 3
