"""The flags and loaders `bernini generate` and `bernini demo` share: the model (weights, dtype, device, attention
kernel, offload, the official switches), the sizes with their model-dependent defaults, the prompt enhancer and
`--debug`; and the checks of the device and kernel that run before any weight is read.

Building the parser imports nothing but the standard library and `constants` (`bernini --help` answers before torch
loads): torch, diffusers and the pipeline are imported inside the functions that run a command.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
from pathlib import Path
from typing import Any

from .constants import (
    ATTENTION_BACKENDS,
    CACHE_PRESET_NAMES,
    DEFAULT_MAX_TOKENS,
    DTYPES,
    MAX_TOKENS_ENV,
    MEMORY_PROFILE_NAMES,
    OFFICIAL_GUIDANCE,
    PE_MAX_RETRIES,
    PE_MAX_TIMEOUT,
    PE_RETRIES,
    PE_RETRIES_ENV,
    PE_TIMEOUT,
    PE_TIMEOUT_ENV,
    SHARDED_PROFILE_NAMES,
    TINY_CALL_DEFAULTS,
    TINY_MODEL,
    WAN22_BASE,
)

# Size flags whose default depends on the model: the official values for real weights, seconds-long runs for the
# tiny random model (the official 81 frames at 480x848 and 40 steps take tens of minutes on a CPU, for noise).
SIZE_DEFAULTS = {"num_frames": 81, "height": 480, "width": 848, "max_image_size": 848, "num_inference_steps": 40}
TINY_DEFAULTS = dict(TINY_CALL_DEFAULTS)  # the tiny pipeline's own call defaults
DEBUG_ENV = "BERNINI_DEBUG"


class UsageError(ValueError):
    """A bad-input error whose message already speaks in flag names (`main` prints it as it is, and exits 2)."""


def max_tokens(args: argparse.Namespace) -> int:
    """The size budget of `bernini generate` and `bernini serve`: `--max_tokens`, else `$BERNINI_MAX_TOKENS`, else the
    default."""
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


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults appended to each flag's help (a None default's meaning is in the text); epilogs kept as written."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def add_size_arguments(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """Add the size flags, unset by default: `resolve_size_defaults` fills them once the model is known."""
    meanings = {
        "num_frames": "output frames; for video inputs, the cap (4k+1) unless context windows are on",
        "height": "output height without a source video or image",
        "width": "output width without a source video or image",
        "max_image_size": "long-side limit of the input media",
        "num_inference_steps": "denoising steps",
    }
    for name, meaning in meanings.items():
        parser.add_argument(
            f"--{name}", type=int,
            help=f"{meaning}; default: {SIZE_DEFAULTS[name]} ({TINY_DEFAULTS[name]} with --model tiny)",
        )  # fmt: skip


def resolve_size_defaults(args: argparse.Namespace) -> dict[str, int]:
    """Fill the size flags left unset (see `add_size_arguments`) for the model of `args`; returns what was filled.

    With `--turbo_lora` the recipe's settings come first (`resolve_turbo_defaults`).
    """
    resolve_turbo_defaults(args)
    defaults = TINY_DEFAULTS if getattr(args, "model", None) == TINY_MODEL else SIZE_DEFAULTS
    filled = {name: value for name, value in defaults.items() if getattr(args, name, None) is None}
    for name, value in filled.items():
        setattr(args, name, value)
    return filled


def resolve_turbo_defaults(args: argparse.Namespace) -> dict[str, Any]:
    """With `--turbo_lora`, fill the step count and guidance flags the user left unset with `acceleration.TURBO`'s
    values (4 steps, guidance weights 1); returns what was filled. Without it, nothing changes.

    A guidance flag still at its official default (`constants.OFFICIAL_GUIDANCE`, the pipeline call's, which the
    generate flags share) is taken as not given: argparse cannot tell a typed default apart.
    """
    if not getattr(args, "turbo_lora", None):
        return {}
    from . import acceleration

    filled = {}
    for name, value in acceleration.TURBO.items():
        if not hasattr(args, name):  # a front end without that flag (the demo has no guidance flags)
            continue
        current = getattr(args, name)
        if name == "num_inference_steps":
            unset = current is None
        elif name == "norm_threshold":
            values = current if isinstance(current, (list, tuple)) else [current]
            unset = all(v == OFFICIAL_GUIDANCE[name] for v in values)
        else:
            unset = current == OFFICIAL_GUIDANCE[name]
        if unset and current != value:
            setattr(args, name, [value] if name == "norm_threshold" and isinstance(current, list) else value)
            filled[name] = value
    return filled


def add_debug_argument(parser: argparse.ArgumentParser) -> None:
    """`--debug`: show the traceback of a failure (also `BERNINI_DEBUG=1`). Accepted before or after the command."""
    parser.add_argument(
        "--debug", action="store_true", default=argparse.SUPPRESS,
        help=f"show the full traceback of an error (also ${DEBUG_ENV}=1)",
    )


def note(message: str) -> None:
    """Print one note line on stderr, once per run: under torchrun only the first rank (the writer of the first data
    group) prints, since every rank checks the same flags and cases and would print the same lines."""
    if os.environ.get("RANK", "0").strip() in ("", "0"):
        print(message, file=sys.stderr)


# Known third-party noise, printed on import by every command on a machine without the packages' native parts (torchao
# 0.18 on a CPU machine: its CUDA kernels fail to load, it registers enums torch now deprecates registering, then
# diffusers cannot import torchao's tensor types). Each entry is one message of one logger; every other message of
# those loggers still shows, and `--debug` shows them all.
IMPORT_NOISE = {
    "torchao": re.compile(r"Failed to load .*\.so\b"),
    "torch.utils._pytree": re.compile(r"is an Enum subclass and is now natively supported by torch\.compile"),
    "diffusers.quantizers.torchao.torchao_quantizer": re.compile(r"Unable to import `torchao` Tensor objects"),
}


class _KnownNoise(logging.Filter):
    def __init__(self, pattern: re.Pattern):
        super().__init__()
        self.pattern = pattern

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.search(record.getMessage())


def silence_import_noise() -> None:
    """Drop the known third-party import messages of `IMPORT_NOISE` (the command line and the demo call this unless
    `--debug` is given). Idempotent; real warnings of the same loggers still show."""
    for name, pattern in IMPORT_NOISE.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _KnownNoise) for f in logger.filters):
            logger.addFilter(_KnownNoise(pattern))


def add_model_arguments(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """Add the flags `load_pipeline` reads: the weights, dtype, device, attention kernel, memory profile, VAE tiling,
    step cache, turbo LoRA, `--compile` and the official model switches (`--use_unipc`, `--use_src_tgt_id`,
    `--interpolate_src_id`, `--max_trained_src_id`).
    """
    parser.add_argument(
        "--model", "--config", dest="model", metavar="PATH|REPO|tiny",
        help=f"diffusers folder or Hub repo of the weights (the official --config folder works too); with "
             f"--high_noise_ckpt and no --model: {WAN22_BASE}; '{TINY_MODEL}': a random tiny model (noise, for tests)",
    )  # fmt: skip
    parser.add_argument(
        "--high_noise_ckpt", metavar="PATH|REPO",
        help="separate high-noise expert weights (with --low_noise_ckpt; alone for a one-expert model such as the "
        "1.3B): the official shard folder or index, or one .safetensors/.gguf file (Wan, ComfyUI, fp8, scaled fp8, "
        "GGUF: docs/checkpoints.md)",
    )
    parser.add_argument(
        "--low_noise_ckpt", metavar="PATH|REPO", help="separate low-noise expert weights (with --high_noise_ckpt)"
    )
    parser.add_argument("--dtype", choices=DTYPES, help="weights dtype (default: bf16 on an accelerator, fp32 on CPU)")
    parser.add_argument("--device", help="torch device (default: cuda, the local rank's under torchrun; else cpu)")
    parser.add_argument(
        "--attention_backend", choices=ATTENTION_BACKENDS,
        help="attention kernel (default: $BERNINI_ATTENTION_BACKEND, else auto: fa3 > fa2 > sdpa; sage: "
             "SageAttention, lossy, CUDA only, never chosen by auto)",
    )
    parser.add_argument(
        "--enable_model_cpu_offload", action="store_true",
        help="keep idle components on the CPU (the same as --memory_profile expert_offload)",
    )
    parser.add_argument(
        "--memory_profile", choices=MEMORY_PROFILE_NAMES, metavar="NAME",
        help=f"where the weights live during a call, one of {', '.join(MEMORY_PROFILE_NAMES)} (see the README's "
             "'Speed and memory'; default: every component on the device)",
    )  # fmt: skip
    parser.add_argument("--vae_tiling", action="store_true", help="decode with VAE tiling (720p and up)")
    parser.add_argument(
        "--cache_preset", choices=CACHE_PRESET_NAMES,
        help="step cache on both experts (changes the output; see README, Step caches); 'magcache' needs a "
             "calibration and is used from Python",
    )  # fmt: skip
    parser.add_argument(
        "--turbo_lora", nargs=2, metavar=("HIGH", "LOW"),
        help="few-step LoRA pair (Wan 2.2 Lightning / LightX2V): HIGH into the high-noise expert, LOW into the "
             "low-noise one; steps and guidance flags left unset take the recipe's (4 steps, weights 1). Changes "
             "the output; needs peft",
    )  # fmt: skip
    parser.add_argument(
        "--compile", action="store_true",
        help="regional torch.compile of both experts' transformer blocks (pipe.compile(): dynamic sequence lengths, "
             "no graph break); the first forward of each input layout compiles, later steps and calls reuse it",
    )  # fmt: skip
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


def add_shard_argument(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """`--shard_weights`, which `bernini generate` and `bernini serve` share (checked by `check_shard_flags`)."""
    parser.add_argument(
        "--shard_weights", action="store_true",
        help="shard both experts and the text encoder (FSDP2) across the --ulysses x --branch_parallel ranks of a "
        "clip; each rank reads only its expert shards (docs/parallel.md)",
    )  # fmt: skip


def check_shard_flags(args: argparse.Namespace) -> None:
    """`--shard_weights` needs a clip of several ranks and a memory profile sharded experts take; checked before
    the model loads."""
    if not getattr(args, "shard_weights", False):
        return
    if args.ulysses * args.branch_parallel == 1:
        raise ValueError(
            "`shard_weights` shards the experts across the --ulysses x --branch_parallel ranks of a clip, but both "
            "are 1; add e.g. --ulysses 2 (with torchrun --nproc-per-node 2)."
        )
    profile = "expert_offload" if getattr(args, "enable_model_cpu_offload", False) else args.memory_profile
    if profile not in (None, *SHARDED_PROFILE_NAMES):
        raise ValueError(
            f"`memory_profile`={profile!r} cannot be combined with `shard_weights` (its hooks move or read whole "
            f"blocks and experts, FSDP2 places the shards); use --memory_profile {', '.join(SHARDED_PROFILE_NAMES)}, "
            "or drop --shard_weights."
        )


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
    from .prompt_enhancer import PromptEnhancer

    return PromptEnhancer(model=args.pe_model, timeout=args.pe_timeout, max_retries=args.pe_retries)


def resolve_model(args: argparse.Namespace) -> tuple[str, dict[str, str]]:
    """The model path or repo to load and the separate-checkpoint arguments of `from_pretrained`."""
    high, low = args.high_noise_ckpt, args.low_noise_ckpt
    if high is None and low is not None:
        raise ValueError("`high_noise_ckpt` and `low_noise_ckpt` must be given together; got only `low_noise_ckpt`.")
    # `high_noise_ckpt` alone is the one expert of a one-expert model (the 1.3B); a two-expert base refuses it.
    checkpoints = {} if high is None else {"high_noise_ckpt": high, **({"low_noise_ckpt": low} if low else {})}
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
    if device.type == "meta":  # no storage: the weights would be gone
        raise ValueError(f"`device`={given!r} is not allowed: the meta device holds no data; use cpu or cuda.")
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
    if choice in attention.CUDA_KERNELS and device.type != "cuda":
        raise ValueError(
            f"{source}={requested!r} runs on CUDA GPUs only, but the device is {device}; use --attention_backend "
            "sdpa (or auto)."
        )
    if choice in attention.CUDA_KERNELS and not (dtype.is_floating_point and dtype.itemsize == 2):
        raise ValueError(
            f"{source}={requested!r} takes bf16 or fp16 weights, not {str(dtype).replace('torch.', '')}; pass "
            "--dtype bf16, or use --attention_backend sdpa."
        )
    return name


def _memory_profile(args: argparse.Namespace, device) -> str | None:
    """The memory profile the flags ask for (`--enable_model_cpu_offload` is `expert_offload`), None for none;
    a profile that moves weights off an accelerator is refused on the CPU, where it would save nothing."""
    name = getattr(args, "memory_profile", None)
    if getattr(args, "enable_model_cpu_offload", False):
        if name not in (None, "expert_offload"):
            raise ValueError(
                f"`enable_model_cpu_offload` is the memory profile 'expert_offload' and conflicts with "
                f"`memory_profile`={name!r}; pass one of them (e.g. --memory_profile fp8+expert_offload)."
            )
        if device.type == "cpu":
            raise ValueError("`enable_model_cpu_offload` needs an accelerator device, got device='cpu'.")
        return "expert_offload"
    if name is None:
        return None
    from .memory import get_memory_profile

    if get_memory_profile(name).at_load and getattr(args, "model", None) == TINY_MODEL:
        raise ValueError(
            f"`memory_profile`={name!r} reads the experts from their files, and --model {TINY_MODEL} is built in code: "
            "save it first (`tiny_pipeline().save_pretrained(DIR)`) and pass --model DIR."
        )
    if get_memory_profile(name).offloads and device.type == "cpu":
        raise ValueError(
            f"`memory_profile`={name!r} moves weights between the CPU and an accelerator, but the device is cpu; "
            "use --memory_profile resident or fp8 on the CPU, or --device cuda."
        )
    return name


def check_environment(args: argparse.Namespace) -> None:
    """The device, dtype, memory profile and attention backend the model flags ask for, checked before any weight
    is read."""
    from . import acceleration
    from .memory import get_memory_profile

    device = _device(args.device)
    profile = _memory_profile(args, device)
    _attention_backend(args, device, _dtype(args, device))
    for path in getattr(args, "turbo_lora", None) or ():
        # a missing, pickle, empty or non-finite file fails here, before any weight is read
        acceleration.check_lora_source(path, "turbo_lora")
    if getattr(args, "compile", False) and profile is not None:
        chosen = get_memory_profile(profile)
        if chosen.fp8 or chosen.placement == "group_offload":
            raise ValueError(
                f"`compile` and `memory_profile`={profile!r} do not go together: the profile's per-layer fp8 casting or "
                "group offload hooks cannot be compiled (the first step would fail); pass one of them, or "
                "--memory_profile expert_offload with --compile."
            )
    if getattr(args, "compile", False) and getattr(args, "cache_preset", None) is not None:
        # `pipe.compile()` compiles whole blocks (fullgraph), which a step cache's hooks would break.
        raise ValueError(
            f"`compile` and `cache_preset`={args.cache_preset!r} do not go together: a step cache's hooks break the "
            "compiled graph; pass one of them."
        )


def known_rope_length(model: str) -> int | None:
    """The experts' `rope_max_seq_len` when it is known without loading: the tiny model's, or a local folder's
    `transformer/config.json`; None otherwise (a Hub repo is checked against its config only once loaded)."""
    if model == TINY_MODEL:
        from .tiny import TINY_TRANSFORMER_CONFIG

        return TINY_TRANSFORMER_CONFIG["rope_max_seq_len"]
    config = Path(model) / "transformer" / "config.json"
    try:
        value = json.loads(config.read_text()).get("rope_max_seq_len")
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, int) and value > 0 else None


def load_pipeline(args: argparse.Namespace):
    """The pipeline the model flags describe (see `add_model_arguments`), on its device, ready to call."""
    from . import tiny
    from .memory import get_memory_profile
    from .pipeline_bernini import BerniniPipeline

    model, checkpoints = resolve_model(args)
    device = _device(args.device)
    dtype = _dtype(args, device)
    profile = _memory_profile(args, device)
    max_src_id = args.max_trained_src_id
    if not isinstance(max_src_id, int) or max_src_id < 1:
        raise ValueError(f"`max_trained_src_id`={max_src_id!r} must be an integer >= 1.")

    shard = bool(getattr(args, "shard_weights", False))
    check_shard_flags(args)
    if shard and getattr(args, "compile", False):
        raise ValueError("`compile` cannot be combined with `shard_weights` yet; drop one of them.")
    at_load = profile is not None and get_memory_profile(profile).at_load
    if model == TINY_MODEL:
        pipe = tiny.tiny_pipeline(torch_dtype=dtype)  # the VAE stays float32
        note(f"note: --model {TINY_MODEL} has random weights; its output is noise.")
        if shard:
            pipe._shard_weights(args.ulysses, args.branch_parallel, profile and get_memory_profile(profile))
    elif at_load:  # low_ram decides what is loaded at all
        pipe = BerniniPipeline.from_pretrained(model, dtype=dtype, memory_profile=profile, device=device, **checkpoints)
    elif shard:
        # Each rank reads only its shards of the experts (docs/parallel.md); the other components load whole.
        pipe = BerniniPipeline.from_pretrained_sharded(
            model, args.ulysses, args.branch_parallel, dtype=dtype, memory_profile=profile,
            device=None if profile is None else device, **checkpoints,
        )  # fmt: skip
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
    turbo = getattr(args, "turbo_lora", None)
    if turbo:
        pipe.load_turbo_lora(*turbo)
    if getattr(args, "cache_preset", None) is not None:
        pipe.enable_cache_preset(args.cache_preset)
    if at_load:
        if getattr(args, "vae_tiling", False):
            pipe.vae.enable_tiling()
    elif shard and profile is not None and model == TINY_MODEL:  # stored in fp8 when sharded; now its placement
        pipe._apply_sharded_profile(get_memory_profile(profile), device)
        if getattr(args, "vae_tiling", False):
            pipe.vae.enable_tiling()
    elif profile is not None:
        pipe.enable_memory_profile(profile, device, vae_tiling=bool(getattr(args, "vae_tiling", False)))
    else:
        pipe.to(device)
        if getattr(args, "vae_tiling", False):
            pipe.vae.enable_tiling()
    if args.compile:
        pipe.compile()
    return pipe
