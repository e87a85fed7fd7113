"""The `bernini` command line. `bernini generate` runs one case (flags or `--case FILE`) or a batch (`--inputs FILE`).

The official run scripts' commands work with `bernini generate` in place of `python infer_single_gpu.py`, and with
`torchrun ... -m bernini_diffusers.cli generate` in place of `torchrun ... infer_multi_gpu.py`. Only the standard
library and the task table are imported at module level, so `bernini --help` answers at once; torch, diffusers and
the model load inside the command, after every case has been checked.
"""

from __future__ import annotations

import argparse
import functools
import glob
import json
import os
import re
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import cases as case_files
from .constants import (
    ATTENTION_BACKENDS,
    DTYPES,
    PE_MAX_RETRIES,
    PE_MAX_TIMEOUT,
    PE_RETRIES,
    PE_RETRIES_ENV,
    PE_TIMEOUT,
    PE_TIMEOUT_ENV,
    TINY_MODEL,
    WAN22_BASE,
)
from .prompt_enhancer import printable
from .tasks import PLANNER_GUIDANCE_MODES, TASKS, GuidanceMode, Need, TaskSpec, TaskType, parse_guidance_mode

# The `BerniniPipeline.__call__` arguments that have a same-named flag and are passed on by name.
CALL_ARGUMENTS = (
    "prompt", "task_type", "video", "image", "images", "negative_prompt", "system_prompt", "guidance_mode",
    "num_frames", "height", "width", "max_image_size", "fps", "num_inference_steps", "flow_shift",
    "omega_vid", "omega_img", "omega_txt", "omega_scale", "eta", "momentum", "norm_threshold",
)
# What a case (file or batch entry) describes; every other call argument comes from the command line.
CASE_INPUTS = ("prompt", "task_type", "video", "image", "images", "guidance_mode")
GENERATION_ARGUMENTS = tuple(name for name in CALL_ARGUMENTS if name not in CASE_INPUTS)
# Flags of the full Bernini planner model, accepted with their official defaults and ignored by the renderer.
PLANNER_FLAGS = {"omega_tgt": 0.5, "planning_step": 25, "vit_txt_cfg": 1.2, "vit_img_cfg": 1.0, "vit_denoising_step": 5}
# Size flags whose default depends on the model: the official values for real weights, seconds-long runs for the
# tiny random model (the official 81 frames at 480x848 and 40 steps take tens of minutes on a CPU, for noise).
SIZE_DEFAULTS = {"num_frames": 81, "height": 480, "width": 848, "max_image_size": 848, "num_inference_steps": 40}
TINY_DEFAULTS = {"num_frames": 9, "height": 64, "width": 96, "max_image_size": 96, "num_inference_steps": 4}
# `torch.Generator.manual_seed` takes any integer in [-2**63, 2**64 - 1] (a negative seed wraps modulo 2**64).
SEED_RANGE = (-(2**63), 2**64 - 1)
# The longest guidance branch allowed by default, in transformer tokens: 2.5 times the official 720p 121-frame rv2v
# example at its upper-bound estimate (409,600), and three orders of magnitude below what the rope table of the
# released models would accept (1024 positions per axis, 1024**3 tokens).
DEFAULT_MAX_TOKENS = 2**20
MAX_TOKENS_ENV = "BERNINI_MAX_TOKENS"
DEBUG_ENV = "BERNINI_DEBUG"


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults appended to each flag's help (a None default's meaning is in the text); epilogs kept as written."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def _describe_task(spec: TaskSpec) -> str:
    inputs = []
    for name, need in (("video", spec.video), ("image", spec.image), ("images", spec.images)):
        if need is not Need.NO:
            count = f" x{spec.num_videos[1]}" if name == "video" and spec.num_videos[1] > 1 else ""
            inputs.append(f"--{name}{count} ({need.value})")
    output = "PNG" if spec.is_image else "MP4"
    return (
        f"  {spec.task.value:<6} {spec.description}; {', '.join(inputs) or 'text only'}; "
        f"guidance {spec.default_guidance_mode.value}; writes {output}"
    )


def _tasks_epilog() -> str:
    defaults: dict[GuidanceMode, list[str]] = {}
    for spec in TASKS.values():
        defaults.setdefault(spec.default_guidance_mode, []).append(spec.task.value)
    modes = [f"{m.value} (default of {', '.join(defaults[m])})" if m in defaults else m.value for m in GuidanceMode]
    return "\n".join(
        ["task types (inputs; default guidance mode; output):", *map(_describe_task, TASKS.values()), "",
         f"guidance modes: {', '.join(modes)}.",
         f"full Bernini planner modes (not in the renderer; refused): {', '.join(PLANNER_GUIDANCE_MODES)}."]
    )


_GENERATE_EPILOG = """
case file (--case FILE): one JSON object with keys task_type, guidance_mode, prompt (required), video, image,
  images, output; its values override the flags. Batch (--inputs FILE.json|FILE.jsonl): a JSON list or JSON lines
  of such objects without guidance_mode (ignored, as upstream); a case without output is written as
  <folder>/<number>_<task>.mp4|png, the folder being --output if it ends with '/' (or exists), else its folder; an
  existing output is skipped unless --overwrite. Paths are relative to the working directory.

official commands: `python infer_single_gpu.py ARGS` is `bernini generate ARGS`; `torchrun --nproc-per-node N
  infer_multi_gpu.py ARGS` is `torchrun --nproc-per-node N -m bernini_diffusers.cli generate ARGS`.
"""


