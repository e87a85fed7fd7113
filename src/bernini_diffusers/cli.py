"""The `bernini` command line. `bernini generate` runs one case (flags or `--case FILE`) or a batch (`--inputs FILE`).

The official run scripts' commands work with `bernini generate` in place of `python infer_single_gpu.py`, and with
`torchrun ... -m bernini_diffusers.cli generate` in place of `torchrun ... infer_multi_gpu.py`. The model loads
inside the command, after every case has been checked.

Building the parser imports no torch, diffusers or pipeline module (`bernini --help` answers at once, see
tests/test_cli_startup.py): the functions that run a command import them.
"""

from __future__ import annotations

import argparse
import functools
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
    CHECKPOINT_FORMATS,
    DEFAULT_CONTEXT_OVERLAP,
    DEFAULT_MAX_TOKENS,
    MAX_TOKENS_ENV,
    DTYPES,
    MAX_WINDOWED_FRAMES,
    TINY_MODEL,
    written_as_path,
)
from .demo import add_demo_parser
from .hub_export.cli import add_export_parser
from .options import (
    DEBUG_ENV,
    HelpFormatter,
    UsageError,
    add_debug_argument,
    add_model_arguments,
    add_prompt_enhancer_arguments,
    add_shard_argument,
    add_size_arguments,
    check_environment,
    check_shard_flags,
    known_rope_length,
    load_pipeline,
    load_prompt_enhancer,
    max_tokens,
    note,
    resolve_model,
    resolve_size_defaults,
    silence_import_noise,
)
from .redaction import mask_exception, mask_secrets, printable, protect_output
from .serve.cli import add_serve_parser
from .tasks import (
    PLANNER_GUIDANCE_MODES,
    TASKS,
    GuidanceMode,
    TaskSpec,
    TaskType,
    parse_guidance_mode,
)

# The `BerniniPipeline.__call__` arguments that have a same-named flag and are passed on by name.
CALL_ARGUMENTS = (
    "prompt", "task_type", "video", "image", "images", "negative_prompt", "system_prompt", "guidance_mode",
    "num_frames", "height", "width", "max_image_size", "fps", "num_inference_steps", "flow_shift",
    "omega_vid", "omega_img", "omega_txt", "omega_scale", "eta", "momentum", "norm_threshold", "context_frames",
    "context_overlap",
)
# What a case (file or batch entry) describes; every other call argument comes from the command line, unless the case
# sets it (`cases.CASE_SETTINGS`: its context windows).
CASE_INPUTS = ("prompt", "task_type", "video", "image", "images", "guidance_mode")
GENERATION_ARGUMENTS = tuple(name for name in CALL_ARGUMENTS if name not in CASE_INPUTS)
# Flags of the full Bernini planner model, accepted with their official defaults and ignored by the renderer.
PLANNER_FLAGS = {"omega_tgt": 0.5, "planning_step": 25, "vit_txt_cfg": 1.2, "vit_img_cfg": 1.0, "vit_denoising_step": 5}
# `torch.Generator.manual_seed` takes any integer in [-2**63, 2**64 - 1] (a negative seed wraps modulo 2**64).
SEED_RANGE = (-(2**63), 2**64 - 1)


def _describe_task(spec: TaskSpec) -> str:
    inputs = []
    for name, need in spec.inputs:
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
  images, context_frames, context_overlap, output; its values override the flags. Batch (--inputs
  FILE.json|FILE.jsonl): a JSON list or JSON lines of such objects without guidance_mode (ignored, as upstream); a
  case without output is written as <folder>/<number>_<task>.mp4|png, the folder being --output if it ends with '/'
  (or exists), else its folder; an existing output is skipped unless --overwrite. Paths are relative to the working
  directory.

official commands: `python infer_single_gpu.py ARGS` is `bernini generate ARGS`; `torchrun --nproc-per-node N
  infer_multi_gpu.py ARGS` is `torchrun --nproc-per-node N -m bernini_diffusers.cli generate ARGS`.
