"""Memory profiles: named recipes over diffusers' own memory mechanisms, applied to a loaded pipeline.

`BerniniPipeline.enable_memory_profile(name)` delegates here. A profile is where the weights live while a call runs
(`resident`, `expert_offload`, `group_offload`) and, optionally, how the experts store them (`fp8`):

| profile | mechanism |
|---|---|
| `resident` | `pipe.to(device)`: every component on the device |
| `expert_offload` | diffusers' model offload (`enable_model_cpu_offload`): one component on the device at a time |
| `group_offload` | diffusers' group offload (`apply_group_offloading`): the experts block by block with a CUDA stream that prefetches the next block, the text encoder as one group, the VAE layer by layer |
| `fp8` | diffusers' layerwise casting on both experts: weights stored in float8_e4m3fn, each layer cast back to the experts' dtype for its own forward |

`low_ram`, `fp8+low_ram` and `low_ram+group_offload` are chosen at load (`low_ram.py`, docs/memory.md).

`fp8` combines with the placements: `fp8+expert_offload`, `fp8+group_offload` (`fp8` alone is `fp8` resident). The
offload profiles move tensors only, so their output equals the resident run's bit for bit; fp8 storage rounds the
weights, so it changes the output (see the README's "Speed and memory").

A pipeline takes one profile: applying the same one again only updates VAE tiling; another one is refused, since
diffusers' offload and casting hooks cannot be undone in place (load the pipeline again instead).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from accelerate import init_empty_weights
from diffusers.hooks import apply_group_offloading

from .constants import SHARDED_PROFILE_NAMES

logger = logging.getLogger(__name__)

FP8_STORAGE_DTYPE = torch.float8_e4m3fn
# One transformer block per group: the smallest resident set (one block, plus the next one prefetched on a stream).
EXPERT_BLOCKS_PER_GROUP = 1
TEXT_ENCODER_BLOCKS_PER_GROUP = 1
# diffusers' hook names (hooks/group_offloading.py, hooks/layerwise_casting.py), to recognise hooks applied by hand.
_GROUP_OFFLOAD_HOOK = "group_offloading"
_LAYERWISE_CASTING_HOOK = "layerwise_casting"


@dataclass(frozen=True)
class MemoryProfile:
    """One named recipe: where the weights live during a call, and whether the experts store them in float8."""

    name: str
    placement: str  # "resident", "expert_offload", "group_offload" or "low_ram"
    fp8: bool
    description: str
    # Host RAM holds one large component at a time, each read from its files (low_ram): chosen by `from_pretrained`
    from_files: bool = False

    @property
    def offloads(self) -> bool:
        """Whether the profile moves weights between the CPU and the device (so it needs an accelerator to help)."""
        return self.placement in ("expert_offload", "group_offload")

    @property
    def at_load(self) -> bool:
        """Whether the profile decides what is loaded at all, so it is chosen by `from_pretrained` (`low_ram`)."""
        return self.from_files


_PLACEMENTS = {
    "resident": "every component on the device",
    "expert_offload": "one component on the device at a time (diffusers' model offload): one expert per step",
    "group_offload": (
        "the experts one block at a time, prefetched on a CUDA stream; the text encoder and the VAE only while "
        "they run (diffusers' group offload)"
    ),
}
_LOW_RAM = (
    "chosen at load (`from_pretrained(..., memory_profile='low_ram')`): host RAM holds one component at a time, each "
    "expert read from its file for its own steps and released before the other one is read"
)
_FP8 = "experts stored in float8_e4m3fn, computed in their dtype (diffusers' layerwise casting)"

MEMORY_PROFILES: dict[str, MemoryProfile] = {
    "resident": MemoryProfile("resident", "resident", False, _PLACEMENTS["resident"]),
    "expert_offload": MemoryProfile("expert_offload", "expert_offload", False, _PLACEMENTS["expert_offload"]),
    "group_offload": MemoryProfile("group_offload", "group_offload", False, _PLACEMENTS["group_offload"]),
    "fp8": MemoryProfile("fp8", "resident", True, f"{_FP8}; {_PLACEMENTS['resident']}"),
    "fp8+expert_offload": MemoryProfile(
        "fp8+expert_offload", "expert_offload", True, f"{_FP8}; {_PLACEMENTS['expert_offload']}"
    ),
    "fp8+group_offload": MemoryProfile(
        "fp8+group_offload", "group_offload", True, f"{_FP8}; {_PLACEMENTS['group_offload']}"
    ),
    "low_ram": MemoryProfile("low_ram", "low_ram", False, _LOW_RAM, from_files=True),
    "fp8+low_ram": MemoryProfile("fp8+low_ram", "low_ram", True, f"{_FP8}; {_LOW_RAM}", from_files=True),
    # The current expert read to the host, then run one block at a time on the device; the text encoder as low_ram
    "low_ram+group_offload": MemoryProfile(
        "low_ram+group_offload", "group_offload", False,
        f"{_LOW_RAM}; the expert read runs one block at a time on the device (diffusers' group offload)",
        from_files=True,
    ),  # fmt: skip
}
MEMORY_PROFILE_NAMES = tuple(MEMORY_PROFILES)


def get_memory_profile(name: str) -> MemoryProfile:
    """The profile called `name`; a `ValueError` listing the names otherwise."""
    profile = MEMORY_PROFILES.get(name) if isinstance(name, str) else None
    if profile is None:
        names = ", ".join(MEMORY_PROFILES)
        raise ValueError(f"`memory_profile`={name!r} is not a memory profile; choose one of {names}.")
    return profile


def check_sharded_profile(name: str) -> MemoryProfile:
    """The profile called `name` if sharded experts take it (`constants.SHARDED_PROFILE_NAMES`: their shards stay on
    the device or, with `expert_offload`, the idle one's on the CPU); a `ValueError` otherwise."""
    profile = get_memory_profile(name)
    if profile.name not in SHARDED_PROFILE_NAMES:
        raise ValueError(
            f"`memory_profile`={profile.name!r} cannot be combined with sharded weights (its hooks move or read "
            f"whole blocks and experts, FSDP2 places the shards); use one of {', '.join(SHARDED_PROFILE_NAMES)}."
        )
    return profile


def default_device() -> torch.device:
    """CUDA when it is available, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def checked_device(device: str | torch.device | None) -> torch.device:
    """`device` as a torch device that exists here (CUDA's current index when none is given); the default device
    when None; a `ValueError` naming it otherwise."""
    try:
        device = default_device() if device is None else torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"`device`={device!r} is not a torch device; use cpu, cuda, cuda:N.") from None
    if device.type == "meta":  # no storage: the weights placed there would be gone
        raise ValueError("`device`='meta' is not allowed: the meta device holds no data; use cpu, cuda or cuda:N.")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"`device`={str(device)!r}: no CUDA device is available here; use device='cpu'.")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def full_precision_parameters(expert: torch.nn.Module) -> list[str]:
    """Names of the parameters of `expert` that are not stored in float8. After `fp8`: the patch embeddings, the
    condition embedder (time and text), every norm, the modulation tables and `proj_out` (diffusers' default skip
    patterns, Wan's `_skip_layerwise_casting_patterns` and `_keep_in_fp32_modules`; parameters outside a Linear or
    Conv layer are never cast)."""
    return [name for name, p in expert.named_parameters() if p.dtype != FP8_STORAGE_DTYPE]


def parameter_bytes(module: torch.nn.Module) -> int:
    """Bytes held by the parameters and buffers of `module`, in their storage dtype."""
    tensors = [*module.parameters(), *module.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors)


EXPERT_NAMES = ("transformer:", "transformer_2:")


def _experts(pipe) -> list[torch.nn.Module]:
    return [e for e in (pipe.transformer, pipe.transformer_2) if e is not None]


def _modules(pipe) -> dict[str, torch.nn.Module]:
    return {name: c for name, c in pipe.components.items() if isinstance(c, torch.nn.Module)}


def _foreign_hooks(pipe) -> list[str]:
    """Offload or casting already applied to `pipe` by hand, as `component: mechanism` lines."""
    found = []
    if getattr(pipe, "_all_hooks", None):
        found.append("pipeline: model offload (enable_model_cpu_offload)")
    for name, component in _modules(pipe).items():
        kinds = set()
        for module in component.modules():
            if hasattr(module, "_hf_hook"):
                kinds.add("accelerate offload hooks (enable_sequential_cpu_offload or a device_map)")
            registry = getattr(module, "_diffusers_hook", None)
            hooks = getattr(registry, "hooks", {}) if registry is not None else {}
            if _GROUP_OFFLOAD_HOOK in hooks:
                kinds.add("group offload")
            if _LAYERWISE_CASTING_HOOK in hooks:
                kinds.add("layerwise casting")
        found += [f"{name}: {kind}" for kind in sorted(kinds)]
    return found


def check_compile(pipe) -> None:
    """Refuse `pipe.compile()` over experts with group offload or layerwise casting (fp8) hooks: their per-layer
    `module.to` and `torch.compiler.disable`d onload calls cannot be traced, so the first step would fail."""
    blocking = [line for line in _foreign_hooks(pipe) if line.startswith(EXPERT_NAMES) and "model offload" not in line]
    if blocking:
        applied = getattr(pipe, "_memory_profile", None)
        what = f"the memory profile {applied[0]!r}" if applied else "; ".join(blocking)
        raise ValueError(
            f"`compile` and {what} do not go together: the experts' group offload or fp8 casting hooks run inside "
            "each block and cannot be compiled (the first step would fail). Use one of them, or compile with the "
            "'resident' or 'expert_offload' profile."
        )


def apply_memory_profile(pipe, name: str, device: str | torch.device | None = None, *, vae_tiling: bool = False):
    """Apply the memory profile `name` to `pipe` (see `BerniniPipeline.enable_memory_profile`); returns it."""
    profile = get_memory_profile(name)
    if profile.at_load:
        raise ValueError(
            f"`memory_profile`={profile.name!r} decides what is loaded at all, so it is chosen at load: pass "
            f"`BerniniPipeline.from_pretrained(..., memory_profile={profile.name!r})` (or `--memory_profile "
            f"{profile.name}`) instead of `enable_memory_profile`."
        )
    if not isinstance(vae_tiling, bool):
        raise ValueError(f"`vae_tiling`={vae_tiling!r} must be True or False.")
    device = checked_device(device)

    if getattr(pipe, "_compile_settings", None) is not None and (profile.fp8 or profile.placement == "group_offload"):
        raise ValueError(
            f"`memory_profile`={profile.name!r} and `compile` do not go together: the experts are already compiled, "
            "and the profile's per-layer hooks cannot be traced (the first step would fail). Load the pipeline "
            "again and use one of them, or the 'resident' or 'expert_offload' profile with `compile`."
        )
    applied = getattr(pipe, "_memory_profile", None)
    if applied is not None:
        if applied != (profile.name, device):
            raise ValueError(
                f"`memory_profile`={profile.name!r} on {device}: this pipeline already runs the profile "
                f"{applied[0]!r} on {applied[1]}, and diffusers' offload and casting hooks cannot be swapped in place; "
                "load the pipeline again to change profiles."
            )
        _set_vae_tiling(pipe, vae_tiling)  # the same profile again: nothing else to do
        return profile
    foreign = _foreign_hooks(pipe)
    if foreign:
        raise ValueError(
            f"`memory_profile`={profile.name!r}: this pipeline already has offload or casting applied by hand "
            f"({'; '.join(foreign)}); diffusers refuses to stack them. Apply the profile to a freshly loaded pipeline."
        )
    if profile.fp8:
        for expert in _experts(pipe):
            if any(p.dtype in (torch.float8_e4m3fn, torch.float8_e5m2) for p in expert.parameters()):
                raise ValueError(
                    f"`memory_profile`={profile.name!r}: the experts already store float8 weights (a float8 file "
                    "loaded with `keep_float8=True`); use a placement profile without fp8."
                )
            if getattr(expert, "hf_quantizer", None) is not None:
                raise ValueError(
                    f"`memory_profile`={profile.name!r}: the experts are already quantized "
                    f"({type(expert.hf_quantizer).__name__}); fp8 storage applies to unquantized bf16/fp32 experts."
                )
    if profile.offloads and device.type == "cpu":
        # Runs (tests use it), but the weights never leave the CPU, so nothing is saved.
        logger.warning("memory profile %r on the CPU moves nothing: the offload device is the CPU too.", profile.name)

    if profile.fp8:
        _store_experts_in_fp8(pipe)
    if profile.placement == "resident":
        pipe.to(device)
    elif profile.placement == "expert_offload":
        pipe.enable_model_cpu_offload(device=device)
    else:
        _group_offload(pipe, device)
    pipe._memory_profile = (profile.name, device)
    _set_vae_tiling(pipe, vae_tiling)
    return profile


def _store_experts_in_fp8(pipe) -> None:
    # Compute in the dtype the experts were loaded in (bf16 on GPUs); diffusers' default skip patterns plus Wan's own
    # keep the patch embeddings, the condition embedder, every norm and proj_out in full precision.
    for expert in _experts(pipe):
        expert.enable_layerwise_casting(storage_dtype=FP8_STORAGE_DTYPE, compute_dtype=expert.dtype)


def float8_parameter_names(expert: torch.nn.Module) -> list[str]:
    """The parameters of `expert` that the `fp8` profile stores in float8: the ones diffusers' layerwise casting
    casts, found by applying it to a copy of the expert on the meta device (its own skip patterns decide, so the
    two can never disagree)."""
    with init_empty_weights():
        probe = type(expert).from_config(expert.config)
    probe.enable_layerwise_casting(storage_dtype=FP8_STORAGE_DTYPE, compute_dtype=torch.float32)
    return [name for name, param in probe.named_parameters() if param.dtype == FP8_STORAGE_DTYPE]


def store_float8(expert: torch.nn.Module) -> torch.dtype:
    """Store the parameters the `fp8` profile would cast (`float8_parameter_names`) in float8_e4m3fn in place, without
    casting hooks, and return the dtype they compute in (the expert's, as the profile's): the storage of sharded
    experts, whose shards FSDP2 casts back for each block (`parallel.shard_model`). Works on the meta device too."""
    compute_dtype = expert.dtype
    names = set(float8_parameter_names(expert))
    for name, param in expert.named_parameters():
        if name in names:
            param.data = param.data.to(FP8_STORAGE_DTYPE)
    return compute_dtype


def _group_offload(pipe, device: torch.device) -> None:
    # The recipe of diffusers' group-offload docs: block level with a prefetching stream for the transformers (one
    # block per group, the next one copied while the current one runs) and the text encoder (its blocks sit under
    # `encoder`, where block level does not look, so it moves as one group, on the device only while it encodes);
    # leaf level without a stream for the VAE, whose `encode`/`decode` never call the top-level forward that a
    # block-level group or the stream's prefetch tracer hooks.
    use_stream = device.type == "cuda"
    for name, component in _modules(pipe).items():
        if name == "vae":
            apply_group_offloading(component, onload_device=device, offload_type="leaf_level")
            continue
        blocks = EXPERT_BLOCKS_PER_GROUP if name.startswith("transformer") else TEXT_ENCODER_BLOCKS_PER_GROUP
        apply_group_offloading(
            component, onload_device=device, offload_type="block_level", num_blocks_per_group=blocks,
            use_stream=use_stream,
        )


def _set_vae_tiling(pipe, vae_tiling: bool) -> None:
    if vae_tiling and pipe.vae is not None:
        pipe.vae.enable_tiling()
