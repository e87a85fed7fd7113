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
from chat_server import ChatServer
from PIL import Image

from bernini_diffusers import attention, cli
from bernini_diffusers.guidance import Combo
from bernini_diffusers.media import read_video
from bernini_diffusers.pipeline_bernini import BerniniPipeline
from bernini_diffusers.tasks import PLANNER_GUIDANCE_MODES, TASKS, GuidanceMode, TaskType
from bernini_diffusers.testing import make_test_image, make_test_video, save_tiny_pretrained, tiny_pipeline

SMALL = ["--model", "tiny", "--prompt", "a cat", "--num_frames", "5", "--height", "32", "--width", "48",
         "--num_inference_steps", "2"]  # fmt: skip
# `__call__` arguments that are Python-only (objects, callbacks, diffusers' aliases and batching) or fixed by the CLI.
NOT_FLAGS = {
    "self", "generator", "latents", "output_type", "return_dict", "attention_kwargs", "callback_on_step_end",
    "callback_on_step_end_tensor_inputs", "prompt_embeds", "negative_prompt_embeds", "guidance_scale",
    "num_videos_per_prompt", "max_sequence_length",
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
    args = parser.parse_args(["--model", "some/repo"])
    cli.resolve_size_defaults(args)  # the size flags are unset until the model is known
    for name, parameter in contract_parameters().items():
        default = getattr(args, name)
        if name == "norm_threshold":  # the official CLI's three values, each the pipeline's default
            assert default == [parameter.default] * 3
        elif name == "task_type":  # chosen from the media of each case (cases.default_task_type)
            assert default is None
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
    # every name the flag offers is either `auto` or has a diffusers backend behind it
    choices = next(a.choices for a in cli.build_parser()._subparsers._group_actions[0].choices["generate"]._actions
                   if a.dest == "attention_backend")
    assert set(choices) == {"auto", *attention._DIFFUSERS_NAMES}


def test_arguments_reach_the_pipeline(monkeypatch, tmp_path):
    calls = []

    def fake_pipe(**kwargs):
        calls.append(kwargs)
        return SimpleNamespace(frames=np.zeros((1, 1, 16, 16, 3), np.float32), fps=kwargs["fps"])

    monkeypatch.setattr(cli, "load_pipeline", lambda args: fake_pipe)
    argv = ["generate", "--config", "x", "--prompt", "p", "--task_type", "t2v", "--system_prompt", "",
            "--neg_prompt", "bad", "--seed", "3", "--norm_threshold", "10", "20",
            "--output", str(tmp_path / "o.mp4")]  # fmt: skip
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


# --- context windows (long clips) -------------------------------------------------------------------------------


def fake_pipeline(calls: list):
    def fake_pipe(**kwargs):
        calls.append(kwargs)
        return SimpleNamespace(frames=np.zeros((1, 5, 16, 16, 3), np.float32), fps=kwargs["fps"])

    return fake_pipe


def test_context_window_flags_reach_the_call(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(cli, "load_pipeline", lambda args: fake_pipeline(calls))
    argv = ["generate", "--config", "x", "--prompt", "p", "--task_type", "t2v", "--output", str(tmp_path / "o.mp4")]
    assert cli.main(argv) == 0
    assert cli.main([*argv, "--context_frames", "33", "--context_overlap", "8"]) == 0
    off, on = calls
    assert (off["context_frames"], off["context_overlap"]) == (None, 16)  # off by default, the pipeline's overlap
    assert (on["context_frames"], on["context_overlap"]) == (33, 8)


def test_a_windowed_source_is_written_as_a_clip_whatever_num_frames_says(monkeypatch, tmp_path, capsys):
    calls = []
    monkeypatch.setattr(cli, "load_pipeline", lambda args: fake_pipeline(calls))
    source = make_test_video(tmp_path / "source.mp4", num_frames=9, width=48, height=32, fps=16)
    argv = ["generate", "--config", "x", "--prompt", "p", "--video", str(source), "--num_frames", "1",
            "--context_frames", "17", "--output", str(tmp_path / "o.mp4")]  # fmt: skip
    assert cli.main(argv) == 0
    captured = capsys.readouterr()
    # The case's output (which its lock and a batch's skip check use) is the file written, not a PNG name.
    assert f"v2v -> {tmp_path / 'o.mp4'}" in captured.err and captured.out.strip() == str(tmp_path / "o.mp4")
    assert not (tmp_path / "o.png").exists() and calls[0]["num_frames"] == 1


def test_the_token_estimate_counts_one_window(monkeypatch, tmp_path, capsys):
    # t2v at 32x48 is 2x3 tokens per latent frame: 161 frames are 41 x 6 = 246 tokens in one sequence, but one
    # forward of 17-frame windows sees 5 x 6 = 30.
    calls = []
    monkeypatch.setattr(cli, "load_pipeline", lambda args: fake_pipeline(calls))
    argv = ["generate", *SMALL, "--task_type", "t2v", "--num_frames", "161", "--max_tokens", "100",
            "--output", str(tmp_path / "o.mp4")]  # fmt: skip
    assert cli.main(argv) == 2
    assert "about 246 transformer tokens" in capsys.readouterr().err and calls == []
    assert cli.main([*argv, "--context_frames", "17", "--context_overlap", "8"]) == 0
    (call,) = calls
    assert (call["num_frames"], call["context_frames"]) == (161, 17)
    # Over the budget with windows on, the window is what to shorten.
    assert cli.main([*argv, "--context_frames", "17", "--max_tokens", "20"]) == 2
    err = capsys.readouterr().err
    assert "about 30 transformer tokens" in err and "lower --context_frames" in err and len(calls) == 1


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--context_frames", "80"], "--context_frames=80 is not on the latent grid"),
        (["--context_frames", "17", "--context_overlap", "20"],
         "--context_overlap=20 must be shorter than the window --context_frames=17"),
        (["--context_frames", "17", "--context_overlap", "6"], "--context_overlap=6 must be a multiple of 4"),
    ],
)  # fmt: skip
def test_bad_context_windows_exit_2_before_the_model_loads(tmp_path, capsys, flags, message):
    source = make_test_video(tmp_path / "source.mp4", num_frames=9, width=48, height=32, fps=16)
    out = tmp_path / "out" / "edit.mp4"
    assert cli.main(["generate", *SMALL, "--video", str(source), *flags, "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"bernini: error: {message}" in err and "Traceback" not in err
    assert "random weights" not in err  # printed when the tiny model loads: the error came first
    assert not (tmp_path / "out").exists()


def test_windowed_v2v_edits_the_whole_source(tmp_path, capsys):
    # 33 source frames, --num_frames 9: without windows the edit is cut to 9 frames; with 17-frame windows
    # overlapping by 8 (three windows over 9 latent frames) it keeps all 33.
    source = make_test_video(tmp_path / "source.mp4", num_frames=33, width=32, height=16, fps=16)
    out = tmp_path / "long.mp4"
    argv = ["generate", "--model", "tiny", "--prompt", "p", "--task_type", "v2v", "--video", str(source),
            "--num_frames", "9", "--max_image_size", "32", "--num_inference_steps", "2", "--context_frames", "17",
            "--context_overlap", "8", "--output", str(out)]  # fmt: skip
    assert cli.main(argv) == 0
    assert capsys.readouterr().out.strip() == str(out)
    frames, fps = read_video(out)
    assert len(frames) == 33 and frames[0].size == (32, 16) and fps == 16


# --- errors ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv",
    [
        ["generate", "--model", "tiny", "--task_type", "x2v"],
        ["generate", "--model", "tiny", "--guidance_mode", "nope"],
        ["generate", "--model", "tiny", "--num_frames", "five"],
        ["generate", "--model", "tiny", "--dtype", "fp64"],
        ["generate", "--model", "tiny", "--case", "a.json", "--inputs", "b.jsonl"],
        ["generate", "--model", "tiny", "--no-use_unipc", "--use_unipc=1"],
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
    assert "bernini: error:" in err and "requires --video" in err  # the flag, not the Python argument
    assert list(tmp_path.iterdir()) == []


def test_missing_video_file_is_an_error_without_traceback_or_output(tmp_path, capsys):
    out = tmp_path / "out.mp4"
    missing = tmp_path / "missing.mp4"
    argv = ["generate", *SMALL, "--task_type", "v2v", "--video", str(missing), "--output", str(out)]
    assert cli.main(argv) == 2  # an exception escaping main would fail here
    captured = capsys.readouterr()
    assert "bernini: error: --video: no such file" in captured.err and str(missing) in captured.err
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
    for text in (top.stdout, generate.stdout):
        for task in TaskType:
            assert f"  {task.value} " in text
            assert f"guidance {TASKS[task].default_guidance_mode.value}" in text
        for mode in [*GuidanceMode, *PLANNER_GUIDANCE_MODES]:
            assert str(mode) in text
    text = " ".join(generate.stdout.split())
    assert "default: 81 (9 with --model tiny)" in text and "--neg_prompt" in generate.stdout
    assert "--use_unipc, --no-use_unipc" in generate.stdout and "v2v (the official default) for one --video" in text
    assert "defaults to rv2v" in generate.stdout and "full Bernini planner" in generate.stdout
    assert "infer_single_gpu.py" in generate.stdout and "--case" in generate.stdout and "--inputs" in generate.stdout


def test_no_model_is_an_error_naming_the_flags(capsys):
    assert cli.main(["generate", "--prompt", "no model"]) == 2
    err = capsys.readouterr().err
    assert "--model/--config" in err and "--high_noise_ckpt" in err


def test_no_prompt_is_an_error(capsys):
    assert cli.main(["generate", "--model", "tiny", "--task_type", "t2i"]) == 2
    assert "--prompt" in capsys.readouterr().err


# --- the official flags -------------------------------------------------------------------------------------------

# Every flag of the official command line (docs/design.md#command-line-and-case-files) with a value, as the official
# scripts pass them.
OFFICIAL_ARGV = [
    "--config", "cfg", "--high_noise_ckpt", "hi", "--low_noise_ckpt", "lo", "--use_unipc", "--use_src_tgt_id",
    "--interpolate_src_id", "--max_trained_src_id", "5", "--prompt", "p", "--task_type", "rv2v", "--video", "v.mp4",
    "--image", "s.png", "--images", "a.png", "b.png", "--output", "o.mp4", "--neg_prompt", "n", "--system_prompt", "",
    "--num_frames", "81", "--max_image_size", "848", "--height", "480", "--width", "848", "--num_inference_steps",
    "40", "--guidance_mode", "rv2v", "--omega_vid", "1.25", "--omega_img", "4.5", "--omega_txt", "4.0", "--omega_tgt",
    "0.5", "--omega_scale", "0.8", "--planning_step", "25", "--vit_txt_cfg", "1.2", "--vit_img_cfg", "1.0",
    "--vit_denoising_step", "5", "--flow_shift", "5.0", "--seed", "42", "--fps", "16", "--eta", "0.5",
    "--norm_threshold", "50", "50", "50", "--momentum", "0", "--use_pe", "--pe_model", "m", "--ulysses", "8",
]  # fmt: skip


def test_every_official_flag_parses_and_its_default_is_the_official_one():
    args = cli.build_parser().parse_args(["generate", *OFFICIAL_ARGV])
    assert args.model == "cfg" and args.high_noise_ckpt == "hi" and args.ulysses == 8 and args.use_pe
    assert args.omega_tgt == 0.5 and args.planning_step == 25 and args.images == ["a.png", "b.png"]
    parser = generate_parser()
    official_defaults = {
        "model": None, "high_noise_ckpt": None, "low_noise_ckpt": None, "use_unipc": True, "use_src_tgt_id": True,
        "interpolate_src_id": True, "max_trained_src_id": 5, "task_type": None, "output": "outputs/output.mp4",
        "case": None, "inputs": None, "omega_tgt": 0.5, "planning_step": 25, "vit_txt_cfg": 1.2, "vit_img_cfg": 1.0,
        "vit_denoising_step": 5, "use_pe": False, "pe_model": None, "ulysses": 1, "branch_parallel": 1,
        "overwrite": False, "seed": 42, "fps": 16, "norm_threshold": [50.0, 50.0, 50.0],
    }  # fmt: skip
    for name, value in official_defaults.items():
        assert parser.get_default(name) == value, name
    off = cli.build_parser().parse_args(
        ["generate", "--no-use_unipc", "--no-use_src_tgt_id", "--no-interpolate_src_id", "--max_trained_src_id", "3"]
    )
    assert (off.use_unipc, off.use_src_tgt_id, off.interpolate_src_id) == (False, False, False)
    assert off.max_trained_src_id == 3


@pytest.mark.parametrize("mode", PLANNER_GUIDANCE_MODES)
def test_planner_guidance_modes_are_refused_before_loading(monkeypatch, capsys, mode):
    monkeypatch.setattr(cli, "load_pipeline", lambda args: pytest.fail("the model must not load"))
    assert cli.main(["generate", *SMALL, "--task_type", "t2v", "--guidance_mode", mode]) == 2
    err = capsys.readouterr().err
    assert f"'{mode}'" in err and "full Bernini planner" in err and "v2v_apg" in err


def test_planner_only_flags_are_accepted_and_noted(tmp_path, capsys):
    argv = ["generate", *SMALL, "--task_type", "t2i", "--omega_tgt", "1.5", "--vit_denoising_step", "7",
            "--planning_step", "25", "--output", str(tmp_path / "x.png")]  # fmt: skip
    assert cli.main(argv) == 0
    err = capsys.readouterr().err
    assert "--omega_tgt, --vit_denoising_step only apply to the full Bernini planner" in err


def test_resolve_model():
    def args(**kw):
        return SimpleNamespace(**{"model": None, "high_noise_ckpt": None, "low_noise_ckpt": None, **kw})

    assert cli.resolve_model(args(model="repo/x")) == ("repo/x", {})
    # The official default config names the Wan2.2 base; separate checkpoints go on top of it.
    assert cli.resolve_model(args(high_noise_ckpt="h", low_noise_ckpt="l")) == (
        "Wan-AI/Wan2.2-T2V-A14B-Diffusers", {"high_noise_ckpt": "h", "low_noise_ckpt": "l"}
    )
    assert cli.resolve_model(args(model="dir", high_noise_ckpt="h", low_noise_ckpt="l"))[0] == "dir"
    with pytest.raises(ValueError, match="must be given together; got only `low_noise_ckpt`"):
        cli.resolve_model(args(model="dir", low_noise_ckpt="l"))
    with pytest.raises(ValueError, match="`model` is not set"):
        cli.resolve_model(args())
    with pytest.raises(ValueError, match="built in code"):
        cli.resolve_model(args(model="tiny", high_noise_ckpt="h", low_noise_ckpt="l"))


def test_model_flags_reach_the_pipeline_config():
    args = cli.build_parser().parse_args(
        ["generate", "--model", "tiny", "--no-use_unipc", "--no-use_src_tgt_id", "--no-interpolate_src_id",
         "--max_trained_src_id", "3", "--attention_backend", "sdpa"]
    )  # fmt: skip
    pipe = cli.load_pipeline(args)
    config = pipe.config
    assert (config.use_unipc, config.use_src_id_rotary_emb, config.interpolate_src_id) == (False, False, False)
    assert config.max_trained_src_id == 3 and pipe.device.type == "cpu" and pipe.transformer.dtype == torch.float32
    default = cli.load_pipeline(cli.build_parser().parse_args(["generate", "--model", "tiny"])).config
    assert (default.use_unipc, default.use_src_id_rotary_emb, default.interpolate_src_id) == (True, True, True)


def test_ulysses_without_torchrun_is_a_clear_error(monkeypatch, capsys):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(cli, "load_pipeline", lambda args: pytest.fail("the model must not load"))
    assert cli.main(["generate", *SMALL, "--task_type", "t2v", "--ulysses", "8"]) == 2
    err = capsys.readouterr().err
    assert "--ulysses=8" in err and "torchrun --nproc-per-node 8" in err and "WORLD_SIZE is 1" in err


# --- the pipeline seams of the official model flags ---------------------------------------------------------------


def test_euler_fallback_sigmas_are_the_official_ones():
    from bernini_diffusers.scheduling import FlowMatchEulerScheduler, official_euler_sigmas

    pipe = tiny_pipeline()
    pipe.register_to_config(use_unipc=False)
    scheduler = pipe._scheduler_for_call(3.0)
    assert isinstance(scheduler, FlowMatchEulerScheduler)
    scheduler.set_timesteps(sigmas=official_euler_sigmas(5))
    s = np.linspace(1.0, 0.003 / 1.002, 5)
    expected = 3.0 * s / (1 + 2.0 * s)
    np.testing.assert_allclose(scheduler.sigmas.numpy(), [*expected, 0.0], rtol=1e-6)
    np.testing.assert_allclose(scheduler.timesteps.numpy(), expected * 1000, rtol=1e-6)


def test_euler_step_keeps_the_sample_in_float32():
    from bernini_diffusers.scheduling import FlowMatchEulerScheduler, official_euler_sigmas

    scheduler = FlowMatchEulerScheduler(shift=5.0)
    scheduler.set_timesteps(sigmas=official_euler_sigmas(3))
    sample = torch.randn(2, 3, generator=torch.Generator().manual_seed(0))
    velocity = torch.randn(2, 3, generator=torch.Generator().manual_seed(1)).bfloat16()
    out = scheduler.step(velocity, scheduler.timesteps[0], sample, return_dict=False)[0]
    dt = scheduler.sigmas[1] - scheduler.sigmas[0]
    assert out.dtype == torch.float32  # diffusers' own step would hand back bf16
    assert torch.equal(out, sample + (velocity * dt))  # the product in bf16, as upstream


def test_no_use_unipc_runs_an_independent_euler_loop_exactly(tiny_pipe):
    """`use_unipc=False` equals Euler written out: x += v * (sigma_next - sigma), CFG on text, expert switch."""
    from bernini_diffusers.tasks import DEFAULT_NEGATIVE_PROMPT
    from bernini_diffusers.text import positive_text

    pipe = tiny_pipeline()
    pipe.register_to_config(use_unipc=False)
    steps, shift, omega_txt, omega_scale = 4, 5.0, 4.0, 0.8
    got = pipe("a red ball", task_type="t2v", guidance_mode="t2v", num_frames=5, height=32, width=48,
               num_inference_steps=steps, flow_shift=shift, omega_txt=omega_txt, omega_scale=omega_scale,
               generator=torch.Generator("cpu").manual_seed(7), output_type="latent").frames  # fmt: skip

    s = torch.linspace(1.0, 0.003 / 1.002, steps, dtype=torch.float32)
    sigmas = torch.cat([shift * s / (1 + (shift - 1) * s), torch.zeros(1)])
    positive, negative = pipe.encode_prompt(
        positive_text("a red ball", TaskType.T2V, None), DEFAULT_NEGATIVE_PROMPT,
        device=torch.device("cpu"), dtype=torch.float32, task_type=None,  # the prefix is already in the text
    )
    x = torch.randn((1, 16, 2, 4, 6), generator=torch.Generator("cpu").manual_seed(7), dtype=torch.float32)
    weight = omega_txt
    for i in range(steps):
        t = sigmas[i] * 1000
        low = float(t) < 875
        model = pipe.transformer_2 if low else pipe.transformer
        if low and weight == omega_txt:
            weight = omega_txt * omega_scale  # once, at the first low-noise step
        uncond = model(x, t.expand(1), negative, return_dict=False)[0]
        cond = model(x, t.expand(1), positive, return_dict=False)[0]
        x = x + (uncond + weight * (cond - uncond)) * (sigmas[i + 1] - sigmas[i])
    assert sigmas[1] * 1000 > 875 > sigmas[2] * 1000  # both experts take part
    torch.testing.assert_close(got, x, rtol=0, atol=1e-5)
    unipc = tiny_pipe("a red ball", task_type="t2v", guidance_mode="t2v", num_frames=5, height=32, width=48,
                      num_inference_steps=steps, generator=torch.Generator("cpu").manual_seed(7),
                      output_type="latent").frames  # fmt: skip
    assert not torch.allclose(unipc, got, atol=1e-3)  # the flag changes the sampler


def test_no_use_src_tgt_id_gives_every_stream_id_zero(tiny_pipe, media_dir):
    pipe = tiny_pipeline()
    pipe.register_to_config(use_src_id_rotary_emb=False)
    latent = torch.zeros(1, 16, 1, 4, 6)
    conditions = pipe.build_conditions([latent, latent], latent, [latent] * 6)
    assert all(c.ids == [0.0] * len(c.latents) for c in conditions.values())
    on_ids = tiny_pipe.build_conditions([latent, latent], latent, [latent] * 6)[Combo.VI].ids
    assert on_ids == torch.linspace(1, 5, 9, dtype=torch.float64).tolist()  # 9 sources spread over [1, 5]
    call = {"prompt": "make it winter", "task_type": "i2i", "image": str(media_dir / "source.png"),
            "images": [str(media_dir / "ref_a.png")], "num_inference_steps": 2, "output_type": "latent"}
    off = pipe(**call, generator=torch.Generator("cpu").manual_seed(0)).frames
    on = tiny_pipe(**call, generator=torch.Generator("cpu").manual_seed(0)).frames
    assert not torch.allclose(on, off, atol=1e-4)  # the ids reach the model


# --- the model card's commands ------------------------------------------------------------------------------------

# The official examples of the Bernini-R model card, verbatim; `<hi>`/`<lo>` are checkpoint paths.
CARD_COMMANDS = {
    "t2i-diffusers": "python infer_single_gpu.py --config Bernini-R-Diffusers "
                     "--case assets/testcases/t2i/t2i.json --num_frames 1",
    "t2i": "python infer_single_gpu.py --high_noise_ckpt <hi> --low_noise_ckpt <lo> "
           "--case assets/testcases/t2i/t2i.json --num_frames 1",
    "i2i": "python infer_single_gpu.py --high_noise_ckpt <hi> --low_noise_ckpt <lo> "
           "--case assets/testcases/i2i/i2i.json --num_frames 1",
    "t2v": "torchrun --nproc-per-node 8 infer_multi_gpu.py --high_noise_ckpt <hi> --low_noise_ckpt <lo> --ulysses 8 "
           "--case assets/testcases/t2v/t2v.json",
    "v2v": "torchrun --nproc-per-node 8 infer_multi_gpu.py --high_noise_ckpt <hi> --low_noise_ckpt <lo> --ulysses 8 "
           "--case assets/testcases/v2v/v2v_case1.json",
    "mv2v": "torchrun --nproc-per-node 8 infer_multi_gpu.py --high_noise_ckpt <hi> --low_noise_ckpt <lo> --ulysses 8 "
            "--case assets/testcases/v2v/v2v_case2.json",
    "rv2v": "torchrun --nproc-per-node 8 infer_multi_gpu.py --high_noise_ckpt <hi> --low_noise_ckpt <lo> --ulysses 8 "
            "--case assets/testcases/rv2v/rv2v_case1.json",
    "ads2v": "torchrun --nproc-per-node 8 infer_multi_gpu.py --high_noise_ckpt <hi> --low_noise_ckpt <lo> --ulysses 8 "
             "--case assets/testcases/rv2v/rv2v_case2.json --num_frames 121 --fps 24 --max_image_size 1280",
    "r2v": "torchrun --nproc-per-node 8 infer_multi_gpu.py --high_noise_ckpt <hi> --low_noise_ckpt <lo> --ulysses 8 "
           "--case assets/testcases/r2v/r2v.json",
}  # fmt: skip
# The bundled renderer case files, recreated in the official format (no guidance_mode: the scripts supply it).
T = "assets/testcases"
CASE_FILES = {
    "t2i/t2i.json": {"task_type": "t2i", "prompt": "A lighthouse on a cliff at dusk.",
                     "output": f"{T}/t2i/t2i_out.png"},
    "i2i/i2i.json": {"task_type": "i2i", "prompt": "Make it a snowy winter day.", "image": f"{T}/i2i/source.png",
                     "output": f"{T}/i2i/i2i_out.png"},
    "t2v/t2v.json": {"task_type": "t2v", "prompt": "A fox runs through fresh snow.", "output": f"{T}/t2v/t2v_out.mp4"},
    "v2v/v2v_case1.json": {"task_type": "v2v", "prompt": "Add a realistic snowman beside the path.",
                           "video": f"{T}/v2v/source_case1.mp4", "output": f"{T}/v2v/v2v_case1_out.mp4"},
    "v2v/v2v_case2.json": {"task_type": "mv2v", "prompt": "Make the person crouch down.",
                           "video": f"{T}/v2v/source_case2.mp4", "output": f"{T}/v2v/v2v_case2_out.mp4"},
    "rv2v/rv2v_case1.json": {"task_type": "rv2v", "prompt": "Replace the shirt with the one in image0.",
                             "video": f"{T}/rv2v/source_case1.mp4", "images": [f"{T}/rv2v/ref_case1.png"],
                             "output": f"{T}/rv2v/rv2v_case1_out.mp4"},
    "rv2v/rv2v_case2.json": {"task_type": "ads2v", "prompt": "Insert the can onto the table.",
                             "video": [f"{T}/rv2v/source_case2.mp4", f"{T}/rv2v/insert_case2.mp4"],
                             "output": f"{T}/rv2v/rv2v_case2_out.mp4"},
    "r2v/r2v.json": {"task_type": "r2v", "prompt": "image0 walks along a beach with image1.",
                     "images": [f"{T}/r2v/ref0.png", f"{T}/r2v/ref1.png"], "output": f"{T}/r2v/r2v_out.mp4"},
}  # fmt: skip
# Speed flags appended to every command for the tiny model on a CPU (the case files set everything else).
FAST = ["--num_inference_steps", "2", "--height", "32", "--width", "48"]


def save_original_checkpoint(path, expert: str, seed: int):
    """An original-layout expert checkpoint (`ByteDance/Bernini-R`): EMA-prefixed keys in one safetensors file."""
    from safetensors.torch import save_file

    from bernini_diffusers.testing import tiny_transformer

    model = tiny_transformer(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({f"ema.diff_dec.{expert}.{k}": v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return model


def with_full_rope(directory):
    """The released experts' RoPE length (1024), so the official 720p flag `--max_image_size 1280` is in range; the
    tiny config's 64 caps sizes at 1024 pixels. RoPE has no weights: nothing else changes."""
    import json

    for name in ("transformer", "transformer_2"):
        config_path = directory / name / "config.json"
        config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "rope_max_seq_len": 1024}))
    return directory


@pytest.fixture(scope="module")
def card_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("card_models")
    diffusers_dir = with_full_rope(save_tiny_pretrained(root / "Bernini-R-Diffusers", layout="bernini"))
    base = with_full_rope(save_tiny_pretrained(root / "wan_base", layout="wan"))
    hi, lo = root / "Bernini-R" / "bernini_renderer_high", root / "Bernini-R" / "bernini_renderer_low"
    high = save_original_checkpoint(hi / "model.safetensors", "transformer", 11)
    low = save_original_checkpoint(lo / "model.safetensors", "transformer_2", 12)
    return SimpleNamespace(diffusers=diffusers_dir, base=base, high=high, low=low, hi=hi, lo=lo)


@pytest.fixture(scope="module")
def testcases_tree(tmp_path_factory):
    """The official case tree (each command writes its own output in it)."""
    import json

    tmp_path = tmp_path_factory.mktemp("official")
    for name, case in CASE_FILES.items():
        (tmp_path / T / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / T / name).write_text(json.dumps(case, indent=2))
    make_test_image(tmp_path / T / "i2i/source.png", seed=1)
    make_test_video(tmp_path / T / "v2v/source_case1.mp4", num_frames=9, seed=2)
    make_test_video(tmp_path / T / "v2v/source_case2.mp4", num_frames=9, seed=3)
    make_test_video(tmp_path / T / "rv2v/source_case1.mp4", num_frames=9, seed=4)
    make_test_image(tmp_path / T / "rv2v/ref_case1.png", width=32, height=32, seed=5)
    make_test_video(tmp_path / T / "rv2v/source_case2.mp4", num_frames=9, fps=16, seed=6)
    make_test_video(tmp_path / T / "rv2v/insert_case2.mp4", num_frames=9, width=32, height=32, seed=7)
    make_test_image(tmp_path / T / "r2v/ref0.png", width=32, height=32, seed=8)
    make_test_image(tmp_path / T / "r2v/ref1.png", width=40, height=60, seed=9)
    return tmp_path


@pytest.fixture
def testcases(testcases_tree, monkeypatch):
    """The working directory the official commands run in: case paths are relative to it."""
    monkeypatch.chdir(testcases_tree)
    return testcases_tree


def bernini_argv(command: str, models) -> list[str]:
    """`bernini generate` arguments of an official command: the script name goes, `<hi>`/`<lo>` become the tiny
    checkpoints on the tiny base (the real default base is a 60 GB download), and `--ulysses 8` runs as one process
    here (`torchrun ... -m bernini_diffusers.cli generate` keeps it)."""
    import shlex

    argv = shlex.split(command)
    argv = argv[argv.index(next(a for a in argv if a.endswith(".py"))) + 1:]
    replace = {"Bernini-R-Diffusers": str(models.diffusers), "<hi>": str(models.hi), "<lo>": str(models.lo)}
    argv = [replace.get(a, a) for a in argv]
    if "--high_noise_ckpt" in argv:
        argv += ["--config", str(models.base)]
    if "--ulysses" in argv:
        argv[argv.index("--ulysses") + 1] = "1"
    return ["generate", *argv, *FAST]


@pytest.mark.parametrize("name", CARD_COMMANDS)
def test_model_card_commands_run_as_bernini_generate(name, card_models, testcases, capsys):
    command = CARD_COMMANDS[name]
    case = next(c for file, c in CASE_FILES.items() if file in command)
    assert cli.main(bernini_argv(command, card_models)) == 0
    output = testcases / case["output"]
    assert capsys.readouterr().out.strip() == case["output"]
    if case["task_type"] in ("t2i", "i2i"):
        with Image.open(output) as image:
            assert image.format == "PNG" and image.size == (48, 32)  # i2i: the source's size
    else:
        frames, fps = read_video(output)
        source = case.get("video")
        expected = 13 if name == "ads2v" else 9 if source else 81  # 9 frames at 16 fps; resampled to 24 fps: 13
        assert len(frames) == expected and fps == (24 if name == "ads2v" else 16)


def test_separate_checkpoints_are_the_weights_used(card_models, testcases, tiny_pipe):
    argv = bernini_argv(CARD_COMMANDS["t2i"], card_models)
    assert cli.main(argv) == 0
    written = np.asarray(Image.open(testcases / CASE_FILES["t2i/t2i.json"]["output"]))
    components = {**{k: getattr(tiny_pipe, k) for k in ("tokenizer", "text_encoder", "vae", "scheduler")},
                  "transformer": card_models.high, "transformer_2": card_models.low}  # fmt: skip
    expected = BerniniPipeline(**components)(
        CASE_FILES["t2i/t2i.json"]["prompt"], task_type="t2i", height=32, width=48, num_inference_steps=2,
        norm_threshold=[50.0, 50.0, 50.0], generator=torch.Generator("cpu").manual_seed(42),
    ).frames[0]  # fmt: skip
    np.testing.assert_array_equal(written, to_uint8(expected[0]))


def test_only_one_checkpoint_is_an_error(card_models, capsys):
    argv = ["generate", "--config", str(card_models.base), "--high_noise_ckpt", str(card_models.hi), *SMALL[2:]]
    assert cli.main(argv) == 2
    assert "must be given together" in capsys.readouterr().err


# --- the prompt enhancer from the command line -----------------------------------------------------------------------


def test_use_pe_generates_from_the_enhanced_prompt(monkeypatch, tmp_path, tiny_pipe, capsys):
    server = ChatServer()
    server.default = (200, ChatServer.completion("a red lighthouse at dusk"))
    try:
        monkeypatch.setenv("BERNINI_PE_API_KEY", "sk-test")
        monkeypatch.setenv("BERNINI_PE_BASE_URL", server.base_url)
        argv = ["generate", *SMALL, "--task_type", "t2i", "--use_pe", "--pe_model", "pe-test",
                "--output", str(tmp_path / "pe.png")]  # fmt: skip
        assert cli.main(argv) == 0
    finally:
        server.close()
    (request,) = server.requests
    assert request["body"]["model"] == "pe-test" and request["body"]["messages"][-1]["content"] == "a cat"
    assert "prompt: a red lighthouse at dusk" in capsys.readouterr().err
    expected = tiny_pipe("a red lighthouse at dusk", task_type="t2i", height=32, width=48, num_inference_steps=2,
                         norm_threshold=[50.0, 50.0, 50.0], generator=torch.Generator("cpu").manual_seed(42)).frames[0]
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "pe.png")), to_uint8(expected[0]))