"""


def _add_generate_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "generate", help="run one case or a batch; writes a PNG (one frame) or an MP4 per case",
        formatter_class=HelpFormatter, description="Run Bernini-R cases and write their results.",
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
        "--context_frames", type=int, metavar="N",
        help=f"temporal context windows of N frames (4k+1, e.g. 81) for clips longer than one window; a source video "
             f"is then edited whole (up to {MAX_WINDOWED_FRAMES} frames), not cut at --num_frames; default: off",
    )  # fmt: skip
    gen.add_argument(
        "--context_overlap", type=int, default=DEFAULT_CONTEXT_OVERLAP, metavar="N",
        help="frames neighbouring context windows share, a multiple of 4 below --context_frames",
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
    add_shard_argument(parallel)
    plan = parser.add_argument_group("memory plan")
    plan.add_argument(
        "--plan", action="store_true",
        help="print each case's peak GPU memory and host RAM under the chosen --memory_profile, and whether they "
             "fit, then exit without loading any weight",
    )  # fmt: skip
    plan.add_argument(
        "--checkpoint_format", choices=CHECKPOINT_FORMATS,
        help="with --plan: the experts' weights format (default: the --dtype's)",
    )
    plan.add_argument("--gpu_memory", type=float, metavar="GB", help="with --plan: GPU memory (default: detected)")
    plan.add_argument("--ram", type=float, metavar="GB", help="with --plan: host RAM (default: detected)")
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
    add_export_parser(subparsers)
    add_demo_parser(subparsers)
    add_serve_parser(subparsers)
    return parser


# ------------------------------------------------------------------------------------------------ the model


def enable_parallelism(pipe, args: argparse.Namespace):
    """The parallel state of this rank, or None for a single process (`--ulysses 1 --branch_parallel 1`, no torchrun).

    The state gives `data_rank`, `data_degree` (cases are dealt `pending[data_rank::data_degree]`) and `is_writer`
    (the one rank of a data group that writes and prints).
    """
    state = getattr(pipe, "parallel_state", None)
    if state is not None:  # loaded with --shard_weights: already enabled
        return state
    if args.ulysses == 1 and args.branch_parallel == 1 and _world_size() == 1:
        return None
    return pipe.enable_parallelism(ulysses_degree=args.ulysses, branch_degree=args.branch_parallel)


def _world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


# ------------------------------------------------------------------------------------------------ cases



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


def _check_flags(args: argparse.Namespace) -> None:
    """Flag checks that need no file and no model: each error names the flag, the value and what is allowed.

    Also fills the size flags left unset with the model's defaults (`resolve_size_defaults`).
    """
    model, _ = resolve_model(args)
    if model != TINY_MODEL and written_as_path(model) and not Path(model).expanduser().exists():
        raise FileNotFoundError(f"`model`: no such folder: '{model}'")
    filled = resolve_size_defaults(args)
    if model == TINY_MODEL and set(filled) - {"max_image_size"}:
        sizes = f"{args.num_frames} frames, {args.height}x{args.width}, {args.num_inference_steps} steps"
        note(f"note: --model {TINY_MODEL} defaults to {sizes} (the size flags override them).")
    if args.guidance_mode is not None:
        parse_guidance_mode(args.guidance_mode)  # a full-Bernini mode gets its own explanation
    if args.case is None and args.inputs is None and args.prompt is None:
        raise ValueError("`prompt` is not set: pass --prompt, a case file (--case FILE) or a batch (--inputs FILE).")
    low, high = SEED_RANGE
    if not low <= args.seed <= high:
        raise ValueError(f"`seed`={args.seed} is outside the generator's range [-2**63, 2**64-1].")
    max_tokens(args)
    for name in ("ulysses", "branch_parallel"):
        if getattr(args, name) < 1:
            raise ValueError(f"`{name}`={getattr(args, name)} must be >= 1.")
    group, world = args.ulysses * args.branch_parallel, _world_size()
    check_shard_flags(args)
    if world % group and not getattr(args, "plan", False):  # a plan prices a launch that has not started
        raise ValueError(
            f"`ulysses`={args.ulysses} x `branch_parallel`={args.branch_parallel} needs a multiple of {group} "
            f"processes (launch with torchrun --nproc-per-node {group}); WORLD_SIZE is {world}."
        )
    changed = [f"--{name}" for name, default in PLANNER_FLAGS.items() if getattr(args, name) != default]
    if changed:
        note(f"note: {', '.join(changed)} only apply to the full Bernini planner model; the renderer ignores them.")


def _flag_inputs(args: argparse.Namespace) -> dict[str, Any]:
    video = args.video[0] if args.video is not None and len(args.video) == 1 else args.video
    return {"prompt": args.prompt, "task_type": args.task_type, "video": video, "image": args.image,
            "images": args.images, "guidance_mode": args.guidance_mode}  # fmt: skip


def _output_frames(args: argparse.Namespace, inputs: dict[str, Any]) -> int:
    """The frame count that decides a case's output suffix: `--num_frames`, except for a source video edited in
    context windows, which is taken whole whatever `--num_frames` says (a clip, written as MP4)."""
    if inputs.get("video") and inputs.get("context_frames", args.context_frames) is not None:
        return MAX_WINDOWED_FRAMES
    return args.num_frames


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
            note(f"note: no --task_type given: {spec.task.value} ({spec.description}).")
        case_files.check_writable(output)  # as given: `--output /dev/null` or a folder is not swapped for a sibling
        single = case_files.is_single_frame(inputs["task_type"], _output_frames(args, inputs))
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
        inputs.update({key: values[key] for key in case_files.CASE_SETTINGS if key in values})
        single = case_files.is_single_frame(task, _output_frames(args, inputs))
        if values.get("output"):
            output = case_files.output_path(values["output"], single)
        else:
            output = case_files.derived_output(directory, number, len(entries), task, single)
        cases.append(case_files.Case(number, inputs, output))
    if ignored_modes:
        note(
            f"warning: `guidance_mode` of case(s) {', '.join(map(str, ignored_modes))} in '{args.inputs}' is ignored: "
            "in a batch the generation settings come from the command line (--guidance_mode), as upstream."
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
    # With context windows a forward sees one window: its length is what to lower.
    frames = "`num_frames`" if call.get("context_frames") is None else "`context_frames`"
    if rope is not None and max(grid) > rope:
        return (
            f"a stream of this case spans {grid[0]}x{grid[1]}x{grid[2]} latent positions (frames/4+1 x H/16 x W/16), "
            f"beyond the model's rope table of {rope} per axis (rope_max_seq_len): keep {frames} <= "
            f"{(rope - 1) * 4 + 1} and `height`, `width`, `max_image_size` <= {rope * 16}."
        )
    if tokens > limit:
        return (
            f"this case needs about {tokens:,} transformer tokens in its longest guidance branch (target and "
            f"conditions, frames/4+1 x H/16 x W/16 each; media of unknown size count as `max_image_size` squares), "
            f"more than the limit of {limit:,}: lower {frames}, `height`/`width` or `max_image_size`, or raise "
            f"the limit with --max_tokens N (or ${MAX_TOKENS_ENV}=N)."
        )
    return None


def check_cases(args: argparse.Namespace, cases: list[case_files.Case]) -> None:
    """Validate every case's call (inputs, media files, values, size) without a model, and refuse two cases writing
    one file (compared by real path, so a symlinked folder is the same folder); the problems are recorded on the
    cases, in flag names (a case file's own keys keep theirs)."""
    from .pipeline_bernini import BerniniPipeline

    keep = case_files.CASE_KEYS if args.case is not None or args.inputs is not None else ()
    limit, rope = max_tokens(args), known_rope_length(resolve_model(args)[0])
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
    from tqdm.auto import tqdm  # diffusers' progress bars are tqdm's

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

    The writer prints one status line when decoding starts and one before the write.
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
    # Announced when the VAE's decoder first runs, once the denoising bar has closed: a line printed from the last
    # step's callback lands inside the bar, before its last update.
    decoder = getattr(getattr(pipe, "vae", None), "decoder", None)
    announce = None
    if writer and isinstance(decoder, torch.nn.Module):

        def decoding(module, inputs):
            announce.remove()
            _status("decoding...")

        announce = decoder.register_forward_pre_hook(decoding)
    try:
        out = pipe(**kwargs, generator=torch.Generator("cpu").manual_seed(args.seed), output_type="np")
    finally:
        if announce is not None:
            announce.remove()
    if not writer:
        return None
    _status(f"writing {case.output}")
    return media.write_output(out.frames[0], case.output, out.fps)


def _sweep_temporaries(output: Path) -> list[Path]:
    """Remove the temporaries a dead run left for `output` (media.write_output's naming); only called by the run
    that took over that run's stale lock, so no live writer's file is touched."""
    from . import media

    removed = []
    for stale in media.temporaries(output):
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
            reason = lock.problem or lock.blocked() or f"{case.output} was claimed by another run meanwhile"
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


def _unlocked(
    cases: list[case_files.Case], pending: list[case_files.Case], outcomes: dict[int, _Outcome], batch: bool
) -> list[case_files.Case]:
    """The pending cases whose output no other run holds, checked before the model loads (`CaseLock.blocked`: a live
    run's lock, or anything at the lock's path that is not a lock file). A single case that is held stops the command
    (exit status 1); in a batch a held case is skipped, as it would be when its turn came."""
    free = []
    for case in pending:
        reason = case_files.CaseLock(case.output).blocked()
        if reason is None:
            free.append(case)
            continue
        if not batch:
            raise CaseBusyError(f"{reason}; wait for it, or choose another --output.")
        outcomes[case.number] = _Outcome("skipped", reason)
        if os.environ.get("RANK", "0") == "0":  # every rank checks; the first one reports
            print(f"[{case.number}/{len(cases)}] skipped: {reason}", file=sys.stderr)
    return free


def _complete_or_note(case: case_files.Case) -> bool:
    """Whether the existing output of `case` is complete; if not (empty, cut short, unreadable) it is redone, noted."""
    from . import media

    if media.is_complete_output(case.output):
        return True
    note(f"[{case.number}] {case.output} exists but is empty or unreadable: generating it again")
    return False


# An expert-major group holds the paused calls' tensors (latents, text embeddings, encoded conditions, plus the
# scheduler's history: about as much again) in host RAM; it takes cases until they reach this share of the RAM
# available when the group starts (always at least one case).
GROUP_RAM_SHARE = 0.25


def _runs_expert_major(args: argparse.Namespace, batch: bool, state, cases: list[case_files.Case]) -> bool:
    """A batch of several cases under a `low_ram` profile (any of them), in one process, with no step cache (its
    state would carry across the interleaved cases) runs expert-major."""
    profile = getattr(args, "memory_profile", None) or ""
    return (
        batch and state is None and len(cases) > 1 and "low_ram" in profile
        and getattr(args, "cache_preset", None) is None
    )


def _expert_major(pipe, args, cases, todo, outcomes, enhancer, started) -> None:
    """Run `todo` expert-major: every case of a group is prepared (text encoder, then media), then every case runs its
    high-noise steps, then every case its low-noise steps, then each is decoded and written; under `low_ram` each
    expert is read from disk once per group instead of once per case. Each case keeps its own call state
    (`BerniniPipeline.call_phases`), so its output equals the case run alone. Locks are held for the group's cases;
    a case that fails is reported and the others go on; an output not written is pending for the next run."""
    import psutil
    import torch

    from . import media
    from .pipeline_bernini import run_phases

    todo = list(todo)

    def failed(entry, err) -> None:
        case, lock, phases, _ = entry
        if phases is not None:
            phases.close()
        lock.release()
        why = printable(mask_secrets(f"{type(err).__name__}: {err}"))
        outcomes[case.number] = _Outcome("failed", f"{case.output}: {why}")
        print(f"[{case.number}/{len(cases)}] failed: {why}", file=sys.stderr)

    while todo:
        group, held, budget = [], 0, GROUP_RAM_SHARE * psutil.virtual_memory().available
        while todo and (not group or held < budget):
            case = todo.pop(0)
            lock, reason = _claim(case, True, started)
            if lock is None:
                outcomes[case.number] = _Outcome("skipped", reason)
                print(f"[{case.number}/{len(cases)}] skipped: {reason}", file=sys.stderr)
                continue
            print(f"[{case.number}/{len(cases)}] {case.inputs['task_type']} -> {case.output}", file=sys.stderr)
            entry = [case, lock, None, None]  # the case, its lock, its paused call, the phase it paused at
            try:
                kwargs = call_arguments(args, case)
                if enhancer is not None:
                    enhanced = enhance_on_writer(enhancer, kwargs)
                    if enhanced != kwargs["prompt"]:
                        print(f"prompt: {printable(enhanced)}", file=sys.stderr)  # the endpoint's reply, escaped
                    kwargs["prompt"] = enhanced
                generator = torch.Generator("cpu").manual_seed(args.seed)
                entry[2] = pipe.call_phases(**kwargs, generator=generator, output_type="np")
                phase = next(entry[2])
                entry[3] = phase.name
                held += 2 * phase.state_bytes  # x2: the scheduler's history of the latents
            except Exception as err:  # in a batch one case's failure is reported and the others run
                failed(entry, err)
                continue
            group.append(entry)
        # Every case runs its first expert's steps, then every case the second's (a case whose plan has one expert
        # runs it in the first round and waits in the second), then each is decoded and written.
        for last in (False, False, True):
            live = []
            for entry in group:
                case, lock, phases, paused = entry
                try:
                    if not last:
                        if paused != "denoised":
                            entry[3] = next(phases).name
                        live.append(entry)
                        continue
                    _status("decoding...")
                    out = run_phases(phases)
                    _status(f"writing {case.output}")
                    path = media.write_output(out.frames[0], case.output, out.fps)
                except Exception as err:
                    failed(entry, err)
                    continue
                lock.release()
                outcomes[case.number] = _Outcome("done", str(path))
                print(path, flush=True)
            group = live


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
    if not args.plan:  # a plan may be made for a device this machine lacks
        check_environment(args)
    batch = args.inputs is not None
    cases = collect_cases(args)
    check_cases(args, cases)
    if not batch and cases[0].problem is not None:
        raise UsageError(cases[0].problem)
    if args.plan:
        return print_plans(args, cases)

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
    pending = _unlocked(cases, pending, outcomes, batch)
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
        if _runs_expert_major(args, batch, state, mine):
            _expert_major(pipe, args, cases, mine, outcomes, enhancer, started)
            mine = []
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
                why = printable(mask_secrets(f"{type(err).__name__}: {err}"))
                outcomes[case.number] = _Outcome("failed", f"{case.output}: {why}")
                if writer:
                    print(f"[{case.number}/{len(cases)}] failed: {why}", file=sys.stderr)
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


def _media_sizes(call: dict[str, Any]) -> dict[str, tuple[int, int]]:
    """(width, height) of each media file of a call, read cheaply (a video's header and first frame)."""
    from . import media

    videos = media.split_videos(call.get("video"))
    named = [("video" if len(videos) == 1 else f"video[{i}]", v, media.probe_video) for i, v in enumerate(videos)]
    named += [("image", call.get("image"), media.probe_image)]
    named += [(f"images[{i}]", v, media.probe_image) for i, v in enumerate(call.get("images") or [])]
    sizes = {}
    for name, value, probe in named:
        if isinstance(value, (str, os.PathLike)):
            found = probe(value, name)
            sizes[name] = found.size if name.startswith("video") else found
    return sizes


def _shard_degree(args: argparse.Namespace) -> int:
    """The ranks that share each expert's weights: --ulysses x --branch_parallel with --shard_weights, else 1."""
    return args.ulysses * args.branch_parallel if getattr(args, "shard_weights", False) else 1


def print_plans(args: argparse.Namespace, cases: list[case_files.Case]) -> int:
    """`--plan`: print each valid case's memory plan (`BerniniPipeline.estimate_memory`) without loading weights;
    exit status 0 whether or not it fits (the plan says so), 2 for a case that is not valid."""
    import torch

    from .memory import default_device
    from .pipeline_bernini import BerniniPipeline
    from .tiny import tiny_model_configs

    model, _ = resolve_model(args)
    try:
        device = torch.device(args.device) if args.device else default_device()
    except (RuntimeError, TypeError):
        raise ValueError(f"`device`={args.device!r} is not a torch device; use cpu, cuda, cuda:N.") from None
    dtype = getattr(torch, DTYPES[args.dtype or ("fp32" if device.type == "cpu" else "bf16")])
    profile = args.memory_profile or ("expert_offload" if args.enable_model_cpu_offload else "resident")
    if model == TINY_MODEL:
        model = tiny_model_configs()
    status = 0
    for case in cases:
        if case.problem is not None:
            print(f"[{case.number}/{len(cases)}] {case.problem}", file=sys.stderr)
            status = 2
            continue
        call = call_arguments(args, case)
        plan = BerniniPipeline.estimate_memory(
            model, profile, args.checkpoint_format, device=device, dtype=dtype, gpu_memory=args.gpu_memory,
            ram=args.ram, media_sizes=_media_sizes(call), shard_degree=_shard_degree(args), **call,
        )
        print(f"[{case.number}/{len(cases)}] {case.inputs['task_type']} -> {case.output}\n{plan}", flush=True)
    return status


# Exceptions of these packages are the network or the Hub failing, whatever their base class: exit status 1.
_ENVIRONMENT_PACKAGES = ("huggingface_hub", "requests", "httpx", "httpcore", "urllib3")


def _from_environment(err: BaseException) -> bool:
    """Whether `err`, or an error it was raised from or while handling, is the network's or the Hub's (a Hub error
    wrapped in a `FileNotFoundError` naming the flag is still the Hub failing, not the user)."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if {cls.__module__.split(".")[0] for cls in type(err).__mro__} & set(_ENVIRONMENT_PACKAGES):
            return True
        err = err.__cause__ or err.__context__
    return False


def _failure(err: BaseException) -> tuple[int, str]:
    """The exit status and the one line `main` prints for an error: 2 for bad input (in flag names), 1 for the
    environment (offline Hub, a Hub or network error, no space left, no driver) or anything else."""
    from_environment = _from_environment(err)
    if isinstance(err, UsageError):
        return 2, str(err)
    if isinstance(err, (ValueError, FileNotFoundError)) and not from_environment:
        return 2, flag_names(str(err))
    text = " ".join(str(err).split()) or type(err).__name__
    if isinstance(err, (ValueError, FileNotFoundError)):
        text = flag_names(text)  # a Hub failure reading a flag's repo: the flag by its name
    if not isinstance(err, (OSError, CaseBusyError)) or from_environment:
        text = f"{type(err).__name__}: {text}"
    return 1, f"{text} (--debug or {DEBUG_ENV}=1 shows the traceback)"


def main(argv: Sequence[str] | None = None) -> int:
    # Before anything can fail: no credential (`--token`, $HF_TOKEN, `hf_...`, Bearer values) in any message.
    protect_output(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    debug = bool(getattr(args, "debug", False)) or os.environ.get(DEBUG_ENV, "").strip() not in ("", "0")
    if not debug:
        silence_import_noise()  # before the command imports torch, diffusers and the pipeline
    try:
        result = args.func(args)
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"{parser.prog}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # one line, no traceback (unless asked): 2 for bad input, 1 for the environment
        if debug:
            raise mask_exception(err)  # the traceback shows the masked message (and `protect_output`'s hook masks it)
        status, text = _failure(err)
        print(f"{parser.prog}: error: {mask_secrets(text)}", file=sys.stderr)
        return status
    if isinstance(result, int) and not isinstance(result, bool):
        return result
    if result is not None:
        print(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
