"""Loading and saving of [`BerniniPipeline`], as a mixin: every published layout through diffusers' own
`from_pretrained` (the layouts are found by `loading`), the sharded load of a parallel launch, and `save_pretrained`
with the remote-code modules.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable

import torch
from diffusers import DiffusionPipeline

from . import low_ram, memory, parallel, sharded_load
from .hub_export.remote_code import add_remote_code
from .loading import component_dtypes, finish_load, pipeline_index, prepare_load, upload_saved
from .parallel import ParallelState
from .scheduling import default_scheduler


def _memory_profile_kwargs(kwargs: dict, profile_of: Callable[[str], memory.MemoryProfile]):
    """Pop `memory_profile` (read with `profile_of`, which refuses what the load cannot take) and its `device`."""
    profile, device = kwargs.pop("memory_profile", None), kwargs.pop("device", None)
    profile = None if profile is None else profile_of(profile)
    if device is not None and profile is None:
        raise ValueError(f"`device`={device!r} goes with `memory_profile`; without one, call `pipe.to(device)`.")
    return profile, device


class BerniniLoadingMixin:
    """`from_pretrained`, `from_pretrained_sharded`, `load_config` and `save_pretrained` of a Bernini-R pipeline.
    Placed before `DiffusionPipeline` in the bases: each wraps diffusers' own."""

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs) -> DiffusionPipeline:
        r"""
        Load Bernini-R from a folder or a Hub repo, in any published layout, with Bernini experts and a float32 VAE.

        The components load through [`~diffusers.DiffusionPipeline.from_pretrained`], so all of its keywords apply
        (`dtype`, `quantization_config`, `device_map`, `variant`, `low_cpu_mem_usage`, ...); this method only finds
        the files of the layout and builds the experts of original checkpoints.

        ```py
        pipe = BerniniPipeline.from_pretrained("ByteDance/Bernini-R-Diffusers", dtype=torch.bfloat16)
        # int8 weights for both experts (torchao), the text encoder in bfloat16, the VAE in float32
        from diffusers import PipelineQuantizationConfig, TorchAoConfig
        from torchao.quantization import Int8WeightOnlyConfig

        quantization = {e: TorchAoConfig(Int8WeightOnlyConfig()) for e in ("transformer", "transformer_2")}
        pipe = BerniniPipeline.from_pretrained(
            "ByteDance/Bernini-R-Diffusers",
            dtype=torch.bfloat16,
            quantization_config=PipelineQuantizationConfig(quant_mapping=quantization),
        )
        ```

        Args:
            pretrained_model_name_or_path (`str` or `os.PathLike`):
                A diffusers folder or repo id: `ByteDance/Bernini-R-Diffusers`, `ByteDance/Bernini-R-1.3B-Diffusers`,
                a `Wan-AI/Wan2.2-T2V-A14B-Diffusers`-style `model_index.json` folder, a `bernini export` or
                `save_pretrained` folder; or an official config folder (root `config.json` of `model_type:
                bernini_renderer` naming its base in `wan22_base`), whose base supplies the components.
            dtype (`torch.dtype` or `dict[str, torch.dtype]`, *optional*):
                As in diffusers: one dtype, or one per component with `"default"` for the others (`torch_dtype` is
                diffusers' deprecated name). With one dtype the VAE loads in float32, as upstream; a dict is taken as
                given (its `"default"` covers the VAE too).
            high_noise_ckpt (`str` or `os.PathLike`, *optional*):
                A high-noise expert checkpoint that replaces the base's `transformer` weights: an official
                (`ByteDance/Bernini-R`) folder or index, one `.safetensors` or `.gguf` file in any format of
                docs/checkpoints.md (official, Wan, ComfyUI, fp16/bf16, fp8, scaled fp8, GGUF), or a Hub path
                `owner/name[@revision][/folder or file]`. Must come with `low_noise_ckpt`, except on a one-expert
                base (the 1.3B), where it is the only expert. Its expert takes `dtype` and a single-device
                `device_map`; a GGUF file stays quantized; to quantize others, export them first (`bernini export`).
            low_noise_ckpt (`str` or `os.PathLike`, *optional*):
                The low-noise expert's original checkpoint (for `transformer_2`), in the same forms.
            memory_profile (`str`, *optional*):
                A memory profile applied with the load. `"low_ram"`, `"fp8+low_ram"` and `"low_ram+group_offload"` (the
                expert read runs block by block on the device) are chosen here only: host RAM
                then holds one of the text encoder and the experts at a time, each read back from its files when it
                runs (docs/memory.md); the others are applied after the load as `enable_memory_profile` does.
            device (`str` or `torch.device`, *optional*):
                The device of `memory_profile` (CUDA when available, else the CPU).
            revision, cache_dir, local_files_only, token, force_download:
                Resolve a repo id through huggingface_hub, as in diffusers; only the files the layout needs are
                fetched.
            kwargs:
                Every other keyword of [`~diffusers.DiffusionPipeline.from_pretrained`], ready-made components
                (`vae=...`, `transformer=...`) or pipeline settings (`boundary_ratio`, ...).

        Only safetensors are read; a pickle file where weights are expected is an error naming it.
        """
        profile, device = _memory_profile_kwargs(kwargs, memory.get_memory_profile)
        # low_ram reads the experts itself (checkpoints too): prepare_load leaves them unread
        at_load = profile is not None and profile.at_load
        prepared = prepare_load(cls, pretrained_model_name_or_path, kwargs, build_experts=not at_load)
        if not prepared.has_scheduler:
            prepared.kwargs["scheduler"] = default_scheduler()
        if at_load:  # low_ram: what is loaded at all is the profile's to decide
            load = functools.partial(super().from_pretrained, prepared.folder)
            pipe = low_ram.from_pretrained(
                load, prepared, memory.checked_device(device), fp8=profile.fp8,
                group_offload=profile.placement == "group_offload",
            )  # fmt: skip
        else:
            pipe = super().from_pretrained(prepared.folder, **prepared.kwargs)
        finish_load(pipe, prepared, pretrained_model_name_or_path)
        if profile is not None and not profile.at_load:
            pipe.enable_memory_profile(profile.name, device)
        return pipe

    @classmethod
    def from_pretrained_sharded(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        ulysses_degree: int = 1,
        branch_degree: int = 1,
        **kwargs,
    ) -> DiffusionPipeline:
        r"""
        Load Bernini-R with each process reading only its shards of the experts, and enable parallelism with
        `shard_weights=True`: the experts are built on the meta device, sharded with FSDP2 across each data group's
        `ulysses_degree x branch_degree` processes, and each process reads its rows of every tensor from the
        memory-mapped safetensors. Host memory per process is about 1 / (U x B) of an expert instead of a whole one.
        Call it on every process of a `torchrun` launch; the pipeline's parallel state is `pipe.parallel_state`.

        ```py
        # torchrun --nproc-per-node 4 script.py
        pipe = BerniniPipeline.from_pretrained_sharded(
            "ByteDance/Bernini-R-Diffusers", ulysses_degree=2, branch_degree=2, dtype=torch.bfloat16
        )
        pipe.to(pipe.parallel_state.device)  # the text encoder and the VAE; the shards are there already
        ```

        Args:
            pretrained_model_name_or_path (`str` or `os.PathLike`):
                As in [`~BerniniPipeline.from_pretrained`]; the experts are read from its `transformer/` and
                `transformer_2/` folders (diffusers layout) or from `high_noise_ckpt` / `low_noise_ckpt` in any form
                `from_pretrained` takes (official folders, single files of every format of docs/checkpoints.md). A
                GGUF expert is held dequantized, in `dtype`: FSDP2 shards plain tensors, not GGUF's blocks.
            ulysses_degree (`int`, defaults to 1), branch_degree (`int`, defaults to 1):
                As in [`~BerniniPipeline.enable_parallelism`]; their product must be above 1.
            memory_profile (`str`, *optional*):
                `"resident"`, `"expert_offload"` (the idle expert's shards, and the text encoder and the VAE while
                they do not run, on the CPU), `"fp8"` or `"fp8+expert_offload"` (each process stores its shards in
                float8_e4m3fn, half of bf16, and FSDP2 casts them back to the experts' dtype before each block's
                all-gather: the values of the `fp8` profile of a whole load). Without one, call
                `pipe.to(pipe.parallel_state.device)`.
            device (`str` or `torch.device`, *optional*):
                The device of `memory_profile`; this process's (`parallel_state.device`) when not given.
            kwargs:
                The keywords of [`~BerniniPipeline.from_pretrained`] (`dtype`, `high_noise_ckpt`, ...); the
                experts themselves cannot be passed.
        """
        parallel.check_shard_weights(True, ulysses_degree, branch_degree)
        for name in ("transformer", "transformer_2", "quantization_config", "device_map"):
            if kwargs.get(name) is not None:
                raise ValueError(f"`{name}` cannot be given to from_pretrained_sharded: it reads and shards the experts.")
        profile, device = _memory_profile_kwargs(kwargs, memory.check_sharded_profile)
        device = None if device is None else memory.checked_device(device)
        checkpoints = sharded_load.checkpoint_kwargs(kwargs)
        plans = sharded_load.plan_experts(pretrained_model_name_or_path, checkpoints)
        if profile is not None and profile.fp8:
            sharded_load.check_float8_storage(plans, profile.name)
        dtypes = component_dtypes(kwargs.get("dtype", kwargs.get("torch_dtype")))
        experts = {
            name: sharded_load.cast_skeleton(plan, model, dtypes.get(name, dtypes.get("default")))
            for name, (plan, model) in plans.items()
        }
        pipe = cls.from_pretrained(pretrained_model_name_or_path, **kwargs, **experts)
        compute = pipe._shard_weights(ulysses_degree, branch_degree, profile)
        state = pipe.parallel_state
        # Under expert_offload both experts' shards are read to the CPU; only the running one goes to the device.
        load_device = torch.device("cpu") if profile is not None and profile.offloads else state.device
        for name, (plan, _) in plans.items():
            expert = getattr(pipe, name)
            dtype = dtypes.get(name, dtypes.get("default"))
            sharded_load.materialize_shards(plan, expert, state.data_group, load_device, compute[name],
                                            torch_dtype=dtype)  # fmt: skip
            if checkpoints.get(name) is not None:
                expert.register_to_config(_name_or_path=str(checkpoints[name]))
        if profile is not None:
            pipe._apply_sharded_profile(profile, device or state.device)
        return pipe

    @property
    def parallel_state(self) -> ParallelState | None:
        """This process's [`~parallel.ParallelState`] after `enable_parallelism`, else `None`."""
        return self._parallel_state

    @classmethod
    def load_config(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs):
        r"""
        diffusers' `load_config`, except that a local Bernini-R folder reads as a `BerniniPipeline` model index (see
        [`~loading.pipeline_index`]): [`~BerniniPipeline.from_pretrained`] loads every layout through it.
        """
        index = None if kwargs else pipeline_index(pretrained_model_name_or_path, cls)
        return index if index is not None else super().load_config(pretrained_model_name_or_path, **kwargs)

    def save_pretrained(
        self, save_directory: str | os.PathLike, safe_serialization: bool = True, push_to_hub: bool = False, **kwargs
    ) -> None:
        r"""
        Save as diffusers does, plus the modules that let `DiffusionPipeline.from_pretrained(..., trust_remote_code=True)`
        load the folder (`BerniniPipeline.from_pretrained` needs none). Weights are always safetensors.

        `push_to_hub=True` (with `repo_id`, `private`, `commit_message`, `token`, `create_pr`) then uploads the folder
        as diffusers does.
        """
        if not safe_serialization:
            raise ValueError(
                "`safe_serialization`=False is not supported: bernini_diffusers writes and reads safetensors only."
            )
        upload_keys = ("repo_id", "private", "commit_message", "token", "create_pr")
        upload = {k: kwargs.pop(k) for k in upload_keys if k in kwargs}
        super().save_pretrained(save_directory, safe_serialization=True, **kwargs)
        add_remote_code(save_directory)
        if push_to_hub:
            upload_saved(self, save_directory, **upload)