def add_size_arguments(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """Add the size flags, unset by default: `resolve_size_defaults` fills them once the model is known."""
    official, tiny = SIZE_DEFAULTS, TINY_DEFAULTS
    both = "default: {} ({} with --model tiny)".format
    parser.add_argument(
        "--num_frames", type=int,
        help=f"output frames; for video inputs, the cap (4k+1); {both(official['num_frames'], tiny['num_frames'])}",
    )
    parser.add_argument(
        "--height", type=int,
        help=f"output height without a source video or image; {both(official['height'], tiny['height'])}",
    )
    parser.add_argument(
        "--width", type=int,
        help=f"output width without a source video or image; {both(official['width'], tiny['width'])}",
    )
    parser.add_argument(
        "--max_image_size", type=int,
        help=f"long-side limit of the input media; {both(official['max_image_size'], tiny['max_image_size'])}",
    )
    parser.add_argument(
        "--num_inference_steps", type=int,
        help=f"denoising steps; {both(official['num_inference_steps'], tiny['num_inference_steps'])}",
    )


def resolve_size_defaults(args: argparse.Namespace) -> dict[str, int]:
    """Fill the size flags left unset (see `add_size_arguments`) for the model of `args`; returns what was filled."""
    defaults = TINY_DEFAULTS if getattr(args, "model", None) == TINY_MODEL else SIZE_DEFAULTS
    filled = {name: value for name, value in defaults.items() if getattr(args, name, None) is None}
    for name, value in filled.items():
        setattr(args, name, value)
    return filled


def add_debug_argument(parser: argparse.ArgumentParser) -> None:
    """`--debug`: show the traceback of a failure (also `BERNINI_DEBUG=1`). Accepted before or after the command."""
    parser.add_argument(
        "--debug", action="store_true", default=argparse.SUPPRESS,
        help=f"show the full traceback of an error (also ${DEBUG_ENV}=1)",
    )


def add_model_arguments(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """Add the flags `load_pipeline` reads: the weights, dtype, device, attention kernel, offload and the official
    model switches (`--use_unipc`, `--use_src_tgt_id`, `--interpolate_src_id`, `--max_trained_src_id`).
    """
    parser.add_argument(
        "--model", "--config", dest="model", metavar="PATH|REPO|tiny",
        help=f"diffusers folder or Hub repo of the weights (the official --config folder works too); with "
             f"--high_noise_ckpt and no --model: {WAN22_BASE}; '{TINY_MODEL}': a random tiny model (noise, for tests)",
    )  # fmt: skip
    parser.add_argument(
        "--high_noise_ckpt", metavar="PATH|REPO", help="separate high-noise expert weights (with --low_noise_ckpt)"
    )
    parser.add_argument(
        "--low_noise_ckpt", metavar="PATH|REPO", help="separate low-noise expert weights (with --high_noise_ckpt)"
    )
    parser.add_argument("--dtype", choices=DTYPES, help="weights dtype (default: bf16 on an accelerator, fp32 on CPU)")
    parser.add_argument("--device", help="torch device (default: cuda, the local rank's under torchrun; else cpu)")
    parser.add_argument(
        "--attention_backend", choices=ATTENTION_BACKENDS,
        help="attention kernel (default: $BERNINI_ATTENTION_BACKEND, else auto: fa3 > fa2 > sdpa)",
    )
    parser.add_argument("--enable_model_cpu_offload", action="store_true", help="keep idle components on the CPU")
    parser.add_argument(
        "--use_unipc", action=argparse.BooleanOptionalAction, default=True,
        help="sample with UniPC; --no-use_unipc: the official Euler flow-matching fallback",
    )
    parser.add_argument(
        "--use_src_tgt_id", action=argparse.BooleanOptionalAction, default=True,
        help="source-id rotary embedding of the condition streams (use_src_id_rotary_emb)",
    )
    parser.add_argument(
        "--interpolate_src_id", action=argparse.BooleanOptionalAction, default=True,
        help="spread the ids of more than --max_trained_src_id sources over [1, max] instead of extrapolating",
    )
    parser.add_argument("--max_trained_src_id", type=int, default=5, help="largest source id seen in training")


def add_prompt_enhancer_arguments(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """Add the flags `load_prompt_enhancer` reads: `--use_pe`, `--pe_model`, `--pe_timeout` and `--pe_retries`."""

    def checked(kind: type, low: float, high: float, allowed: str):
        # Refused while the command line is parsed, naming the flag, long before any model work.
        def convert(text: str):
            try:
                value = kind(text)
            except ValueError:
                value = None
            if value is None or not (low < value <= high if kind is float else low <= value <= high):
                raise argparse.ArgumentTypeError(f"{text!r} is not {allowed}")
            return value

        return convert

    parser.add_argument(
        "--use_pe", action="store_true",
        help="rewrite each prompt through an OpenAI-compatible endpoint first ($BERNINI_PE_API_KEY or "
             "$OPENAI_API_KEY, $BERNINI_PE_BASE_URL or $OPENAI_BASE_URL); the raw prompt if it fails",
    )  # fmt: skip
    parser.add_argument(
        "--pe_model", help="the enhancer's chat model (default: $BERNINI_PE_MODEL, else the official one)"
    )
    parser.add_argument(
        "--pe_timeout", metavar="SECONDS",
        type=checked(float, 0, PE_MAX_TIMEOUT, f"a number of seconds in (0, {PE_MAX_TIMEOUT:g}]"),
        help=f"seconds one enhancer request may take (default: ${PE_TIMEOUT_ENV}, else {PE_TIMEOUT:g})",
    )  # fmt: skip
    parser.add_argument(
        "--pe_retries", metavar="N", type=checked(int, 0, PE_MAX_RETRIES, f"a whole number from 0 to {PE_MAX_RETRIES}"),
        help=f"further tries after a failed enhancer request (default: ${PE_RETRIES_ENV}, else {PE_RETRIES}); a prompt "
             "waits at most timeout x (retries + 1) plus 1 s, 2 s, ... between tries (63 s by default), then is used "
             "as given, and an endpoint that failed so is not asked again in the run",
    )  # fmt: skip


def load_prompt_enhancer(args: argparse.Namespace):
    """The `PromptEnhancer` the enhancer flags describe (see `add_prompt_enhancer_arguments`), None without --use_pe.

    Unset flags fall back to the environment; a bad `BERNINI_PE_TIMEOUT` or `BERNINI_PE_RETRIES` is a `ValueError`
    naming the variable. No request is made here.
    """
    if not args.use_pe:
        return None
    from .prompt_enhancer import PromptEnhancer  # an optional part: imported when used

    return PromptEnhancer(model=args.pe_model, timeout=args.pe_timeout, max_retries=args.pe_retries)


def _add_generate_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "generate", help="run one case or a batch; writes a PNG (one frame) or an MP4 per case",
        formatter_class=_HelpFormatter, description="Run Bernini-R cases and write their results.",
        epilog=_tasks_epilog() + "\n" + _GENERATE_EPILOG,
    )
    add_model_arguments(parser.add_argument_group("model"))

    inputs = parser.add_argument_group("inputs (a case file's values override these)")
    inputs.add_argument("--prompt", help="what to generate, or how to edit")
    inputs.add_argument(
        "--task_type", choices=[t.value for t in TaskType],
        help="the task; see 'task types' below. Default: from the media given: v2v (the official default) for one "
             "--video, t2v without media, else the one task that takes them",
    )  # fmt: skip
    inputs.add_argument("--video", nargs="+", metavar="PATH", help="source video (ads2v: source and insert)")
    inputs.add_argument("--image", metavar="PATH", help="source image (i2i)")
    inputs.add_argument("--images", nargs="+", metavar="PATH", help="reference images")
    inputs.add_argument("--output", default="outputs/output.mp4", help="output path; one frame switches it to .png")
    cases = inputs.add_mutually_exclusive_group()
    cases.add_argument("--case", metavar="FILE.json", help="one case as a JSON object (see 'case file' below)")
    cases.add_argument("--inputs", metavar="FILE.json|FILE.jsonl", help="a batch of cases (see below)")
    inputs.add_argument("--overwrite", action="store_true", help="in a batch, run cases whose output already exists")

    gen = parser.add_argument_group("generation")
    gen.add_argument(
        "--negative_prompt", "--neg_prompt", dest="negative_prompt", help="default: the standard Wan negative prompt"
    )
    gen.add_argument("--system_prompt", help="T5 prefix of the prompt; unset or '' uses the task's own")
    gen.add_argument(
        "--guidance_mode", choices=[*(m.value for m in GuidanceMode), *PLANNER_GUIDANCE_MODES],
        help="default: the task's own (see below); the official CLI defaults to rv2v, but its scripts always pass "
             "the mode. The *_wapg modes belong to the full Bernini planner model and are refused",
    )  # fmt: skip
    add_size_arguments(gen)
    gen.add_argument("--fps", type=float, default=16, help="source videos are resampled to it; output fps")
    gen.add_argument("--flow_shift", type=float, default=5.0, help="flow shift of the sampler's sigmas")
    gen.add_argument("--omega_vid", type=float, default=1.25, help="video-condition weight")
    gen.add_argument("--omega_img", type=float, default=4.5, help="image/reference-condition weight")
    gen.add_argument("--omega_txt", type=float, default=4.0, help="text weight")
    gen.add_argument("--omega_scale", type=float, default=0.8, help="omega factor from the low-noise expert on")
    gen.add_argument("--eta", type=float, default=0.5, help="APG weight of the parallel component")
    gen.add_argument("--momentum", type=float, default=0.0, help="APG momentum")
    gen.add_argument(
        "--norm_threshold", type=float, nargs="+", default=[50.0, 50.0, 50.0],
        help="APG norm clamp per guidance link (0 disables; the last value repeats)",
    )
    gen.add_argument(
        "--seed", type=int, default=42,
        help="seed of the CPU generator of the initial noise (per case), in [-2**63, 2**64-1] as torch takes it",
    )
    gen.add_argument(
        "--max_tokens", type=int,
        help=f"refuse a case whose longest guidance branch exceeds this many transformer tokens (default: "
             f"${MAX_TOKENS_ENV}, else {DEFAULT_MAX_TOKENS})",
    )  # fmt: skip

    planner = parser.add_argument_group(
        "full Bernini planner only", "Accepted as the official CLI accepts them; the Bernini-R renderer ignores them."
    )
    planner.add_argument("--omega_tgt", type=float, default=PLANNER_FLAGS["omega_tgt"], help="ViT-plan weight")
    planner.add_argument("--planning_step", type=int, default=PLANNER_FLAGS["planning_step"], help="planner steps")
    planner.add_argument("--vit_txt_cfg", type=float, default=PLANNER_FLAGS["vit_txt_cfg"], help="planner text CFG")
    planner.add_argument("--vit_img_cfg", type=float, default=PLANNER_FLAGS["vit_img_cfg"], help="planner image CFG")
    planner.add_argument(
        "--vit_denoising_step", type=int, default=PLANNER_FLAGS["vit_denoising_step"], help="ViT decoder steps"
    )

    add_prompt_enhancer_arguments(parser.add_argument_group("prompt enhancer"))

    parallel = parser.add_argument_group("many GPUs (under torchrun)")
    parallel.add_argument("--ulysses", type=int, default=1, help="Ulysses sequence-parallel degree per case")
    parallel.add_argument(
        "--branch_parallel", type=int, default=1, help="rank groups computing a step's guidance branches at once"
    )
    add_debug_argument(parser)
    parser.set_defaults(func=generate)
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bernini", description="Bernini-R, ByteDance's video renderer, as a diffusers pipeline.",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=_tasks_epilog(),
    )
    parser.add_argument("--debug", action="store_true", help=f"show the full traceback of an error (also ${DEBUG_ENV}=1)")
    subparsers = parser.add_subparsers(dest="command", title="commands", metavar="COMMAND")
    _add_generate_parser(subparsers)
    from .demo import add_demo_parser  # these modules import nothing heavy at module level
    from .hub_export.cli import add_export_parser

    add_export_parser(subparsers)
    add_demo_parser(subparsers)
    return parser


# ------------------------------------------------------------------------------------------------ the model


def resolve_model(args: argparse.Namespace) -> tuple[str, dict[str, str]]:
    """The model path or repo to load and the separate-checkpoint arguments of `from_pretrained`."""
    high, low = args.high_noise_ckpt, args.low_noise_ckpt
    if (high is None) != (low is None):
        given = "high_noise_ckpt" if high is not None else "low_noise_ckpt"
        raise ValueError(f"`high_noise_ckpt` and `low_noise_ckpt` must be given together; got only `{given}`.")
    checkpoints = {} if high is None else {"high_noise_ckpt": high, "low_noise_ckpt": low}
    model = args.model
    if model is None:
        if not checkpoints:
            raise ValueError(
                "`model` is not set: pass --model/--config (a diffusers folder or Hub repo, e.g. "
                "ByteDance/Bernini-R-Diffusers), or --high_noise_ckpt and --low_noise_ckpt on the Wan2.2 base."
            )
        model = WAN22_BASE
    if model == TINY_MODEL and checkpoints:
        raise ValueError(f"`model`={TINY_MODEL!r} is built in code; it takes no --high_noise_ckpt/--low_noise_ckpt.")
    return model, checkpoints


def _device(name: str | None):
    """The torch device `--device` names, checked to exist here (a missing GPU fails now, not after the load)."""
    import torch

    local_rank = os.environ.get("LOCAL_RANK")
    given = name
    if name is None:
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and local_rank is not None:
        name = f"cuda:{local_rank}"  # under torchrun each rank takes its own GPU
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(
            f"`device`={given!r} is not a torch device; use cpu, cuda, cuda:N (or another backend torch has)."
        ) from None
    if device.type == "cpu":
        return device
    backend = getattr(torch, device.type, None)
    available = getattr(backend, "is_available", None)
    if device.type == "mps":
        available = torch.backends.mps.is_available
    if available is None or not available():
        why = "torch was built without CUDA" if device.type == "cuda" and torch.version.cuda is None else "none found"
        raise ValueError(
            f"`device`={given!r}: no {device.type} device is available here ({why}; torch {torch.__version__}); "
            "use --device cpu, or install a torch build for your accelerator."
        )
    count = getattr(backend, "device_count", None)
    if device.index is not None and count is not None and device.index >= count():
        raise ValueError(f"`device`={name!r}: this machine has {count()} {device.type} device(s), numbered from 0.")
    return device


def _dtype(args: argparse.Namespace, device):
    import torch

    return getattr(torch, DTYPES[args.dtype or ("fp32" if device.type == "cpu" else "bf16")])


def _attention_backend(args: argparse.Namespace, device, dtype) -> str | None:
    """The attention backend to set, checked against the device and dtype without loading a model.

    An explicit choice (`--attention_backend` or the environment variable) that cannot run here is a `ValueError`
    naming it; `auto` off a CUDA device is sdpa, since the flash kernels run on CUDA only.
    """
    from . import attention

    name = args.attention_backend
    source = "`attention_backend`" if name is not None else f"${attention.ENV_VAR}"
    requested = name if name is not None else os.environ.get(attention.ENV_VAR, "").strip() or "auto"
    if requested.lower() == "auto" and device.type != "cuda":
        return "sdpa"
    try:
        choice = attention.resolve_attention_backend(name, dtype)
    except (ImportError, RuntimeError) as err:  # a chosen kernel that cannot run here: a usage error
        raise ValueError(f"{source}={requested!r}: {err}") from None
    if choice in ("fa2", "fa3") and device.type != "cuda":
        raise ValueError(
            f"{source}={requested!r} runs on CUDA GPUs only, but the device is {device}; use --attention_backend "
            "sdpa (or auto)."
        )
    if choice in ("fa2", "fa3") and not (dtype.is_floating_point and dtype.itemsize == 2):
        raise ValueError(
            f"{source}={requested!r} takes bf16 or fp16 weights, not {str(dtype).replace('torch.', '')}; pass "
            "--dtype bf16, or use --attention_backend sdpa."
        )
    return name


def check_environment(args: argparse.Namespace) -> None:
    """The device, dtype and attention backend the model flags ask for, checked before any weight is read."""
    device = _device(args.device)
    if args.enable_model_cpu_offload and device.type == "cpu":
        raise ValueError("`enable_model_cpu_offload` needs an accelerator device, got device='cpu'.")
    _attention_backend(args, device, _dtype(args, device))


def known_rope_length(model: str) -> int | None:
    """The experts' `rope_max_seq_len` when it is known without loading: the tiny model's, or a local folder's
    `transformer/config.json`; None otherwise (a Hub repo is checked against its config only once loaded)."""
    if model == TINY_MODEL:
        from .testing import TINY_TRANSFORMER_CONFIG

        return TINY_TRANSFORMER_CONFIG["rope_max_seq_len"]
    config = Path(model) / "transformer" / "config.json"
    try:
        value = json.loads(config.read_text()).get("rope_max_seq_len")
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, int) and value > 0 else None


