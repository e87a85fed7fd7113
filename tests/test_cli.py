"""Tests of the `bernini` command line, on the tiny random model (offline, CPU)."""

from __future__ import annotations

import argparse
import inspect
import os
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from bernini_diffusers import attention, cli
from bernini_diffusers.media import read_video
from bernini_diffusers.pipeline_bernini import BerniniPipeline
from bernini_diffusers.tasks import TASKS, GuidanceMode, TaskType
from bernini_diffusers.testing import make_test_video

SMALL = ["--model", "tiny", "--prompt", "a cat", "--num_frames", "5", "--height", "32", "--width", "48",
         "--num_inference_steps", "2"]  # fmt: skip
# `__call__` arguments that are Python-only (objects, callbacks) or fixed by the CLI.
NOT_FLAGS = {
    "self", "generator", "latents", "output_type", "return_dict", "attention_kwargs", "callback_on_step_end",
    "callback_on_step_end_tensor_inputs",
}  # fmt: skip


def generate_parser() -> argparse.ArgumentParser:
    (subparsers,) = [a for a in cli.build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return subparsers.choices["generate"]


def contract_parameters() -> dict[str, inspect.Parameter]:
    parameters = inspect.signature(BerniniPipeline.__call__).parameters
    return {name: p for name, p in parameters.items() if name not in NOT_FLAGS}


def run_module(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "bernini_diffusers.cli", *args], capture_output=True, text=True, env=env, timeout=300
    )


def to_uint8(frames: np.ndarray) -> np.ndarray:
    return (np.clip(frames, 0, 1) * 255).astype(np.uint8)


# --- the parser -------------------------------------------------------------------------------


def test_every_contract_argument_has_a_same_named_flag():
    actions = {opt: a for a in generate_parser()._actions for opt in a.option_strings}
    for name in contract_parameters():
        assert f"--{name}" in actions, f"no --{name} flag"
        assert actions[f"--{name}"].dest == name
    assert set(cli.CALL_ARGUMENTS) == set(contract_parameters())


def test_flag_defaults_match_call_defaults():
    parser = generate_parser()
    for name, parameter in contract_parameters().items():
        default = parser.get_default(name)
        if name == "norm_threshold":  # the official CLI's three values, each the pipeline's default
            assert default == [parameter.default] * 3
        else:
            assert default == parameter.default, name
    assert parser.get_default("seed") == 42
    assert parser.get_default("output") == "outputs/output.mp4"


def test_full_argv_parses_with_types_and_official_aliases():
    argv = ["generate", "--config", "some/dir", "--prompt", "p", "--task_type", "ads2v", "--video", "a.mp4", "b.mp4",
            "--images", "r.png", "--image", "s.png", "--neg_prompt", "n", "--system_prompt", "", "--guidance_mode",
            "v2v_apg", "--num_frames", "9", "--height", "64", "--width", "96", "--max_image_size", "128", "--fps",
            "24", "--num_inference_steps", "3", "--flow_shift", "3", "--omega_vid", "1", "--omega_img", "2",
            "--omega_txt", "3", "--omega_scale", "1", "--eta", "0", "--momentum", "0.5", "--norm_threshold", "0",
            "7", "--seed", "7", "--dtype", "fp16", "--device", "cpu", "--attention_backend", "sdpa",
            "--enable_model_cpu_offload", "--output", "o.mp4"]  # fmt: skip
    args = cli.build_parser().parse_args(argv)
    assert args.model == "some/dir" and args.negative_prompt == "n" and args.system_prompt == ""
    assert args.video == ["a.mp4", "b.mp4"] and args.images == ["r.png"]
    assert args.fps == 24.0 and isinstance(args.num_frames, int) and args.norm_threshold == [0.0, 7.0]
    assert args.enable_model_cpu_offload and args.attention_backend == "sdpa" and args.dtype == "fp16"


def test_attention_backend_choices_match_the_alias_table():
    assert cli.ATTENTION_BACKENDS == attention.ATTENTION_BACKENDS


def test_arguments_reach_the_pipeline(monkeypatch, tmp_path):
    calls = []

    def fake_pipe(**kwargs):
        calls.append(kwargs)
        return SimpleNamespace(frames=np.zeros((1, 1, 16, 16, 3), np.float32), fps=kwargs["fps"])

    monkeypatch.setattr(cli, "load_pipeline", lambda args: fake_pipe)
    argv = ["generate", "--config", "x", "--prompt", "p", "--system_prompt", "", "--neg_prompt", "bad",
            "--seed", "3", "--norm_threshold", "10", "20", "--output", str(tmp_path / "o.mp4")]  # fmt: skip
    assert cli.main(argv) == 0
    (kwargs,) = calls
    assert kwargs["system_prompt"] is None  # "" = the task's own prefix, as the official CLI
    assert kwargs["negative_prompt"] == "bad" and kwargs["norm_threshold"] == [10.0, 20.0]
    assert kwargs["task_type"] == "t2v" and kwargs["guidance_mode"] is None and kwargs["output_type"] == "np"
    assert torch.equal(torch.randn(4, generator=kwargs["generator"]), torch.randn(4, generator=torch.manual_seed(3)))
    assert (tmp_path / "o.png").is_file() and not (tmp_path / "o.mp4").exists()