def test_use_pe_falls_back_to_the_raw_prompt(monkeypatch, tmp_path, capsys, caplog):
    server = ChatServer()
    server.default = (400, {"error": {"message": "no such model"}})
    try:
        monkeypatch.setenv("BERNINI_PE_API_KEY", "sk-test")
        monkeypatch.setenv("BERNINI_PE_BASE_URL", server.base_url)
        argv = ["generate", *SMALL, "--task_type", "t2i", "--use_pe", "--output", str(tmp_path / "raw.png")]
        assert cli.main(argv) == 0
    finally:
        server.close()
    assert (tmp_path / "raw.png").is_file() and "prompt:" not in capsys.readouterr().err
    assert sum("raw prompt" in r.getMessage() for r in caplog.records) == 1


@pytest.mark.parametrize("command", ["generate", "demo"])
def test_both_commands_build_the_enhancer_from_the_same_flags(command, monkeypatch):
    monkeypatch.delenv("BERNINI_PE_MODEL", raising=False)
    parser = cli.build_parser()
    assert cli.load_prompt_enhancer(parser.parse_args([command])) is None
    enhancer = cli.load_prompt_enhancer(parser.parse_args([command, "--use_pe", "--pe_model", "pe-test"]))
    assert type(enhancer).__name__ == "PromptEnhancer" and enhancer.model == "pe-test"
    assert cli.load_prompt_enhancer(parser.parse_args([command, "--use_pe"])).model == "gpt-5.4-2026-03-05"
