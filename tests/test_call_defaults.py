"""The tiny pipeline's calls are tiny by default (a pipeline-level `call_defaults` config); the real model keeps the
official defaults, an explicit size wins, and the setting survives save_pretrained/from_pretrained."""

from __future__ import annotations

import inspect
import re

import pytest
import torch

from bernini_diffusers import BerniniPipeline, tiny
from bernini_diffusers.constants import TINY_CALL_DEFAULTS

OFFICIAL = {"num_frames": 81, "height": 480, "width": 848, "max_image_size": 848, "num_inference_steps": 40}


class _Stop(Exception):
    pass


def _sizes_of_a_call(pipe, monkeypatch, *args, **kwargs) -> dict:
    """The size arguments `__call__` sees, caught at its first step (no model work)."""
    seen = {}

    def check_call(args, limits):
        seen.update({name: args[name] for name in OFFICIAL})
        raise _Stop

    monkeypatch.setattr(pipe, "_check_call", check_call)
    with pytest.raises(_Stop):
        pipe(*args, **kwargs)
    return seen


@pytest.fixture(scope="module")
def tiny_default_pipe():
    return tiny.tiny_pipeline()


def test_the_signature_keeps_the_official_defaults():
    parameters = inspect.signature(BerniniPipeline.__call__).parameters
    assert {name: parameters[name].default for name in OFFICIAL} == OFFICIAL


def test_the_tiny_pipelines_default_call_is_tiny(tiny_default_pipe, monkeypatch):
    assert tiny_default_pipe.config.call_defaults == TINY_CALL_DEFAULTS
    assert _sizes_of_a_call(tiny_default_pipe, monkeypatch, "a cat") == TINY_CALL_DEFAULTS


def test_a_tiny_default_call_runs_tiny(tiny_default_pipe):
    steps = []

    def count(pipe, step, timestep, callback_kwargs):
        steps.append(step)
        return callback_kwargs

    out = tiny_default_pipe("a cat", output_type="latent", callback_on_step_end=count,
                            generator=torch.Generator().manual_seed(0))  # fmt: skip
    assert tuple(out.frames.shape) == (1, 16, 3, 8, 12)  # 9 frames at 64x96
    assert len(steps) == 4


def test_an_explicit_size_wins_even_at_the_official_value(tiny_default_pipe, monkeypatch):
    seen = _sizes_of_a_call(tiny_default_pipe, monkeypatch, "a cat", num_frames=81, height=32)
    assert seen == {**TINY_CALL_DEFAULTS, "num_frames": 81, "height": 32}
    # positional arguments count as given too (prompt, task_type, video, image, images, ..., num_frames is the 9th)
    seen = _sizes_of_a_call(tiny_default_pipe, monkeypatch, "a cat", "t2v", None, None, None, None, None, None, 17)
    assert seen["num_frames"] == 17 and seen["height"] == TINY_CALL_DEFAULTS["height"]


def test_a_normal_pipeline_keeps_the_official_defaults(tiny_pipe, monkeypatch):
    assert tiny_pipe.config.call_defaults is None
    assert _sizes_of_a_call(tiny_pipe, monkeypatch, "a cat") == OFFICIAL
    official = tiny.tiny_pipeline(call_defaults=None)
    assert _sizes_of_a_call(official, monkeypatch, "a cat") == OFFICIAL


def test_call_defaults_survive_save_and_load(tiny_default_pipe, tmp_path, monkeypatch):
    tiny_default_pipe.save_pretrained(tmp_path / "saved")
    loaded = BerniniPipeline.from_pretrained(tmp_path / "saved")
    assert loaded.config.call_defaults == TINY_CALL_DEFAULTS
    assert _sizes_of_a_call(loaded, monkeypatch, "a cat") == TINY_CALL_DEFAULTS


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ({"steps": 4}, "keys are some of num_frames"),
        ({"num_frames": 0}, "`call_defaults['num_frames']`=0 must be an integer >= 1"),
        ("tiny", "must be None or a dict"),
    ],
)
def test_bad_call_defaults_are_refused(value, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        tiny.tiny_pipeline(call_defaults=value)