def load_pipeline(args: argparse.Namespace):
    """The pipeline the model flags describe (see `add_model_arguments`), on its device, ready to call."""
    import torch

    from .pipeline_bernini import BerniniPipeline

    model, checkpoints = resolve_model(args)
    device = _device(args.device)
    dtype = _dtype(args, device)
    if args.enable_model_cpu_offload and device.type == "cpu":
        raise ValueError("`enable_model_cpu_offload` needs an accelerator device, got device='cpu'.")
    max_src_id = args.max_trained_src_id
    if not isinstance(max_src_id, int) or max_src_id < 1:
        raise ValueError(f"`max_trained_src_id`={max_src_id!r} must be an integer >= 1.")

    if model == TINY_MODEL:
        from .testing import tiny_pipeline

        pipe = tiny_pipeline(torch_dtype=dtype)  # the VAE stays float32
        print(f"note: --model {TINY_MODEL} has random weights; its output is noise.", file=sys.stderr)
    else:
        pipe = BerniniPipeline.from_pretrained(model, dtype=dtype, **checkpoints)
    # The official flags win over the loaded config, as the official loader passes them as overrides.
    pipe.register_to_config(
        use_unipc=args.use_unipc,
        use_src_id_rotary_emb=args.use_src_tgt_id,
        interpolate_src_id=args.interpolate_src_id,
        max_trained_src_id=max_src_id,
    )
    backend = _attention_backend(args, device, dtype)
    try:
        pipe.set_attention_backend(backend)
    except (ImportError, RuntimeError) as err:  # a chosen kernel that cannot run here: a usage error
        raise ValueError(f"`attention_backend`={backend!r}: {err}") from None
    if args.enable_model_cpu_offload:
        pipe.enable_model_cpu_offload(device=device)
    else:
        pipe.to(device)
    return pipe


