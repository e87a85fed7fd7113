"""The `bernini` command line. `bernini generate` runs one case (flags or `--case FILE`) or a batch (`--inputs FILE`).

The official run scripts' commands work with `bernini generate` in place of `python infer_single_gpu.py`, and with
`torchrun ... -m bernini_diffusers.cli generate` in place of `torchrun ... infer_multi_gpu.py`. Only the standard
library and the task table are imported at module level, so `bernini --help` answers at once; torch, diffusers and
the model load inside the command, after every case has been checked.
"""

from __future__ import annotations

import argparse
import glob
import os
import sys
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
        "--task_type", default=TaskType.V2V.value, choices=[t.value for t in TaskType],
        help="the task (the official default); see 'task types' below",
    )
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
    gen.add_argument("--num_frames", type=int, default=81, help="output frames; for video inputs, the cap (4k+1)")
    gen.add_argument("--height", type=int, default=480, help="output height without a source video or image")
    gen.add_argument("--width", type=int, default=848, help="output width without a source video or image")
    gen.add_argument("--max_image_size", type=int, default=848, help="long-side limit of the input media")
    gen.add_argument("--fps", type=float, default=16, help="source videos are resampled to it; output fps")
    gen.add_argument("--num_inference_steps", type=int, default=40, help="denoising steps")
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
    gen.add_argument("--seed", type=int, default=42, help="seed of the CPU generator of the initial noise (per case)")

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
    parser.set_defaults(func=generate)
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bernini", description="Bernini-R, ByteDance's video renderer, as a diffusers pipeline.",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=_tasks_epilog(),
    )
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
    import torch

    local_rank = os.environ.get("LOCAL_RANK")
    if name is None:
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and local_rank is not None:
        name = f"cuda:{local_rank}"  # under torchrun each rank takes its own GPU
    try:
        return torch.device(name)
    except RuntimeError as err:
        raise ValueError(f"`device`={name!r} is not a torch device ({err}).") from None


def load_pipeline(args: argparse.Namespace):
    """The pipeline the model flags describe (see `add_model_arguments`), on its device, ready to call."""
    import torch

    from .pipeline_bernini import BerniniPipeline

    model, checkpoints = resolve_model(args)
    device = _device(args.device)
    dtype = getattr(torch, DTYPES[args.dtype or ("fp32" if device.type == "cpu" else "bf16")])
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
        pipe = BerniniPipeline.from_pretrained(model, torch_dtype=dtype, **checkpoints)
    # The official flags win over the loaded config, as the official loader passes them as overrides.
    pipe.register_to_config(
        use_unipc=args.use_unipc,
        use_src_id_rotary_emb=args.use_src_tgt_id,
        interpolate_src_id=args.interpolate_src_id,
        max_trained_src_id=max_src_id,
    )
    try:
        pipe.set_attention_backend(args.attention_backend)
    except (ImportError, RuntimeError) as err:  # a chosen kernel that cannot run here: a usage error
        raise ValueError(f"`attention_backend`={args.attention_backend!r}: {err}") from None
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


def _check_flags(args: argparse.Namespace) -> None:
    """Flag checks that need no file and no model: each error names the flag, the value and what is allowed."""
    resolve_model(args)
    if args.guidance_mode is not None:
        parse_guidance_mode(args.guidance_mode)  # a full-Bernini mode gets its own explanation
    if args.case is None and args.inputs is None and args.prompt is None:
        raise ValueError("`prompt` is not set: pass --prompt, a case file (--case FILE) or a batch (--inputs FILE).")
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
    problem). Output suffixes already follow the frame count."""
    if args.inputs is None:
        inputs = _flag_inputs(args)
        output = args.output
        if args.case is not None:
            values = case_files.read_case_file(args.case)
            output = values.pop("output", None) or output
            inputs.update(values)  # the case's values win, as upstream's setattr onto the arguments
        single = case_files.is_single_frame(inputs["task_type"], args.num_frames)
        return [case_files.Case(1, inputs, case_files.output_path(output, single))]

    entries = case_files.read_batch_file(args.inputs)
    # `--output outputs/batch/` (or an existing folder) names the folder of derived names; a file path, its folder.
    named_folder = args.output.endswith(("/", os.sep)) or Path(args.output).is_dir()
    directory = Path(args.output) if named_folder else Path(args.output).parent
    cases, ignored_modes = [], []
    for number, entry in enumerate(entries, start=1):
        try:
            values = case_files.check_entry(entry, f"case {number} of '{args.inputs}'")
        except ValueError as err:
            cases.append(case_files.Case(number, {"task_type": None}, None, problem=str(err)))
            continue
        if values.pop("guidance_mode", None) is not None:
            ignored_modes.append(number)
        task = values.get("task_type") or args.task_type
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


def check_cases(args: argparse.Namespace, cases: list[case_files.Case]) -> None:
    """Validate every case's call (inputs, media files, values) without a model, and refuse two cases writing one
    file; the problems are recorded on the cases."""
    from .pipeline_bernini import BerniniPipeline

    writers: dict[str, int] = {}
    for case in cases:
        if case.problem is not None:
            continue
        try:
            BerniniPipeline.validate_call(**call_arguments(args, case))
        except (ValueError, FileNotFoundError) as err:
            case.problem = str(err)
            continue
        key = os.path.abspath(case.output)
        if key in writers:
            case.problem = f"its output '{case.output}' is also the output of case {writers[key]}"
        else:
            writers[key] = case.number


# ------------------------------------------------------------------------------------------------ running


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
    """Generate one case and write it (writer rank only); returns the path written, None on other ranks."""
    import torch

    from . import media

    writer = state is None or state.is_writer
    kwargs = call_arguments(args, case)
    if enhancer is not None:
        enhanced = enhance_on_writer(enhancer, kwargs, state)
        if writer and enhanced != kwargs["prompt"]:
            print(f"prompt: {enhanced}", file=sys.stderr)
        kwargs["prompt"] = enhanced
    out = pipe(**kwargs, generator=torch.Generator("cpu").manual_seed(args.seed), output_type="np")
    if not writer:
        return None
    # A killed run may have left a temporary of this output (media.write_output's naming); it is never the output.
    for stale in case.output.parent.glob(f".{glob.escape(case.output.stem)}.tmp-*{case.output.suffix}"):
        stale.unlink(missing_ok=True)
    return media.write_output(out.frames[0], case.output, out.fps)


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

    Every case is checked, and in a batch the ones whose output exists are set aside, before the model loads, so
    every rank of a parallel run decides the same pending list. One failing batch case does not stop the others.
    """
    _check_flags(args)
    batch = args.inputs is not None
    cases = collect_cases(args)
    check_cases(args, cases)
    if not batch and cases[0].problem is not None:
        raise ValueError(cases[0].problem)

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

    state = None
    if pending:
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
        enhancer = load_prompt_enhancer(args)
        for case in mine:
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
            outcomes[case.number] = _Outcome("done", str(path))
            if writer:
                print(path, flush=True)
        if state is not None and state.data_rank != 0:  # data group 0 reports the cases set aside before the split
            outcomes = {case.number: outcomes[case.number] for case in mine}

    if batch and (state is None or state.is_writer):
        print(_summary(cases, outcomes), file=sys.stderr)
    return 1 if any(o.status == "failed" for o in outcomes.values()) else 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        result = args.func(args)
    except (ValueError, FileNotFoundError) as err:  # bad input, named by the pipeline: no traceback
        print(f"{parser.prog}: error: {err}", file=sys.stderr)
        return 2
    if isinstance(result, int) and not isinstance(result, bool):
        return result
    if result is not None:
        print(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
