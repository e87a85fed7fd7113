"""The `bernini` command line. `bernini generate` is one `BerniniPipeline` call written to a PNG or an MP4.

Only the standard library and the task table are imported at module level, so `bernini --help` answers at once;
torch, diffusers and the model load inside the command.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from .tasks import TASKS, GuidanceMode, Need, TaskSpec, TaskType

# The `BerniniPipeline.__call__` arguments that have a same-named flag and are passed on by name.
CALL_ARGUMENTS = (
    "prompt", "task_type", "video", "image", "images", "negative_prompt", "system_prompt", "guidance_mode",
    "num_frames", "height", "width", "max_image_size", "fps", "num_inference_steps", "flow_shift",
    "omega_vid", "omega_img", "omega_txt", "omega_scale", "eta", "momentum", "norm_threshold",
)
DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
# Same names as attention.ATTENTION_BACKENDS (a test keeps them equal); that module imports torch.
ATTENTION_BACKENDS = ("auto", "sdpa", "fa2", "fa3")
TINY_MODEL = "tiny"


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
         f"guidance modes: {', '.join(modes)}."]
    )


def _add_generate_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "generate", help="run one task and write a PNG (one frame) or an MP4", formatter_class=_HelpFormatter,
        description="Run one Bernini-R task and write its result.", epilog=_tasks_epilog(),
    )
    model = parser.add_argument_group("model")
    model.add_argument(
        "--model", "--config", dest="model", required=True, metavar="PATH|REPO|tiny",
        help=f"diffusers folder or Hub repo of the weights; '{TINY_MODEL}': a random tiny model (noise, for tests)",
    )
    model.add_argument("--dtype", choices=DTYPES, help="weights dtype (default: bf16 on an accelerator, fp32 on CPU)")
    model.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    model.add_argument(
        "--attention_backend", choices=ATTENTION_BACKENDS,
        help="attention kernel (default: $BERNINI_ATTENTION_BACKEND, else auto: fa3 > fa2 > sdpa)",
    )
    model.add_argument("--enable_model_cpu_offload", action="store_true", help="keep idle components on the CPU")

    inputs = parser.add_argument_group("inputs")
    inputs.add_argument("--prompt", help="what to generate, or how to edit")
    inputs.add_argument(
        "--task_type", default=TaskType.T2V.value, choices=[t.value for t in TaskType],
        help="the task; see 'task types' below",
    )
    inputs.add_argument("--video", nargs="+", metavar="PATH", help="source video (ads2v: source and insert)")
    inputs.add_argument("--image", metavar="PATH", help="source image (i2i)")
    inputs.add_argument("--images", nargs="+", metavar="PATH", help="reference images")

    gen = parser.add_argument_group("generation")
    gen.add_argument(
        "--negative_prompt", "--neg_prompt", dest="negative_prompt", help="default: the standard Wan negative prompt"
    )
    gen.add_argument("--system_prompt", help="T5 prefix of the prompt; unset or '' uses the task's own")
    gen.add_argument(
        "--guidance_mode", choices=[m.value for m in GuidanceMode], help="default: the task's; see below"
    )
    gen.add_argument("--num_frames", type=int, default=81, help="output frames; for video inputs, the cap (4k+1)")
    gen.add_argument("--height", type=int, default=480, help="output height without a source video or image")
    gen.add_argument("--width", type=int, default=848, help="output width without a source video or image")
    gen.add_argument("--max_image_size", type=int, default=848, help="long-side limit of the input media")
    gen.add_argument("--fps", type=float, default=16, help="source videos are resampled to it; output fps")
    gen.add_argument("--num_inference_steps", type=int, default=40, help="denoising steps")
    gen.add_argument("--flow_shift", type=float, default=5.0, help="flow shift of the UniPC sigmas")
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
    gen.add_argument("--seed", type=int, default=42, help="seed of the CPU generator of the initial noise")
    parser.add_argument_group("output").add_argument(
        "--output", default="outputs/output.mp4", help="output path; one frame switches the suffix to .png"
    )
    parser.set_defaults(func=generate)
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bernini", description="Bernini-R, ByteDance's video renderer, as a diffusers pipeline."
    )
    subparsers = parser.add_subparsers(dest="command", title="commands", metavar="COMMAND")
    _add_generate_parser(subparsers)
    from .demo import add_demo_parser  # these modules import nothing heavy at module level
    from .hub_export.cli import add_export_parser

    add_export_parser(subparsers)
    add_demo_parser(subparsers)
    return parser


def load_pipeline(args: argparse.Namespace):
    """The pipeline named by `--model`, in `--dtype`, on `--device`, with `--attention_backend` applied."""
    import torch

    from .pipeline_bernini import BerniniPipeline

    try:
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError as err:
        raise ValueError(f"`device`={args.device!r} is not a torch device ({err}).") from None
    dtype = getattr(torch, DTYPES[args.dtype or ("fp32" if device.type == "cpu" else "bf16")])
    if args.enable_model_cpu_offload and device.type == "cpu":
        raise ValueError("`enable_model_cpu_offload` needs an accelerator device, got device='cpu'.")

    if args.model == TINY_MODEL:
        from .testing import tiny_pipeline

        pipe = tiny_pipeline(torch_dtype=dtype)  # the VAE stays float32
        print(f"note: --model {TINY_MODEL} has random weights; its output is noise.", file=sys.stderr)
    else:
        pipe = BerniniPipeline.from_pretrained(args.model, torch_dtype=dtype)
    try:
        pipe.set_attention_backend(args.attention_backend)
    except (ImportError, RuntimeError) as err:  # a chosen kernel that cannot run here: a usage error
        raise ValueError(f"`attention_backend`={args.attention_backend!r}: {err}") from None
    if args.enable_model_cpu_offload:
        pipe.enable_model_cpu_offload(device=device)
    else:
        pipe.to(device)
    return pipe


def generate(args: argparse.Namespace) -> Path:
    """Run the pipeline once and write its result; returns the path written (the suffix follows the frame count)."""
    import torch

    from . import media

    from .pipeline_bernini import BerniniPipeline

    kwargs = {name: getattr(args, name) for name in CALL_ARGUMENTS}
    kwargs["system_prompt"] = args.system_prompt or None  # the official CLI's "" means the task's own prefix
    BerniniPipeline.validate_call(**kwargs)  # fail on bad input before loading the weights
    pipe = load_pipeline(args)
    out = pipe(**kwargs, generator=torch.Generator("cpu").manual_seed(args.seed), output_type="np")
    return media.write_output(out.frames[0], args.output, out.fps)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        path = args.func(args)
    except (ValueError, FileNotFoundError) as err:  # bad input, named by the pipeline: no traceback
        print(f"{parser.prog}: error: {err}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