def enable_parallelism(pipe, args: argparse.Namespace):
    """The parallel state of this rank, or None for a single process (`--ulysses 1 --branch_parallel 1`, no torchrun).

    The state gives `data_rank`, `data_degree` (cases are dealt `pending[data_rank::data_degree]`) and `is_writer`
    (the one rank of a data group that writes and prints).
    """
    if args.ulysses == 1 and args.branch_parallel == 1 and _world_size() == 1:
        return None
    return pipe.enable_parallelism(ulysses_degree=args.ulysses, branch_degree=args.branch_parallel)


def _world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


# ------------------------------------------------------------------------------------------------ cases


class UsageError(ValueError):
    """A bad-input error whose message already speaks in flag names (`main` prints it as it is, and exits 2)."""


class CaseBusyError(RuntimeError):
    """The output of the single case is being written by another live run (exit status 1)."""


@functools.cache
def _flag_options() -> dict[str, str]:
    """The flag of each argument name (`dest`) of every command: `num_frames` -> `--num_frames`."""
    options: dict[str, str] = {}
    parsers = [build_parser()]
    while parsers:
        parser = parsers.pop()
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                parsers.extend(action.choices.values())
            elif action.option_strings and action.dest not in options:
                preferred = f"--{action.dest}"
                options[action.dest] = preferred if preferred in action.option_strings else action.option_strings[0]
    return options