# --- generation with the tiny model -----------------------------------------------------------------------------


def test_t2v_writes_an_mp4_with_the_requested_frames(tmp_path, capsys):
    out = tmp_path / "x.mp4"
    assert cli.main(["generate", *SMALL, "--task_type", "t2v", "--output", str(out)]) == 0
    frames, fps = read_video(out)
    assert len(frames) == 5 and frames[0].size == (48, 32) and fps == 16
    captured = capsys.readouterr()
    assert captured.out.strip() == str(out)
    assert "random weights" in captured.err


def test_t2i_writes_a_png_even_when_asked_for_mp4(tmp_path, capsys):
    assert cli.main(["generate", *SMALL, "--task_type", "t2i", "--output", str(tmp_path / "img.mp4")]) == 0
    assert not (tmp_path / "img.mp4").exists()
    with Image.open(tmp_path / "img.png") as image:
        assert image.size == (48, 32) and image.mode == "RGB"
    assert capsys.readouterr().out.strip() == str(tmp_path / "img.png")


def test_v2v_with_a_video_file(tmp_path):
    source = make_test_video(tmp_path / "source.mp4", num_frames=9, width=48, height=32, fps=16)
    out = tmp_path / "edit.mp4"
    argv = ["generate", *SMALL, "--task_type", "v2v", "--video", str(source), "--output", str(out)]
    assert cli.main(argv) == 0
    frames, _ = read_video(out)
    assert len(frames) == 5 and frames[0].size == (48, 32)


def test_cli_equals_the_python_api(tmp_path, tiny_pipe):
    assert cli.main(["generate", *SMALL, "--task_type", "t2i", "--output", str(tmp_path / "cli.png")]) == 0
    expected = tiny_pipe(
        prompt="a cat", task_type="t2i", height=32, width=48, num_inference_steps=2,
        norm_threshold=[50.0, 50.0, 50.0], generator=torch.Generator("cpu").manual_seed(42),
    ).frames[0]  # fmt: skip
    written = np.asarray(Image.open(tmp_path / "cli.png"))
    np.testing.assert_array_equal(written, to_uint8(expected[0]))


# --- errors ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv",
    [
        ["generate", "--model", "tiny", "--task_type", "x2v"],
        ["generate", "--model", "tiny", "--guidance_mode", "nope"],
        ["generate", "--model", "tiny", "--num_frames", "five"],
        ["generate", "--model", "tiny", "--dtype", "fp64"],
        ["generate", "--prompt", "no model"],
        ["render"],
    ],
)
def test_bad_flags_exit_2_from_argparse(argv):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2


def test_no_subcommand_prints_help_and_returns_2(capsys):
    assert cli.main([]) == 2
    assert "generate" in capsys.readouterr().err


def test_v2v_without_video_names_the_argument(tmp_path, capsys):
    out = tmp_path / "out.mp4"
    assert cli.main(["generate", *SMALL, "--task_type", "v2v", "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert "bernini: error:" in err and "`video`" in err
    assert list(tmp_path.iterdir()) == []


def test_missing_video_file_is_an_error_without_traceback_or_output(tmp_path, capsys):
    out = tmp_path / "out.mp4"
    missing = tmp_path / "missing.mp4"
    argv = ["generate", *SMALL, "--task_type", "v2v", "--video", str(missing), "--output", str(out)]
    assert cli.main(argv) == 2  # an exception escaping main would fail here
    captured = capsys.readouterr()
    assert "bernini: error:" in captured.err and "`video`" in captured.err and str(missing) in captured.err
    assert "Traceback" not in captured.err and captured.out == ""
    assert list(tmp_path.iterdir()) == []  # neither the output nor a temporary file


def test_module_entry_point_exits_2_on_a_bad_flag():
    result = run_module("generate", "--model", "tiny", "--task_type", "x2v")
    assert result.returncode == 2 and "invalid choice: 'x2v'" in result.stderr
    assert "Traceback" not in result.stderr


def test_help_lists_subcommands_tasks_and_guidance_modes():
    top = run_module("--help")
    assert top.returncode == 0 and "generate" in top.stdout
    generate = run_module("generate", "--help")
    assert generate.returncode == 0
    for task in TaskType:
        assert f"  {task.value} " in generate.stdout
        assert f"guidance {TASKS[task].default_guidance_mode.value}" in generate.stdout
    for mode in GuidanceMode:
        assert mode.value in generate.stdout
    assert "(default: 81)" in generate.stdout and "--neg_prompt" in generate.stdout
