"""Faults of a pipeline call: non-finite results are an error (never a video), finite-but-absurd settings and bad call
arguments are refused before any model work, and messages stay short.

Each test asserts the message, the exception (or the command's exit status) and that nothing was written.
"""

from __future__ import annotations

import json
import re

import pytest
import torch

from bernini_diffusers import cli, pipeline_inputs
from bernini_diffusers import pipeline_bernini as pb
from bernini_diffusers.constants import GUIDANCE_RANGES, MAX_BATCH_SIZE
from bernini_diffusers.pipeline_bernini import NonFiniteOutputError

from model_guard import MODEL_WORK

SMALL = dict(prompt="a boat", height=32, width=32, num_frames=5, num_inference_steps=2, output_type="latent")
TINY = ["--model", "tiny", "--num_frames", "5", "--height", "32", "--width", "32", "--num_inference_steps", "2"]


def _refused(pipe, argument: str, **kwargs) -> str:
    with pytest.raises(ValueError, match=re.escape(f"`{argument}")) as info:
        pipe(**{**SMALL, **kwargs})
    assert MODEL_WORK not in str(info.value)
    return str(info.value)


# --- finite but absurd settings: refused with the allowed range ---------------------------------------------------


@pytest.mark.parametrize(
    ("argument", "value"),
    [
        ("flow_shift", 1e-300),
        ("flow_shift", 1e300),
        ("omega_scale", 1e308),
        ("eta", 1e308),
        ("eta", -1.0),
        ("momentum", 5.0),
        ("norm_threshold", 1e300),
        ("norm_threshold", [50.0, 1e300]),
        ("omega_txt", 1e30),
        ("omega_vid", -1.0),
        ("omega_img", float("inf")),
        ("guidance_scale", 1e9),
    ],
)
def test_absurd_settings_are_refused_with_the_range(guarded_pipe, argument, value):
    message = _refused(guarded_pipe, argument, **{argument: value})
    low, high = GUIDANCE_RANGES[argument]
    assert f"must be a number in [{low:g}, {high:g}]" in message


def test_the_defaults_and_documented_values_stay_allowed():
    """Every default of `__call__` and the values the docs and tests use lie inside the ranges."""
    import inspect

    defaults = inspect.signature(pb.BerniniPipeline.__call__).parameters
    for name, (low, high) in GUIDANCE_RANGES.items():
        default = defaults[name].default
        if default is not None:
            assert low <= default <= high, name
    used = [("flow_shift", 3.0), ("momentum", -0.5), ("eta", 1.0), ("omega_txt", 6.0), ("omega_scale", 0.75)]
    for name, value in used:
        pipeline_inputs.check_range(name, value)


# --- call arguments refused up front, naming the argument ---------------------------------------------------------


def test_a_generator_list_with_none_is_refused(guarded_pipe):
    message = _refused(guarded_pipe, "generator[0]", generator=[None])
    assert "NoneType" in message and "one torch.Generator per video" in message
    _refused(guarded_pipe, "generator", generator=[torch.Generator(), torch.Generator()])  # wrong length


def test_a_callback_must_be_callable(guarded_pipe):
    assert "must be callable" in _refused(guarded_pipe, "callback_on_step_end", callback_on_step_end="x")


def test_attention_kwargs_must_be_a_dict(guarded_pipe):
    assert "must be a dict or None, got str" in _refused(guarded_pipe, "attention_kwargs", attention_kwargs="x")


def test_the_batch_size_is_bounded(guarded_pipe):
    message = _refused(guarded_pipe, "num_videos_per_prompt", num_videos_per_prompt=10**6)
    assert f"[1, {MAX_BATCH_SIZE}]" in message
    message = _refused(guarded_pipe, "num_videos_per_prompt", prompt=["a"] * 4, num_videos_per_prompt=8)
    assert "with 4 prompt(s) makes a batch of 32 videos; one call renders at most 16" in message