_NAMED = re.compile(r"`([A-Za-z_][A-Za-z0-9_]*)((?:\[\d+\])?)`|(?<![\w`.\-/])([a-z][a-z0-9_]*)(?==)")


def flag_names(message: str, keep: Sequence[str] = ()) -> str:
    """`message` with the argument names it quotes (`num_frames`, `task_type=...`) replaced by their flags
    (`--num_frames`), so a command-line user reads what to type. Names in `keep` stay: in a case file's errors, the
    case's own keys (`video`, `output`) are keys of the file, not flags."""
    options = _flag_options()

    def replace(match: re.Match) -> str:
        name = match.group(1) or match.group(3)
        if name not in options or name in keep:
            return match.group(0)
        return options[name] + (match.group(2) or "")

    return _NAMED.sub(replace, message)


def _max_tokens(args: argparse.Namespace) -> int:
    if args.max_tokens is not None:
        if args.max_tokens < 1:
            raise ValueError(f"`max_tokens`={args.max_tokens} must be >= 1.")
        return args.max_tokens
    raw = os.environ.get(MAX_TOKENS_ENV, "").strip()
    if not raw:
        return DEFAULT_MAX_TOKENS
    if not raw.isdigit() or int(raw) < 1:
        raise UsageError(f"${MAX_TOKENS_ENV}={raw!r} must be an integer >= 1.")
    return int(raw)


def _looks_like_path(model: str) -> bool:
    return model.startswith(("/", "./", "../", "~")) or model in (".", "..") or os.sep + os.sep in model


def _check_flags(args: argparse.Namespace) -> None:
    """Flag checks that need no file and no model: each error names the flag, the value and what is allowed.

    Also fills the size flags left unset with the model's defaults (`resolve_size_defaults`).
    """
    model, _ = resolve_model(args)
    if model != TINY_MODEL and _looks_like_path(model) and not Path(model).expanduser().exists():
        raise FileNotFoundError(f"`model`: no such folder: '{model}'")
    filled = resolve_size_defaults(args)
    if model == TINY_MODEL and set(filled) - {"max_image_size"}:
        sizes = f"{args.num_frames} frames, {args.height}x{args.width}, {args.num_inference_steps} steps"
        print(f"note: --model {TINY_MODEL} defaults to {sizes} (the size flags override them).", file=sys.stderr)
    if args.guidance_mode is not None:
        parse_guidance_mode(args.guidance_mode)  # a full-Bernini mode gets its own explanation
    if args.case is None and args.inputs is None and args.prompt is None:
        raise ValueError("`prompt` is not set: pass --prompt, a case file (--case FILE) or a batch (--inputs FILE).")
    low, high = SEED_RANGE
    if not low <= args.seed <= high:
        raise ValueError(f"`seed`={args.seed} is outside the generator's range [-2**63, 2**64-1].")
    _max_tokens(args)
    for name in ("ulysses", "branch_parallel"):
        if getattr(args, name) < 1:
            raise ValueError(f"`{name}`={getattr(args, name)} must be >= 1.")
    group, world = args.ulysses * args.branch_parallel, _world_size()
    if world % group:
        raise ValueError(
            f"`ulysses`={args.ulysses} x `branch_parallel`={args.branch_parallel} needs a multiple of {group} "
            f"processes (launch with torchrun --nproc-per-node {group}); WORLD_SIZE is {world}."
        )
    changed = [f"--{name}" for name, default in PLANNER_FLAGS.items() if getattr(args, name) != default]
    if changed:
        print(
            f"note: {', '.join(changed)} only apply to the full Bernini planner model; the renderer ignores them.",
            file=sys.stderr,
        )


