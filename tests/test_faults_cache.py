"""MagCache calibration files and tables that do not fit: refused when read (not finite, not positive, the wrong
length, an unknown mode or key, not JSON) and when a call runs another mode, step count or expert split than the
table was made for, before the first transformer forward.
"""

from __future__ import annotations

import json

import pytest
import torch

from bernini_diffusers.acceleration import MagCacheCalibration
from bernini_diffusers.pipeline_bernini import BerniniPipeline
from bernini_diffusers.tasks import TASKS, parse_task_type
from bernini_diffusers.testing import get_tiny_components

# 8 steps at shift 5 split 4 + 4 between the experts (tests/test_acceleration.py).
CALL = {"prompt": "a red ball", "task_type": "t2v", "num_frames": 1, "height": 32, "width": 32,
        "num_inference_steps": 8, "output_type": "latent"}  # fmt: skip
MODE = TASKS[parse_task_type("t2v")].default_guidance_mode.value
GOOD = {"guidance_mode": MODE, "num_inference_steps": 8,
        "ratios": {"transformer": [1.0, 0.99, 0.98, 0.97], "transformer_2": [1.0, 0.98, 0.97, 0.96]}}  # fmt: skip


def write(tmp_path, data) -> str:
    path = tmp_path / "mag.json"
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


@pytest.mark.parametrize(
    "change, message",
    [
        ({"ratios": {"transformer": [1.0, float("nan"), 1, 1], "transformer_2": [1, 1, 1, 1]}},
         r"`ratios\['transformer'\]\[1\]`=nan; every ratio must be a finite number > 0"),
        ({"ratios": {"transformer": [1.0, 1e400, 1, 1], "transformer_2": [1, 1, 1, 1]}}, r"\[1\]`=inf"),
        ({"ratios": {"transformer": [1.0, -0.5, 1, 1], "transformer_2": [1, 1, 1, 1]}}, r"\[1\]`=-0.5"),
        ({"ratios": {"transformer": [1.0, 0, 1, 1], "transformer_2": [1, 1, 1, 1]}}, r"\[1\]`=0"),
        ({"ratios": {"transformer": [1.0, "x", 1, 1], "transformer_2": [1, 1, 1, 1]}}, r"\[1\]`='x'"),
        ({"ratios": {"transformer": [1.0, 1.0, 1.0], "transformer_2": [1, 1, 1, 1]}},
         r"the tables hold 7 steps \(transformer: 3, transformer_2: 4\), but `num_inference_steps`=8"),
        ({"ratios": {"unet": [1.0] * 8}}, r"`ratios` must map one or both of"),
        ({"ratios": {}}, r"`ratios` must map one or both of"),
        ({"guidance_mode": "cfg9"}, r"`guidance_mode`='cfg9' is not a guidance mode"),
        ({"num_inference_steps": 8.5}, r"`num_inference_steps`=8.5 must be a positive integer"),
        ({"num_inference_steps": 0}, r"`num_inference_steps`=0 must be a positive integer"),
        ({"extra": 1}, r"must be an object with the keys"),
    ],
)
def test_bad_calibration_file_is_refused_naming_it(tmp_path, change, message):
    path = write(tmp_path, {**GOOD, **change})
    text = path.read_text()
    with pytest.raises(ValueError, match=message) as err:
        MagCacheCalibration.load(path)
    assert f"MagCache calibration '{path}'" in str(err.value)
    assert path.read_text() == text  # left as it was


def test_unreadable_or_missing_calibration_file(tmp_path):
    with pytest.raises(ValueError, match="is not readable JSON"):
        MagCacheCalibration.load(write(tmp_path, "{not json"))
    with pytest.raises(ValueError, match="must be an object with the keys"):
        MagCacheCalibration.load(write(tmp_path, "[1, 2]"))
    with pytest.raises(FileNotFoundError, match="no such MagCache calibration file: '.*nope.json'"):
        MagCacheCalibration.load(tmp_path / "nope.json")


def test_good_calibration_round_trips(tmp_path):
    calibration = MagCacheCalibration.load(write(tmp_path, GOOD))
    assert calibration == MagCacheCalibration(**GOOD)
    with pytest.raises(ValueError, match=r"MagCacheCalibration: `ratios\['transformer_2'\]\[0\]`=-1"):
        MagCacheCalibration(**{**GOOD, "ratios": {**GOOD["ratios"], "transformer_2": [-1, 1, 1, 1]}})


@pytest.fixture
def cached(tmp_path):
    pipe = BerniniPipeline(**get_tiny_components())
    pipe.set_progress_bar_config(disable=True)
    pipe.enable_cache_preset("magcache", calibration=MagCacheCalibration.load(write(tmp_path, GOOD)))
    forwards = []
    for expert in (pipe.transformer, pipe.transformer_2):
        expert.register_forward_pre_hook(lambda module, args: forwards.append(1))
    return pipe, forwards


@pytest.mark.parametrize(
    "change, message",
    [
        ({"guidance_mode": "t2v_apg" if MODE != "t2v_apg" else "t2v"},
         rf"made for `guidance_mode`='{MODE}', but the call runs"),
        ({"num_inference_steps": 6}, r"made for `num_inference_steps`=8, but the call runs 6"),
        ({"flow_shift": 1.0}, r"splits its steps \{'transformer': 4, 'transformer_2': 4\} between the experts, but the "
                              r"call splits them \{'transformer': \d, 'transformer_2': \d\}"),
    ],
)
def test_call_of_another_mode_steps_or_split_is_refused_before_any_forward(cached, change, message):
    pipe, forwards = cached
    with pytest.raises(ValueError, match=message):
        pipe(**{**CALL, **change}, generator=torch.Generator().manual_seed(0))
    assert forwards == []
    pipe(**CALL, generator=torch.Generator().manual_seed(0))  # the call it was made for runs
    assert forwards
    pipe.disable_cache()  # no cache, no check
    pipe(**{**CALL, **change}, generator=torch.Generator().manual_seed(0))