@pytest.mark.parametrize("name", ["prompt_embeds", "latents"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_given_tensors_are_refused_before_model_work(guarded_pipe, name, bad):
    if name == "prompt_embeds":
        kwargs = dict(prompt=None, prompt_embeds=torch.zeros(1, 8, 32))
    else:
        kwargs = dict(latents=torch.zeros(1, 16, 2, 4, 4))
    kwargs[name][0, 0, 0] = bad
    assert "holds non-finite values" in _refused(guarded_pipe, name, **kwargs)
    embeds = torch.zeros(1, 8, 32)
    embeds[0, 1, 2] = bad
    assert "holds non-finite values" in _refused(
        guarded_pipe, "negative_prompt_embeds", negative_prompt_embeds=embeds
    )


def test_the_meta_device_is_refused(guarded_pipe):
    weight = next(guarded_pipe.transformer.parameters())
    for move in (lambda: guarded_pipe.to("meta"), lambda: guarded_pipe.to(device=torch.device("meta"))):
        with pytest.raises(ValueError, match="`device`='meta' is not allowed"):
            move()
    with pytest.raises(ValueError, match="`device`='meta' is not allowed"):
        guarded_pipe.enable_memory_profile("resident", "meta")
    assert weight.device.type == "cpu" and weight.is_floating_point() and not weight.is_meta


def test_the_meta_device_is_refused_by_the_command(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(cli, "load_pipeline", lambda args: pytest.fail("the model must not load"))
    out = tmp_path / "o.mp4"
    assert cli.main(["generate", *TINY, "--prompt", "p", "--device", "meta", "--output", str(out)]) == 2
    assert "--device='meta' is not allowed" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        (dict(task_type="v2v", video=b"\0" * 20_000_000), "video"),
        (dict(task_type="v2v", video={"frames": b"\0" * 20_000_000}), "video"),
        (dict(task_type="v2v", video=[b"\0" * 20_000_000]), "video"),
        (dict(task_type="i2i", image=b"\0" * 20_000_000), "image"),
        (dict(task_type="r2v", images=[b"\0" * 20_000_000]), "images[0]"),
        (dict(output_type="x" * 20_000_000), "output_type"),
        (dict(num_frames="9" * 20_000_000), "num_frames"),
    ],
)
def test_media_of_a_wrong_type_give_short_messages(guarded_pipe, kwargs, argument):
    message = _refused(guarded_pipe, argument, **kwargs)
    assert len(message) < 400, len(message)


# --- non-finite results: an error naming the step and the cause, nothing decoded --------------------------------


def _poison_first_weight(expert):
    weight = next(p for p in expert.parameters() if p.ndim > 1)
    saved = weight.detach().clone()
    with torch.no_grad():
        weight.view(-1)[0] = float("nan")
    return weight, saved


def test_a_nan_expert_weight_is_an_error_not_a_video(tiny_pipe, monkeypatch):
    """A NaN-poisoned low-noise expert (as a NaN LoRA leaves it): the error names the step and the expert, and the VAE
    never decodes."""
    monkeypatch.setattr(tiny_pipe, "decode_latents", lambda *a, **k: pytest.fail("non-finite latents were decoded"))
    weight, saved = _poison_first_weight(tiny_pipe.transformer_2)
    try:
        with pytest.raises(NonFiniteOutputError) as info:
            tiny_pipe(**{**SMALL, "output_type": "np"})
    finally:
        with torch.no_grad():
            weight.copy_(saved)
    message = str(info.value)
    assert isinstance(info.value, RuntimeError) and not isinstance(info.value, ValueError)
    assert "non-finite latents (NaN or inf) at step" in message and "(transformer_2)" in message
    assert "nothing was decoded or written" in message and "guidance setting" in message
    assert info.value.step >= 1  # the high-noise steps before it stayed finite
    assert "\n" not in message


def test_non_finite_latents_from_a_callback_are_named(tiny_pipe):
    def poison(pipe, step, timestep, callback_kwargs):
        return {"latents": callback_kwargs["latents"] * float("nan")} if step == 1 else callback_kwargs

    with pytest.raises(NonFiniteOutputError, match=r"at step 2 of 2 \(transformer_2\).*callback_on_step_end") as info:
        tiny_pipe(**SMALL, callback_on_step_end=poison)
    assert info.value.step == 1


def test_a_lora_is_named_as_the_likely_cause(tiny_pipe, monkeypatch):
    """With an adapter loaded, the message points at it first."""
    monkeypatch.setattr(tiny_pipe.transformer, "peft_config", {"turbo": object()}, raising=False)
    weight, saved = _poison_first_weight(tiny_pipe.transformer)
    try:
        with pytest.raises(NonFiniteOutputError, match=r"at step 1 of 2 \(transformer\).*a LoRA \(turbo\)"):
            tiny_pipe(**SMALL)
    finally:
        with torch.no_grad():
            weight.copy_(saved)


def _poisoned_text(monkeypatch):
    """Text embeddings that are NaN for any prompt containing "poison" (a broken text encoder)."""
    real = pb.encode_texts

    def encode(tokenizer, text_encoder, texts, *args, **kwargs):
        embeds = real(tokenizer, text_encoder, texts, *args, **kwargs)
        return embeds * float("nan") if any("poison" in t for t in texts) else embeds

    monkeypatch.setattr(pb, "encode_texts", encode)


def test_a_single_generate_with_a_nan_result_exits_1_and_writes_nothing(tmp_path, capsys, monkeypatch):
    _poisoned_text(monkeypatch)
    out = tmp_path / "o.mp4"
    assert cli.main(["generate", *TINY, "--prompt", "poison", "--output", str(out)]) == 1
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("bernini: error:")]
    assert len(lines) == 1 and "Traceback" not in err
    assert "NonFiniteOutputError: The denoising produced non-finite latents" in lines[0]
    assert list(tmp_path.iterdir()) == []


def test_a_batch_records_a_nan_case_as_failed_and_goes_on(tmp_path, capsys, monkeypatch):
    _poisoned_text(monkeypatch)
    entries = [
        {"task_type": "t2v", "prompt": "poison", "output": str(tmp_path / "bad.mp4")},
        {"task_type": "t2v", "prompt": "a calm lake", "output": str(tmp_path / "good.mp4")},
    ]
    batch = tmp_path / "b.jsonl"
    batch.write_text("\n".join(map(json.dumps, entries)))
    assert cli.main(["generate", *TINY, "--inputs", str(batch)]) == 1
    err = capsys.readouterr().err
    assert "1 done, 0 skipped, 1 failed" in err
    assert f"failed   [1] {tmp_path}/bad.mp4: NonFiniteOutputError: The denoising produced non-finite" in err
    assert (tmp_path / "good.mp4").stat().st_size > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.jsonl", "good.mp4"]