def _flag_inputs(args: argparse.Namespace) -> dict[str, Any]:
    video = args.video[0] if args.video is not None and len(args.video) == 1 else args.video
    return {"prompt": args.prompt, "task_type": args.task_type, "video": video, "image": args.image,
            "images": args.images, "guidance_mode": args.guidance_mode}  # fmt: skip


def collect_cases(args: argparse.Namespace) -> list[case_files.Case]:
    """The cases of the command: one from the flags or `--case`, or one per `--inputs` entry (bad ones carry their
    problem). A case without a task gets `cases.default_task_type`'s. Output suffixes already follow the frame count."""
    if args.inputs is None:
        inputs = _flag_inputs(args)
        output = args.output
        if args.case is not None:
            try:
                values = case_files.read_case_file(args.case)
            except ValueError as err:  # the file's keys keep their names
                raise UsageError(flag_names(str(err), case_files.CASE_KEYS)) from None
            output = values.pop("output", None) or output
            inputs.update(values)  # the case's values win, as upstream's setattr onto the arguments
        if inputs["task_type"] is None:
            inputs["task_type"] = case_files.default_task_type(inputs)
            spec = TASKS[TaskType(inputs["task_type"])]
            print(f"note: no --task_type given: {spec.task.value} ({spec.description}).", file=sys.stderr)
        case_files.check_writable(output)  # as given: `--output /dev/null` or a folder is not swapped for a sibling
        single = case_files.is_single_frame(inputs["task_type"], args.num_frames)
        return [case_files.Case(1, inputs, case_files.output_path(output, single))]

    entries = case_files.read_batch_file(args.inputs)
    if not args.output.strip():
        raise ValueError(f"`output`={args.output!r} is empty; give the folder of the batch's outputs.")
    # `--output outputs/batch/` (or an existing folder) names the folder of derived names; a file path, its folder.
    named_folder = args.output.endswith(("/", os.sep)) or Path(args.output).is_dir()
    directory = Path(args.output) if named_folder else Path(args.output).parent
    cases, ignored_modes = [], []
    for number, entry in enumerate(entries, start=1):
        where = f"case {number} of '{args.inputs}'"
        try:
            values = case_files.check_entry(entry, where)
            task = values.get("task_type") or args.task_type
            if task is None:
                task = case_files.default_task_type(values)
        except ValueError as err:
            message = str(err) if str(err).startswith(where) else f"{where}: {err}"
            cases.append(case_files.Case(number, {"task_type": None}, None, problem=message))
            continue
        if values.pop("guidance_mode", None) is not None:
            ignored_modes.append(number)
        inputs = {"prompt": values["prompt"], "task_type": task, "video": values.get("video"),
                  "image": values.get("image"), "images": values.get("images"),
                  "guidance_mode": args.guidance_mode}  # fmt: skip
        single = case_files.is_single_frame(task, args.num_frames)
        if values.get("output"):
            output = case_files.output_path(values["output"], single)
        else:
            output = case_files.derived_output(directory, number, len(entries), task, single)
        cases.append(case_files.Case(number, inputs, output))
    if ignored_modes:
        print(
            f"warning: `guidance_mode` of case(s) {', '.join(map(str, ignored_modes))} in '{args.inputs}' is ignored: "
            "in a batch the generation settings come from the command line (--guidance_mode), as upstream.",
            file=sys.stderr,
        )
    return cases


def call_arguments(args: argparse.Namespace, case: case_files.Case) -> dict[str, Any]:
    """The `BerniniPipeline.__call__` keyword arguments of one case (generator and output type excluded)."""
    kwargs = {name: getattr(args, name) for name in GENERATION_ARGUMENTS}
    kwargs.update(case.inputs)
    kwargs["system_prompt"] = kwargs["system_prompt"] or None  # the official CLI's "" means the task's own prefix
    return kwargs


def _size_problem(args: argparse.Namespace, call: dict[str, Any], limit: int, rope: int | None) -> str | None:
    """Why the case is too large for the model (its rope table) or for the token budget; None if it fits."""
    from .pipeline_bernini import BerniniPipeline

    tokens, grid = BerniniPipeline.estimate_tokens(**call)
    if rope is not None and max(grid) > rope:
        return (
            f"a stream of this case spans {grid[0]}x{grid[1]}x{grid[2]} latent positions (frames/4+1 x H/16 x W/16), "
            f"beyond the model's rope table of {rope} per axis (rope_max_seq_len): keep `num_frames` <= "
            f"{(rope - 1) * 4 + 1} and `height`, `width`, `max_image_size` <= {rope * 16}."
        )
    if tokens > limit:
        return (
            f"this case needs about {tokens:,} transformer tokens in its longest guidance branch (target and "
            f"conditions, frames/4+1 x H/16 x W/16 each; media of unknown size count as `max_image_size` squares), "
            f"more than the limit of {limit:,}: lower `num_frames`, `height`/`width` or `max_image_size`, or raise "
            f"the limit with --max_tokens N (or ${MAX_TOKENS_ENV}=N)."
        )
    return None


def check_cases(args: argparse.Namespace, cases: list[case_files.Case]) -> None:
    """Validate every case's call (inputs, media files, values, size) without a model, and refuse two cases writing
    one file (compared by real path, so a symlinked folder is the same folder); the problems are recorded on the
    cases, in flag names (a case file's own keys keep theirs)."""
    from .pipeline_bernini import BerniniPipeline

    keep = case_files.CASE_KEYS if args.case is not None or args.inputs is not None else ()
    limit, rope = _max_tokens(args), known_rope_length(resolve_model(args)[0])
    writers: dict[str, int] = {}
    for case in cases:
        if case.problem is not None:
            case.problem = flag_names(case.problem, keep)
            continue
        call = call_arguments(args, case)
        try:
            BerniniPipeline.validate_call(**call)
        except (ValueError, FileNotFoundError) as err:
            case.problem = flag_names(str(err), keep)
            continue
        problem = _size_problem(args, call, limit, rope)
        if problem is not None:
            case.problem = flag_names(problem, keep)
            continue
        key = os.path.realpath(case.output)
        if key in writers:
            case.problem = f"its output '{case.output}' is also the output of case {writers[key]}"
        else:
            writers[key] = case.number


def check_outputs(cases: list[case_files.Case], keep: Sequence[str] = ()) -> None:
    """Check that each case's output can be written (see `cases.check_writable`); problems are recorded on the cases,
    in flag names but for those in `keep`."""
    for case in cases:
        try:
            case_files.check_writable(case.output)
        except ValueError as err:
            case.problem = flag_names(str(err), keep)


# ------------------------------------------------------------------------------------------------ running


def _status(message: str) -> None:
    """One status line on stderr, printed above a running progress bar rather than through it."""
    from tqdm.auto import tqdm  # diffusers' progress bars are tqdm's; already imported with the pipeline

    tqdm.write(message, file=sys.stderr)


def enhance_on_writer(enhancer, call: dict[str, Any], state=None) -> str:
    """The case's prompt rewritten by `enhancer`, asked once per rank group.

    In one process this is `enhancer.enhance(...)`. Under parallelism only the writer rank of a data group (its
    first rank) calls the endpoint; the other ranks receive its answer through `state.broadcast_object(value)`, a
    collective every rank of the group calls, so that all of them condition on the same text.
    """
    prompt = None
    if state is None or state.is_writer:
        prompt = enhancer.enhance(
            call["prompt"], call["task_type"], video=call["video"], image=call["image"], images=call["images"]
        )
    if state is not None:
        prompt = state.broadcast_object(prompt)
    return prompt


def run_case(pipe, args: argparse.Namespace, case: case_files.Case, enhancer=None, state=None) -> Path | None:
    """Generate one case and write it (writer rank only); returns the path written, None on other ranks.

    The writer prints one status line when the last step ends (decoding) and one before the write.
    """
    import torch

    from . import media

    writer = state is None or state.is_writer
    kwargs = call_arguments(args, case)
    if enhancer is not None:
        enhanced = enhance_on_writer(enhancer, kwargs, state)
        if writer and enhanced != kwargs["prompt"]:
            print(f"prompt: {printable(enhanced)}", file=sys.stderr)  # the endpoint's reply, escaped
        kwargs["prompt"] = enhanced
    last_step = kwargs["num_inference_steps"] - 1

    def on_step_end(pipeline, step, timestep, callback_kwargs):
        if writer and step == last_step:
            _status("decoding...")
        return callback_kwargs

    out = pipe(
        **kwargs, generator=torch.Generator("cpu").manual_seed(args.seed), output_type="np",
        callback_on_step_end=on_step_end,
    )  # fmt: skip
    if not writer:
        return None
    _status(f"writing {case.output}")
    return media.write_output(out.frames[0], case.output, out.fps)


def _sweep_temporaries(output: Path) -> list[Path]:
    """Remove the temporaries a dead run left for `output` (media.write_output's naming); only called by the run
    that took over that run's stale lock, so no live writer's file is touched."""
    removed = []
    for stale in output.parent.glob(f".{glob.escape(output.stem)}.tmp-*{output.suffix}"):
        stale.unlink(missing_ok=True)
        removed.append(stale)
    return removed


def _claim(case: case_files.Case, batch: bool, started: float, state=None):
    """Claim the case's output for this run: (the lock, None) or (None, why the case is left to another run).

    The writer rank decides, and its group follows its decision (a collective under parallelism).
    """
    writer = state is None or state.is_writer
    lock, reason = case_files.CaseLock(case.output), None
    if writer:
        if not lock.acquire():
            holder = lock.holder() or "a process"
            pid, _, host = holder.partition(" ")
            who = f"pid {pid} on {host}" if host else holder
            reason = f"{case.output} is being written by another run ({who}; lock {lock.path})"
        elif batch and case.output.exists() and case.output.stat().st_mtime >= started:
            lock.release()  # another run finished it after this one made its list (an older file is this run's to redo)
            reason = f"{case.output} was written by another run meanwhile"
        elif lock.took_over is not None:
            pid, _, host = lock.took_over.partition(" ")
            swept = _sweep_temporaries(case.output)
            print(
                f"note: took over the lock of {case.output} from pid {pid}, which is gone"
                + (f"; removed its {len(swept)} temporary file(s)" if swept else ""),
                file=sys.stderr,
            )
    if state is not None:
        reason = state.broadcast_object(reason)
    return (None if reason is not None else lock), reason


@dataclass
class _Outcome:
    status: str  # "done", "skipped" or "failed"
    detail: str


def _summary(cases: list[case_files.Case], outcomes: dict[int, _Outcome]) -> str:
    counts = {status: sum(o.status == status for o in outcomes.values()) for status in ("done", "skipped", "failed")}
    lines = [f"{len(outcomes)} of {len(cases)} case(s): " + ", ".join(f"{n} {s}" for s, n in counts.items())]
    for case in cases:
        if case.number in outcomes:
            outcome = outcomes[case.number]
            lines.append(f"  {outcome.status:<8} [{case.number}] {outcome.detail}")
    return "\n".join(lines)


def _complete_or_note(case: case_files.Case) -> bool:
    """Whether the existing output of `case` is complete; if not (empty, cut short, unreadable) it is redone, noted."""
    from . import media  # torch comes with it: loaded by the command, not by `bernini --help`

    if media.is_complete_output(case.output):
        return True
    print(f"[{case.number}] {case.output} exists but is empty or unreadable: generating it again", file=sys.stderr)
    return False


def generate(args: argparse.Namespace) -> int:
    """Run the command's cases with one pipeline load; returns the exit status (1 if a batch case failed).

    Everything that can be checked without the model is checked first: the flags, the device and attention kernel,
    every case (inputs, media files, size against the rope table and the token budget) and that every output can be
    written; in a batch the cases whose output exists are set aside, so every rank of a parallel run decides the same
    pending list. While a case runs its output is claimed with a lock file (`cases.CaseLock`): runs of one batch on
    one folder split the cases, and a case another run holds is skipped. One failing batch case does not stop the
    others.
    """
    started = time.time()
    _check_flags(args)
    check_environment(args)
    batch = args.inputs is not None
    cases = collect_cases(args)
    check_cases(args, cases)
    if not batch and cases[0].problem is not None:
        raise UsageError(cases[0].problem)

    outcomes: dict[int, _Outcome] = {}
    pending = []
    for case in cases:
        if case.problem is not None:
            where = f"{case.output}: " if case.output is not None else ""
            outcomes[case.number] = _Outcome("failed", where + case.problem)
        elif batch and not args.overwrite and case.output.exists() and _complete_or_note(case):
            outcomes[case.number] = _Outcome("skipped", f"{case.output} exists (--overwrite to redo it)")
        else:
            pending.append(case)
    check_outputs(pending, case_files.CASE_KEYS if args.inputs is not None or args.case is not None else ())
    if not batch and pending and pending[0].problem is not None:
        raise UsageError(pending[0].problem)
    for case in [case for case in pending if case.problem is not None]:
        outcomes[case.number] = _Outcome("failed", f"{case.output}: {case.problem}")
        pending.remove(case)

    state = None
    if pending:
        enhancer = load_prompt_enhancer(args)  # its settings are checked before the model loads
        pipe = load_pipeline(args)
        state = enable_parallelism(pipe, args)
        writer = state is None or state.is_writer
        if not writer:
            pipe.set_progress_bar_config(disable=True)
        mine = pending
        if state is not None:
            # The writer's pending list stands for its whole group, then the groups split it (cases[rank::degree]).
            numbers = set(state.broadcast_object([case.number for case in pending]))
            mine = state.assign_cases([case for case in cases if case.number in numbers])
        for case in mine:
            lock, reason = _claim(case, batch, started, state)
            if lock is None:
                if not batch:
                    raise CaseBusyError(f"{reason}; wait for it, or choose another --output.")
                outcomes[case.number] = _Outcome("skipped", reason)
                if writer:
                    print(f"[{case.number}/{len(cases)}] skipped: {reason}", file=sys.stderr)
                continue
            if writer:
                print(f"[{case.number}/{len(cases)}] {case.inputs['task_type']} -> {case.output}", file=sys.stderr)
            try:
                path = run_case(pipe, args, case, enhancer, state)
            except Exception as err:  # in a batch one case's failure is reported and the others run
                if not batch:
                    raise
                outcomes[case.number] = _Outcome("failed", f"{case.output}: {type(err).__name__}: {err}")
                if writer:
                    print(f"[{case.number}/{len(cases)}] failed: {type(err).__name__}: {err}", file=sys.stderr)
                continue
            finally:
                lock.release()
            outcomes[case.number] = _Outcome("done", str(path))
            if writer:
                print(path, flush=True)
        if state is not None and state.data_rank != 0:  # data group 0 reports the cases set aside before the split
            outcomes = {case.number: outcomes[case.number] for case in mine}

    if batch and (state is None or state.is_writer):
        print(_summary(cases, outcomes), file=sys.stderr)
    return 1 if any(o.status == "failed" for o in outcomes.values()) else 0


# Exceptions of these packages are the network or the Hub failing, whatever their base class: exit status 1.
_ENVIRONMENT_PACKAGES = ("huggingface_hub", "requests", "httpx", "httpcore", "urllib3")


def _failure(err: BaseException) -> tuple[int, str]:
    """The exit status and the one line `main` prints for an error: 2 for bad input (in flag names), 1 for the
    environment (offline Hub, no space left, no driver) or anything else."""
    modules = {cls.__module__.split(".")[0] for cls in type(err).__mro__}
    from_environment = bool(modules & set(_ENVIRONMENT_PACKAGES))
    if isinstance(err, UsageError):
        return 2, str(err)
    if isinstance(err, (ValueError, FileNotFoundError)) and not from_environment:
        return 2, flag_names(str(err))
    text = " ".join(str(err).split()) or type(err).__name__
    if not isinstance(err, (OSError, CaseBusyError)) or from_environment:
        text = f"{type(err).__name__}: {text}"
    return 1, f"{text} (--debug or {DEBUG_ENV}=1 shows the traceback)"


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    debug = bool(getattr(args, "debug", False)) or os.environ.get(DEBUG_ENV, "").strip() not in ("", "0")
    try:
        result = args.func(args)
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"{parser.prog}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # one line, no traceback (unless asked): 2 for bad input, 1 for the environment
        if debug:
            raise
        status, text = _failure(err)
        print(f"{parser.prog}: error: {text}", file=sys.stderr)
        return status
    if isinstance(result, int) and not isinstance(result, bool):
        return result
    if result is not None:
        print(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
