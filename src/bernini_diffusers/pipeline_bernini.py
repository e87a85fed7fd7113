"""BerniniPipeline: the Bernini-R renderer (every task type and guidance mode) as a diffusers pipeline."""

from __future__ import annotations

import functools
import inspect
import math
import numbers
import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import torch
import torch._dynamo  # pipe.compile: the backends torch.compile knows
import torch._inductor  # pipe.compile: inductor's modes
from diffusers import (
    AutoencoderKLWan,
    DiffusionPipeline,
    UniPCMultistepScheduler,
)
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.loaders import WanLoraLoaderMixin
from diffusers.utils import BaseOutput, logging
from diffusers.utils.torch_utils import get_module_execution_device, randn_tensor
from diffusers.video_processor import VideoProcessor

from . import acceleration, low_ram, media, memory, memory_plan, parallel, sharded_load, windows
from .attention import set_attention_backend
from .constants import (
    DEFAULT_CONTEXT_OVERLAP,
    GUIDANCE_RANGES,
    MAX_BATCH_SIZE,
    MAX_WINDOWED_FRAMES,
    TEMPORAL_FACTOR,
)
from .guidance import GUIDANCE_SPECS, Branch, Combo, Guidance
from .hub_export.remote_code import add_remote_code
from .loading import component_dtypes, finish_load, pipeline_index, prepare_load, upload_saved
from .parallel import ParallelState
from .scheduling import (
    FlowMatchEulerScheduler,
    default_scheduler,
    official_euler_sigmas,
    official_flow_sigmas,
)
from .tasks import (
    DEFAULT_NEGATIVE_PROMPT,
    TASKS,
    GuidanceMode,
    Need,
    TaskSpec,
    TaskType,
    parse_guidance_mode,
    parse_task_type,
)
from .text import (
    MAX_SEQUENCE_LENGTH,
    encode_texts,
    positive_text,
    restore_tokenizer_pipeline,
)
from .transformer_bernini import BerniniTransformer3DModel, assign_source_ids

logger = logging.get_logger(__name__)

OUTPUT_TYPES = ("np", "pil", "pt", "latent")


@dataclass
class BerniniPipelineOutput(BaseOutput):
    r"""
    Output of [`BerniniPipeline`].

    Args:
        frames (`np.ndarray`, `torch.Tensor` or `list[list[PIL.Image.Image]]`):
            The decoded frames, `(batch_size, num_frames, height, width, 3)` for `"np"`, `(batch_size, num_frames, 3,
            height, width)` for `"pt"`, nested PIL lists for `"pil"`; for `"latent"` the final normalised latents
            `(batch_size, 16, latent_frames, height / 8, width / 8)`. `None` on the processes of a parallel run that
            do not write ([`~BerniniPipeline.is_writer`] is `False`): they skip the VAE decode.
        fps (`float`):
            The frame rate the frames were sampled at; `save` writes the video at it.
        output_type (`str`):
            The `output_type` of the call.
    """

    frames: Any
    fps: float = 16
    output_type: str = "np"

    def save(self, path: str | os.PathLike) -> Path:
        """Write the first result: a PNG for one frame, an H.264 MP4 at `fps` otherwise. Returns the path written.

        The file is verified before it replaces `path` (`media.write_output`): on failure `path` holds nothing new and
        a `media.OutputWriteError` (an `OSError`) names the path and the cause.
        """
        if self.output_type == "latent":
            raise ValueError("`save` needs decoded frames; this output holds latents (output_type='latent').")
        if self.frames is None:
            raise ValueError("`save` needs decoded frames; this process does not write (`pipe.is_writer` is False).")
        frames = self.frames[0]
        if self.output_type == "pt":
            frames = frames.permute(0, 2, 3, 1).float().cpu().numpy()  # (T, C, H, W) -> (T, H, W, C)
        return media.write_output(frames, path, self.fps)


class NonFiniteOutputError(RuntimeError):
    r"""
    The denoising loop produced NaN or inf latents: nothing was decoded, nothing is written.

    A `RuntimeError`, not a `ValueError`: every argument passed its checks (non-finite `prompt_embeds`,
    `negative_prompt_embeds` or `latents` are refused up front as a `ValueError`); the run itself went wrong (a LoRA
    with non-finite weights, a guidance setting that overflows the experts' dtype), so the command line exits 1 and a
    batch records the case as failed and goes on.

    Args:
        message (`str`): what went wrong, the step and the likely causes.
        step (`int`): the 0-based index of the first step whose latents were not finite.
    """

    def __init__(self, message: str, step: int):
        super().__init__(message)
        self.step = step


@dataclass
class _Conditions:
    """Clean condition latents of one combo, in sequence order, with their source ids."""

    latents: list[torch.Tensor]
    ids: list[float]

    def key(self) -> tuple:
        return tuple((id(latent), source_id) for latent, source_id in zip(self.latents, self.ids))


def _is_path(value: Any) -> bool:
    return isinstance(value, (str, os.PathLike))


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and np.isfinite(float(value))


def branch_name(branch: Branch) -> str:
    """The cache-context name of a guidance branch: `"cond"` or `"uncond"` for its text, then `_<combo>` for its
    condition streams (`"uncond"`, `"uncond_v"`, `"uncond_vi"`, `"cond_vi"`, `"cond_i"`, ...)."""
    text = "cond" if branch.positive else "uncond"
    return text if branch.combo is Combo.NONE else f"{text}_{branch.combo.value}"


class BerniniPipeline(DiffusionPipeline, WanLoraLoaderMixin):
    r"""
    The Bernini-R renderer: text-to-image, image editing, text-to-video, video editing, reference-to-video,
    reference+video editing and ad insertion with one model, numerically equal to the official renderer.

    diffusers' runtime features work on both experts: LoRA through [`~loaders.WanLoraLoaderMixin.load_lora_weights`]
    (`load_into_transformer_2=True` for the low-noise expert; Wan 2.2 files in diffusers' and the original key
    formats), and caches through `pipe.transformer.enable_cache(...)` / `pipe.transformer_2.enable_cache(...)`: each
    model call runs inside `cache_context(name)` with the name of its guidance branch ([`branch_name`]), so every
    branch and each expert keeps its own cache state.

    Args:
        tokenizer ([`~transformers.T5Tokenizer`]):
            The UMT5 tokenizer; its stored `tokenizer.json` normalizer is kept (transformers 5 would drop it).
        text_encoder ([`~transformers.UMT5EncoderModel`]):
            The UMT5-XXL encoder.
        vae ([`AutoencoderKLWan`]):
            The Wan VAE; it runs in float32.
        scheduler ([`UniPCMultistepScheduler`]):
            UniPC on flow sigmas. `flow_shift` is set per call.
        transformer ([`BerniniTransformer3DModel`], *optional*):
            The high-noise expert (the only one of the 1.3B model). `None` with a `transformer_2` needs
            `boundary_ratio=1.0`: every step then runs on `transformer_2`, as in `WanPipeline`.
        transformer_2 ([`BerniniTransformer3DModel`], *optional*):
            The low-noise expert; `None` for the single-expert 1.3B model.
        boundary_ratio (`float`, *optional*, defaults to 0.875):
            Steps whose integer timestep is `>= boundary_ratio * num_train_timesteps` use `transformer`, the others
            `transformer_2`.
        max_trained_src_id (`int`, defaults to 5):
            The largest source id seen in training.
        interpolate_src_id (`bool`, defaults to `True`):
            Spread the ids of a combo with more sources than `max_trained_src_id` over `[1, max_trained_src_id]`.
        use_unipc (`bool`, defaults to `True`):
            Sample with `scheduler` (UniPC). `False` uses the official fallback instead: flow-matching Euler
            ([`FlowMatchEulerScheduler`]) on the sigmas `linspace(1, 0.003 / 1.002, N)` shifted by `flow_shift`.
        use_src_id_rotary_emb (`bool`, defaults to `True`):
            Add each condition stream's source-id phase to its RoPE. `False` gives every stream id 0 (no phase).
        expand_timesteps (`bool`, defaults to `False`):
            `WanPipeline`'s setting of Wan2.2 TI2V-5B layouts (one timestep per token), accepted so that their
            configs load. It changes no result here: every token of a call, target and conditions alike, shares the
            step's timestep (as in `WanPipeline`'s text-to-video, whose per-token timesteps are all equal), so one
            timestep embedding serves them all.
    """

    model_cpu_offload_seq = "text_encoder->transformer->transformer_2->vae"
    _optional_components = ["transformer", "transformer_2"]
    _callback_tensor_inputs = ["latents", "prompt_embeds", "negative_prompt_embeds"]

    def __init__(
        self,
        tokenizer,
        text_encoder,
        vae: AutoencoderKLWan,
        scheduler: UniPCMultistepScheduler,
        transformer: BerniniTransformer3DModel | None,
        transformer_2: BerniniTransformer3DModel | None = None,
        boundary_ratio: float | None = 0.875,
        max_trained_src_id: int = 5,
        interpolate_src_id: bool = True,
        use_unipc: bool = True,
        use_src_id_rotary_emb: bool = True,
        expand_timesteps: bool = False,
    ):
        super().__init__()
        for name, expert in (("transformer", transformer), ("transformer_2", transformer_2)):
            if expert is not None and not isinstance(expert, BerniniTransformer3DModel):
                raise ValueError(
                    f"`{name}` must be a BerniniTransformer3DModel, got {type(expert).__name__}; load the weights "
                    "with `BerniniTransformer3DModel.from_pretrained(...)` (the checkpoints are Wan-compatible)."
                )
        _check_experts(transformer, transformer_2, boundary_ratio)
        restore_tokenizer_pipeline(tokenizer)
        self.register_modules(
            tokenizer=tokenizer,
            text_encoder=text_encoder,
            vae=vae,
            scheduler=scheduler,
            transformer=transformer,
            transformer_2=transformer_2,
        )
        self.register_to_config(
            boundary_ratio=boundary_ratio,
            max_trained_src_id=max_trained_src_id,
            interpolate_src_id=interpolate_src_id,
            use_unipc=use_unipc,
            use_src_id_rotary_emb=use_src_id_rotary_emb,
            expand_timesteps=expand_timesteps,
        )
        self.vae_scale_factor_temporal = vae.config.scale_factor_temporal if vae is not None else TEMPORAL_FACTOR
        self.vae_scale_factor_spatial = vae.config.scale_factor_spatial if vae is not None else 8
        self.video_processor = VideoProcessor(vae_scale_factor=self.vae_scale_factor_spatial)
        self._parallel_state: ParallelState | None = None  # set by enable_parallelism
        self.set_attention_backend()

    def to(self, *args, **kwargs):
        """diffusers' [`~DiffusionPipeline.to`], except that the `"meta"` device is refused: moving there drops every
        weight (the pipeline could not run again)."""
        device = kwargs.get("device", next((a for a in args if isinstance(a, (str, torch.device))), None))
        check_device(device)
        return super().to(*args, **kwargs)

    def set_attention_backend(self, name: str | None = None) -> str:
        """Choose the experts' attention kernel: `"auto"`, `"sdpa"`, `"fa2"`, `"fa3"` or `"sage"` (SageAttention:
        lossy, CUDA only, used only when named).

        `None` reads `BERNINI_ATTENTION_BACKEND`, else `"auto"` (FA3 on Hopper, else FA2, else SDPA; float32
        experts stay on SDPA). A backend that is chosen but missing raises with its install line. The choice is the
        experts' own: diffusers' process-wide backend, which other models follow, is left as it was.
        """
        choice = None
        for expert in (self.transformer, self.transformer_2):
            if expert is not None:
                choice = set_attention_backend(expert, name)
        return choice

    def load_lora_weights(
        self, pretrained_model_name_or_path_or_dict: str | dict[str, torch.Tensor], adapter_name: str | None = None,
        hotswap: bool = False, **kwargs,
    ) -> None:
        """diffusers' [`~loaders.WanLoraLoaderMixin.load_lora_weights`]: into `transformer`, or into `transformer_2`
        with `load_into_transformer_2=True` (load a Wan 2.2 LoRA's high- and low-noise files with one call each)."""
        if kwargs.get("load_into_transformer_2") and self.transformer_2 is None:
            raise ValueError(
                "`load_into_transformer_2=True` needs a low-noise expert, but this pipeline has `transformer_2=None` "
                "(a single-expert model); load the LoRA without it, into `transformer`."
            )
        # safetensors only; empty, non-finite and matching-nothing LoRAs are refused (acceleration.load_lora)
        acceleration.load_lora(
            self, super().load_lora_weights, pretrained_model_name_or_path_or_dict, adapter_name=adapter_name,
            hotswap=hotswap, **kwargs,
        )  # fmt: skip

    # ------------------------------------------------------------------------------------------------ speed recipes

    def enable_cache_preset(self, name: str, *, calibration: acceleration.MagCacheCalibration | None = None) -> None:
        """Apply a step-cache preset of [`~acceleration.CACHE_PRESETS`] to both experts, each with its own config:
        `"fbc-safe"`, `"fbc-fast"` (FirstBlockCache), `"taylorseer"` or `"magcache"` (with `calibration`, made by
        [`~acceleration.calibrate_magcache`] for the mode you call). It replaces any cache already enabled; it changes
        the output (README, "Step caches").
        """
        acceleration.enable_cache_preset(self, name, calibration=calibration)

    def disable_cache(self) -> None:
        """Remove the step cache of both experts (a preset's or one enabled by hand); the output is the uncached one."""
        acceleration.disable_cache(self)

    def load_turbo_lora(self, high, low, adapter_name: str = "turbo", **kwargs) -> None:
        """Load a Wan 2.2 few-step LoRA pair (Lightning / LightX2V): `high` into `transformer`, `low` into
        `transformer_2`; then call with [`~acceleration.TURBO`]'s settings (4 steps, guidance weights 1). It changes
        the output (README, "Turbo LoRAs"); `unload_lora_weights()` removes it."""
        acceleration.load_turbo_lora(self, high, low, adapter_name=adapter_name, **kwargs)

    def compile(
        self,
        *,
        dynamic: bool | None = True,
        fullgraph: bool = True,
        mode: str | None = None,
        backend: str | Callable = "inductor",
    ) -> None:
        r"""
        Regional `torch.compile` of both experts: diffusers' [`~ModelMixin.compile_repeated_blocks`] compiles each
        expert's transformer blocks (`WanTransformerBlock`) in place; the packing of the streams, their RoPE, the
        embeddings and the output head stay eager. Off until called; the weights and `save_pretrained` are unchanged.

        The blocks of both experts share one compiled graph per input layout: one for a target-only forward (Wan's own
        path, whose RoPE tensors are views) and one for the packed condition + target sequence. With `dynamic=True`
        the sequence length is symbolic, so the 2 to 4 branch lengths of a guidance mode and the sizes of later calls
        reuse those graphs: a 40-step `rv2v` call compiles 2 graphs (1 recompile) and a second call none. Compiled
        outputs equal the eager ones up to the float reordering of the backend (inductor on a CPU: max abs diff
        about 2e-6 on the final latents of a tiny 40-step `rv2v` call).

        ```py
        pipe = BerniniPipeline.from_pretrained("ByteDance/Bernini-R-Diffusers", dtype=torch.bfloat16).to("cuda")
        pipe.compile()  # the first call of each layout compiles; later calls and steps run compiled
        ```

        Args:
            dynamic (`bool`, *optional*, defaults to `True`):
                `torch.compile`'s `dynamic`. `True` compiles shape-generic graphs at once; `None` (torch's default)
                compiles the first shape static and turns the sizes that change dynamic on the first recompile;
                `False` compiles one graph per sequence length (3 instead of 2 for the tiny `rv2v` call).
            fullgraph (`bool`, defaults to `True`):
                Refuse graph breaks: a block compiles to one graph or the call fails. The blocks have none.
            mode (`str`, *optional*):
                `torch.compile`'s mode: `"default"`, `"reduce-overhead"`, `"max-autotune"`, ... (inductor's modes).
            backend (`str` or callable, defaults to `"inductor"`):
                `torch.compile`'s backend (`"eager"` traces without code generation, bit-identical to eager).

        Raises:
            ValueError: for an unknown `backend` or `mode`, a non-bool `fullgraph` or `dynamic`, `fullgraph=True`
                while a step cache (`enable_cache`) is on (its hooks break the graph: use `fullgraph=False`), or a
                second call with other settings than the first (a second call with the same settings does nothing).
        """
        settings = {"dynamic": dynamic, "fullgraph": fullgraph, "mode": mode, "backend": backend}
        if dynamic is not None and not isinstance(dynamic, bool):
            raise ValueError(f"`dynamic`={dynamic!r} must be True, False or None.")
        if not isinstance(fullgraph, bool):
            raise ValueError(f"`fullgraph`={fullgraph!r} must be True or False.")
        if isinstance(backend, str):
            backends = torch._dynamo.list_backends(exclude_tags=())
            if backend not in backends:
                raise ValueError(f"`backend`={backend!r} is not a torch.compile backend; one of {', '.join(backends)}.")
        elif not callable(backend):
            raise ValueError(f"`backend`={backend!r} must be a backend name or a callable.")
        if mode is not None:
            modes = list(torch._inductor.list_mode_options())
            if mode not in modes:
                raise ValueError(f"`mode`={mode!r} is not a torch.compile mode; one of {', '.join(modes)} or None.")
        experts = [e for e in (self.transformer, self.transformer_2) if e is not None]
        if not experts:
            raise ValueError("This pipeline has no expert (`transformer` and `transformer_2` are None) to compile.")
        memory.check_compile(self)  # group offload / fp8 hooks inside the blocks cannot be traced
        cached = [e for e in experts if e.is_cache_enabled]
        if fullgraph and cached:
            # diffusers' cache hooks wrap the blocks' forward, and their decisions are `torch.compiler.disable`d
            raise ValueError(
                f"`fullgraph`=True, but a step cache ({type(cached[0]._cache_config).__name__}) is enabled on the "
                "experts: its hooks on the blocks break the graph. Call `compile(fullgraph=False)`, or `disable_cache()` "
                "on the experts first."
            )
        compiled = getattr(self, "_compile_settings", None)
        if compiled is not None:
            if compiled == settings:
                return
            raise ValueError(
                f"The experts are already compiled with {compiled}; a second `compile` with {settings} would stack a "
                "second compilation. Load the pipeline again to compile with other settings."
            )
        for expert in experts:
            expert.compile_repeated_blocks(**settings)
        self._compile_settings = settings

    def enable_memory_profile(
        self, name: str, device: str | torch.device | None = None, *, vae_tiling: bool = False
    ) -> memory.MemoryProfile:
        r"""
        Place the weights by a named recipe of diffusers' memory mechanisms. Call it once, after loading and instead
        of `pipe.to(device)`.

        | name | what it does | output vs `resident` |
        |---|---|---|
        | `"resident"` | every component on the device (`pipe.to(device)`) | - |
        | `"expert_offload"` | diffusers' model offload: one component on the device at a time, so one expert per step | identical |
        | `"group_offload"` | diffusers' group offload: the experts one block at a time (the next block prefetched on a CUDA stream), the text encoder and the VAE on the device only while they run | identical |
        | `"fp8"` | both experts stored in float8_e4m3fn and cast back to their dtype layer by layer (diffusers' layerwise casting); patch embeddings, condition embedder, norms, modulation tables and `proj_out` stay in full precision | changed (weights rounded) |
        | `"fp8+expert_offload"`, `"fp8+group_offload"` | fp8 storage with that placement | as `"fp8"` |

        ```py
        pipe = BerniniPipeline.from_pretrained("ByteDance/Bernini-R-Diffusers", dtype=torch.bfloat16)
        pipe.enable_memory_profile("fp8+expert_offload", vae_tiling=True)
        ```

        Applying the same profile again only turns VAE tiling on if asked; another profile, or a profile on a
        pipeline with offload or layerwise casting applied by hand, is a `ValueError` (diffusers' hooks cannot be
        swapped in place: load the pipeline again).

        Args:
            name (`str`):
                One of `"resident"`, `"expert_offload"`, `"group_offload"`, `"fp8"`, `"fp8+expert_offload"`,
                `"fp8+group_offload"`.
            device (`str` or `torch.device`, *optional*):
                Where the computation runs; CUDA when available, else the CPU. On the CPU the offload profiles run
                but save nothing.
            vae_tiling (`bool`, defaults to `False`):
                Decode (and encode) with the VAE's spatial tiling, for 720p and larger; it changes the decoded pixels
                slightly, so it is off unless asked.

        Returns:
            `MemoryProfile`: the profile applied (`name`, `placement`, `fp8`, `description`).
        """
        if any(parallel.is_sharded(e) for e in (self.transformer, self.transformer_2) if e is not None):
            if name != "resident":
                raise ValueError(
                    f"`name`={name!r}: the experts are sharded (`shard_weights=True`), and FSDP2 places the shards; "
                    "only 'resident' applies to a sharded pipeline."
                )
        return memory.apply_memory_profile(self, name, device, vae_tiling=vae_tiling)

    @classmethod
    def estimate_memory(
        cls,
        model: str | os.PathLike = "A14B",
        memory_profile: str = "resident",
        checkpoint_format: str | None = None,
        *,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        shard_degree: int = 1,
        gpu_memory: float | None = None,
        ram: float | None = None,
        media_sizes: dict[str, tuple[int, int]] | None = None,
        **call_kwargs,
    ) -> memory_plan.MemoryPlan:
        r"""
        The peak GPU memory and peak host RAM of a call, and whether they fit, without loading any weight: computed
        from the model's configs and the call's real shapes (see [`~memory_plan.estimate_memory`] and
        docs/memory.md).

        ```py
        plan = BerniniPipeline.estimate_memory("A14B", "low_ram", "fp8", task_type="t2v", height=480, width=848)
        print(plan)  # peak GPU memory: ... fits / does NOT fit
        ```

        Args:
            model (`str` or `os.PathLike`, defaults to `"A14B"`):
                `"A14B"`, `"1.3B"`, a local model folder (its config.json files), or a released repo id.
            memory_profile (`str`, defaults to `"resident"`):
                A memory profile name, `low_ram` included.
            checkpoint_format (`str`, *optional*):
                The experts' weights: `fp32`, `bf16`, `fp16`, `fp8`, `Q8_0`, `Q6_K`, `Q5_K`, `Q4_K`, `Q4_0`; defaults
                to the dtype's.
            device (`str` or `torch.device`, *optional*):
                Where the call computes; CUDA when available, else the CPU (then every byte is host RAM).
            dtype (`torch.dtype`, *optional*):
                The compute dtype; bf16 on an accelerator, fp32 on the CPU, as `bernini generate` defaults.
            shard_degree (`int`, defaults to 1):
                FSDP ranks sharing each expert's weights.
            gpu_memory, ram (`float`, *optional*):
                The memory available in GB; detected (`torch.cuda.mem_get_info`, `psutil`) when not given.
            media_sizes (`dict`, *optional*):
                (width, height) of the call's input media, as [`~BerniniPipeline.estimate_tokens`] takes them.
            call_kwargs:
                The call's arguments (`task_type`, `num_frames`, `height`, `width`, `max_image_size`, `prompt`, ...).

        Returns:
            [`~memory_plan.MemoryPlan`]: `gpu_bytes`, `ram_bytes`, `fits_gpu`, `fits_ram`, `parts`; `str()` prints it.
        """
        device = memory.default_device() if device is None else device
        try:
            device = torch.device(device)
        except (RuntimeError, TypeError):
            raise ValueError(f"`device`={device!r} is not a torch device; use cpu, cuda, cuda:N.") from None
        if dtype is None:
            dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
        if checkpoint_format is None:
            checkpoint_format = {torch.float32: "fp32", torch.float16: "fp16"}.get(dtype, "bf16")
        tokens, grid = cls.estimate_tokens(media_sizes, **call_kwargs)
        prompt, per_prompt = call_kwargs.get("prompt"), call_kwargs.get("num_videos_per_prompt", 1)
        batch = (len(prompt) if isinstance(prompt, (list, tuple)) else 1) * per_prompt
        latent_grid = (grid[0], 2 * grid[1], 2 * grid[2])  # the widest stream, in latent pixels (patch 2x2)
        return memory_plan.estimate_memory(
            model, tokens=tokens, latent_grid=latent_grid, batch=batch, memory_profile=memory_profile,
            checkpoint_format=checkpoint_format, dtype=dtype, device=device, shard_degree=shard_degree,
            gpu_memory=gpu_memory, ram=ram,
        )

    # ------------------------------------------------------------------------------------------------ parallelism

    def enable_parallelism(
        self, ulysses_degree: int = 1, branch_degree: int = 1, shard_weights: bool = False
    ) -> ParallelState:
        r"""
        Run this pipeline across the processes of a `torchrun` launch: Ulysses sequence parallelism, branch
        parallelism, and data parallelism over case lists with the processes left over.

        Call it on every process, after loading and before the first call; every process then makes the same calls
        with the same arguments and seed, and only the one whose [`~BerniniPipeline.is_writer`] is `True` decodes and
        writes (the others return `frames=None` unless `output_type="latent"`).
        The default process group is initialised from torchrun's environment if the script has not done so (NCCL for
        CUDA tensors on the local rank's device, gloo for CPU ones); xfuser builds the groups where it is installed,
        plain `torch.distributed` groups with yunchang's Ulysses groups otherwise. Calling it again switches degrees.

        ```py
        # torchrun --nproc-per-node 8 script.py
        pipe = BerniniPipeline.from_pretrained("ByteDance/Bernini-R-Diffusers", dtype=torch.bfloat16)
        state = pipe.enable_parallelism(ulysses_degree=4, branch_degree=2)
        pipe.to(state.device)
        out = pipe("turn the car red", task_type="v2v", video="car.mp4", generator=torch.Generator().manual_seed(42))
        if pipe.is_writer:
            out.save("red.mp4")
        ```

        Args:
            ulysses_degree (`int`, defaults to 1):
                Processes that split each forward's token sequence (consecutive ranks). It must divide the experts'
                attention heads: 40 for the 14B experts (1, 2, 4, 5, 8, 10, 20, 40), 12 for the 1.3B model (1, 2, 3,
                4, 6, 12).
            branch_degree (`int`, defaults to 1):
                Groups of `ulysses_degree` processes that compute a step's guidance branches at the same time (2 to 4
                distinct forwards per step, dealt round-robin); the outputs are exchanged and combined as in one
                process.
            shard_weights (`bool`, defaults to `False`):
                Shard every block of both experts, and their other weights, with torch's FSDP2 across the
                `ulysses_degree x branch_degree` processes of each data group (needs that product above 1): each
                process keeps 1 / (U x B) of each expert, on `state.device`, and all-gathers a block just before it
                runs. The sharding stays for the pipeline's life: load it again to change the layout; every process
                of a data group must keep making the same calls (docs/parallel.md).

        Returns:
            [`~parallel.ParallelState`]: this process's ranks (`data_rank`, `branch_rank`, `ulysses_rank`), degrees
            (`data_degree` = processes / (`ulysses_degree` x `branch_degree`)), `device`, `is_writer`, and
            `assign_cases(cases)` for this process's share of a case list.
        """
        self._parallel_state = parallel.enable_parallelism(
            self, ulysses_degree=ulysses_degree, branch_degree=branch_degree, shard_weights=shard_weights
        )
        return self._parallel_state

    def disable_parallelism(self) -> None:
        """Undo [`~BerniniPipeline.enable_parallelism`]: every process runs whole calls on its own again."""
        if self._parallel_state is not None:
            parallel.disable_parallelism(self)
        self._parallel_state = None

    @property
    def is_writer(self) -> bool:
        """Whether this process writes results: always in a single process; under
        [`~BerniniPipeline.enable_parallelism`], only the first process of each data group (Ulysses rank 0 of branch
        group 0), so that each result is written once."""
        return self._parallel_state is None or self._parallel_state.is_writer

    # ------------------------------------------------------------------------------------------------ loading

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs) -> BerniniPipeline:
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
                A memory profile applied with the load. `"low_ram"` and `"fp8+low_ram"` are chosen here only: host RAM
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
        profile, device = kwargs.pop("memory_profile", None), kwargs.pop("device", None)
        profile = None if profile is None else memory.get_memory_profile(profile)
        if device is not None and profile is None:
            raise ValueError(f"`device`={device!r} goes with `memory_profile`; without one, call `pipe.to(device)`.")
        prepared = prepare_load(cls, pretrained_model_name_or_path, kwargs)
        if not prepared.has_scheduler:
            prepared.kwargs["scheduler"] = default_scheduler()
        if profile is not None and profile.at_load:  # low_ram: what is loaded at all is the profile's to decide
            load = functools.partial(super().from_pretrained, prepared.folder)
            pipe = low_ram.from_pretrained(load, prepared, memory.checked_device(device), fp8=profile.fp8)
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
    ) -> BerniniPipeline:
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
                `transformer_2/` folders (diffusers layout) or from `high_noise_ckpt` / `low_noise_ckpt`.
            ulysses_degree (`int`, defaults to 1), branch_degree (`int`, defaults to 1):
                As in [`~BerniniPipeline.enable_parallelism`]; their product must be above 1.
            kwargs:
                The keywords of [`~BerniniPipeline.from_pretrained`] (`dtype`, `high_noise_ckpt`, ...); the
                experts themselves cannot be passed.
        """
        parallel.check_shard_weights(True, ulysses_degree, branch_degree)
        for name in ("transformer", "transformer_2", "quantization_config", "device_map"):
            if kwargs.get(name) is not None:
                raise ValueError(f"`{name}` cannot be given to from_pretrained_sharded: it reads and shards the experts.")
        checkpoints = sharded_load.checkpoint_kwargs(kwargs)
        plans = sharded_load.plan_experts(pretrained_model_name_or_path, checkpoints)
        dtypes = component_dtypes(kwargs.get("dtype", kwargs.get("torch_dtype")))
        experts = {
            name: sharded_load.cast_skeleton(plan, model, dtypes.get(name, dtypes.get("default")))
            for name, (plan, model) in plans.items()
        }
        pipe = cls.from_pretrained(pretrained_model_name_or_path, **kwargs, **experts)
        state = pipe.enable_parallelism(ulysses_degree, branch_degree, shard_weights=True)
        for name, (plan, _) in plans.items():
            expert = getattr(pipe, name)
            sharded_load.materialize_shards(plan, expert, state.data_group, state.device)
            if checkpoints.get(name) is not None:
                expert.register_to_config(_name_or_path=str(checkpoints[name]))
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

    # ------------------------------------------------------------------------------------------------ inputs

    @classmethod
    def check_inputs(
        cls,
        spec: TaskSpec,
        prompt,
        negative_prompt,
        system_prompt,
        videos: list,
        image,
        images,
        num_frames,
        height,
        width,
        max_image_size,
        fps,
        num_inference_steps,
        flow_shift,
        scalars: dict[str, Any],
        norm_threshold,
        generator,
        latents,
        output_type,
        callback_on_step_end_tensor_inputs,
        limits: tuple[int, int, int] = (1024, 4, 8),
        prompt_embeds=None,
        negative_prompt_embeds=None,
        num_videos_per_prompt=1,
        guidance_scale=None,
        max_sequence_length=MAX_SEQUENCE_LENGTH,
        context_frames=None,
        context_overlap=DEFAULT_CONTEXT_OVERLAP,
        attention_kwargs=None,
        callback_on_step_end=None,
    ):
        """Validate every argument before any model work; each error names the argument, the value and what is allowed.

        `limits` is (the experts' `rope_max_seq_len`, the VAE's temporal and spatial factors); the defaults are the
        released models'.
        """
        task = spec.task.value
        num_prompts = cls._check_text(
            prompt, negative_prompt, system_prompt, prompt_embeds, negative_prompt_embeds, scalars, guidance_scale
        )

        def need(name: str, rule: Need, given: bool, takes: str):
            if rule is Need.NO and given:
                raise ValueError(f"`{name}` is not accepted by task_type={task!r}; {takes}.")
            if rule is Need.REQUIRED and not given:
                raise ValueError(f"task_type={task!r} requires `{name}`; {takes}.")

        takes = _describe_inputs(spec)
        need("video", spec.video, bool(videos), takes)
        need("image", spec.image, image is not None, takes)
        if images is not None and not isinstance(images, (list, tuple)):
            raise ValueError(f"`images` must be a list of paths or PIL images, got {type(images).__name__}.")
        need("images", spec.images, bool(images), takes)
        low, high = spec.num_videos
        if videos and not low <= len(videos) <= high:
            expected = f"{low}" if low == high else f"{low} to {high}"
            raise ValueError(f"task_type={task!r} takes {expected} video(s) in `video`, got {len(videos)}.")

        def integer(name: str, value, minimum: int, maximum: int | None = None):
            if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < minimum or (
                maximum is not None and value > maximum
            ):
                bound = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
                raise ValueError(f"`{name}`={_short(value)} must be an integer {bound}.")

        # The experts' RoPE table bounds only the sizes a call uses: image tasks make one frame whatever
        # `num_frames` says, and a source video or image sets the output size instead of `height`/`width`.
        rope_len, temporal, _ = limits
        window_cap = (rope_len - 1) * temporal + 1
        windows.check_context(context_frames, context_overlap, window_cap)
        # With context windows the clip is no longer one sequence: the RoPE table bounds each window, and the clip is
        # bounded by MAX_WINDOWED_FRAMES. A windowed source video is taken whole, so `num_frames` bounds nothing then
        # (the source's own length is checked when it is read).
        frames_cap = window_cap if context_frames is None else MAX_WINDOWED_FRAMES
        unused = spec.is_image or (context_frames is not None and bool(videos))
        integer("num_frames", num_frames, 1, None if unused else frames_cap)
        max_pixels = None if videos or image is not None else _max_pixels(limits)
        integer("height", height, 16, max_pixels)
        integer("width", width, 16, max_pixels)
        # A cap on the media's long side, not a size: above what the experts hold it is clamped (see `__call__`).
        integer("max_image_size", max_image_size, 16)
        integer("num_inference_steps", num_inference_steps, 1, 1000)
        integer("num_videos_per_prompt", num_videos_per_prompt, 1, MAX_BATCH_SIZE)
        integer("max_sequence_length", max_sequence_length, 1, MAX_SEQUENCE_LENGTH)
        media.check_fps(fps)  # the range the writer and the frame sampling accept, so no output is lost to it
        _check_range("flow_shift", flow_shift)
        for name, value in scalars.items():
            _check_range(name, value)
        thresholds = [norm_threshold] if not isinstance(norm_threshold, (list, tuple)) else list(norm_threshold)
        if not thresholds:
            raise ValueError("`norm_threshold`=[] must be a number or a non-empty list of them (0 disables).")
        for value in thresholds:
            _check_range("norm_threshold", value, ", or a list of them (0 disables)")
        batch_size = num_prompts * num_videos_per_prompt
        if batch_size > MAX_BATCH_SIZE:
            raise ValueError(
                f"`num_videos_per_prompt`={num_videos_per_prompt} with {num_prompts} prompt(s) makes a batch of "
                f"{batch_size} videos; one call renders at most {MAX_BATCH_SIZE}: split the prompts over several calls."
            )
        generators = generator if isinstance(generator, (list, tuple)) else [generator]
        if isinstance(generator, (list, tuple)) and len(generator) != batch_size:
            raise ValueError(
                f"`generator` is a list of {len(generator)} generators; it must hold one per video: {num_prompts} "
                f"prompt(s) x num_videos_per_prompt={num_videos_per_prompt} = {batch_size}."
            )
        for i, g in enumerate(generators):
            where = f"`generator[{i}]`" if isinstance(generator, (list, tuple)) else "`generator`"
            if isinstance(generator, (list, tuple)) and not isinstance(g, torch.Generator):
                # `randn_tensor` would fail mid-call on a None in a list: each video needs its own generator.
                raise ValueError(
                    f"{where} is {type(g).__name__}; a list of generators must hold one torch.Generator per video "
                    "(or pass one generator, or None, for the whole batch)."
                )
            if g is not None and not isinstance(g, torch.Generator):
                raise ValueError(
                    f"`generator` must be a torch.Generator, a list of them (one per video) or None, got "
                    f"{type(g).__name__}."
                )
            if g is not None and g.device.type != "cpu":
                raise ValueError(
                    f"`generator` must be a CPU torch.Generator (the official noise is drawn on the CPU), got one on "
                    f"{g.device}."
                )
        if latents is not None and not isinstance(latents, torch.Tensor):
            raise ValueError(f"`latents` must be a torch.Tensor or None, got {type(latents).__name__}.")
        for name, tensor in (
            ("prompt_embeds", prompt_embeds), ("negative_prompt_embeds", negative_prompt_embeds), ("latents", latents)
        ):
            # One host sync per given tensor, before any model work: a NaN given here would only surface as a
            # non-finite result after the whole denoising loop.
            if tensor is not None and tensor.is_floating_point() and not torch.isfinite(tensor).all():
                raise ValueError(f"`{name}` holds non-finite values (NaN or inf); pass finite values.")
        if attention_kwargs is not None and not isinstance(attention_kwargs, dict):
            raise ValueError(f"`attention_kwargs` must be a dict or None, got {_describe(attention_kwargs)}.")
        if callback_on_step_end is not None and not callable(callback_on_step_end):
            raise ValueError(
                f"`callback_on_step_end` must be callable (pipe, step, timestep, callback_kwargs) -> dict, or None, "
                f"got {_describe(callback_on_step_end)}."
            )
        if output_type not in OUTPUT_TYPES:
            choices = ", ".join(OUTPUT_TYPES)
            raise ValueError(f"`output_type`={_short(output_type)} is not supported; choose one of: {choices}.")
        unknown = [k for k in callback_on_step_end_tensor_inputs or [] if k not in cls._callback_tensor_inputs]
        if unknown:
            raise ValueError(
                f"`callback_on_step_end_tensor_inputs` has {unknown}; allowed: {cls._callback_tensor_inputs}."
            )

    @classmethod
    def _check_text(
        cls, prompt, negative_prompt, system_prompt, prompt_embeds, negative_prompt_embeds, scalars, guidance_scale
    ) -> int:
        """Check the text arguments and return the number of prompts (rows of `prompt_embeds` when given)."""
        if prompt is not None and prompt_embeds is not None:
            raise ValueError("Pass either `prompt` or `prompt_embeds`, not both: the embeddings replace the text.")
        if negative_prompt is not None and negative_prompt_embeds is not None:
            raise ValueError(
                "Pass either `negative_prompt` or `negative_prompt_embeds`, not both: the embeddings replace the text."
            )
        if prompt_embeds is not None:
            if not isinstance(prompt_embeds, torch.Tensor) or prompt_embeds.ndim != 3 or not len(prompt_embeds):
                raise ValueError(
                    "`prompt_embeds` must be a tensor (num_prompts, sequence_length, text_dim), got "
                    f"{_describe(prompt_embeds)}."
                )
            num_prompts = prompt_embeds.shape[0]
        elif isinstance(prompt, str):
            num_prompts = 1
        elif isinstance(prompt, (list, tuple)) and prompt and all(isinstance(p, str) for p in prompt):
            num_prompts = len(prompt)
        else:
            raise ValueError(
                f"`prompt` must be a string or a non-empty list of strings (or pass `prompt_embeds`), got "
                f"{_describe(prompt)}."
            )
        if isinstance(negative_prompt, (list, tuple)):
            if len(negative_prompt) != num_prompts or not all(isinstance(n, str) for n in negative_prompt):
                raise ValueError(
                    f"`negative_prompt` as a list must hold one string per prompt ({num_prompts}), got "
                    f"{_describe(negative_prompt)}."
                )
        elif negative_prompt is not None and not isinstance(negative_prompt, str):
            raise ValueError(
                f"`negative_prompt` must be a string, a list of strings (one per prompt) or None, got "
                f"{type(negative_prompt).__name__}."
            )
        if negative_prompt_embeds is not None and (
            not isinstance(negative_prompt_embeds, torch.Tensor)
            or negative_prompt_embeds.ndim != 3
            or negative_prompt_embeds.shape[0] != num_prompts
        ):
            raise ValueError(
                f"`negative_prompt_embeds` must be a tensor (num_prompts, sequence_length, text_dim) with one row per "
                f"prompt ({num_prompts}), got {_describe(negative_prompt_embeds)}."
            )
        if system_prompt is not None and not isinstance(system_prompt, str):
            raise ValueError(f"`system_prompt` must be a string or None, got {type(system_prompt).__name__}.")
        if guidance_scale is not None:
            _check_range("guidance_scale", guidance_scale, " or None")
            omega_txt, default = scalars["omega_txt"], inspect.signature(cls.__call__).parameters["omega_txt"].default
            if omega_txt != default and omega_txt != guidance_scale:
                raise ValueError(
                    f"`guidance_scale`={guidance_scale!r} and `omega_txt`={omega_txt!r} disagree: `guidance_scale` is "
                    "diffusers' name of the text weight `omega_txt`; pass one of them."
                )
        return num_prompts

    @classmethod
    def validate_call(cls, **kwargs) -> None:
        """Check the arguments of a call without a loaded model: the same errors `__call__` raises before any model
        work (unknown task or mode, wrong media, values out of range), plus missing or unreadable media files (each
        video's container and first frame, each image decoded: `media.probe_video`, `media.probe_image`) and, with
        context windows, a source longer than `MAX_WINDOWED_FRAMES` (`media.check_video_length`). For front ends
        that want to fail before loading 30 GB of weights.
        """
        bound = inspect.signature(cls.__call__).bind(None, **kwargs)
        bound.apply_defaults()
        args = bound.arguments
        _, _, videos = cls._check_call(args)
        named = [("video" if len(videos) == 1 else f"video[{i}]", v) for i, v in enumerate(videos)]
        named += [("image", args["image"])] + [(f"images[{i}]", v) for i, v in enumerate(args["images"] or [])]
        for name, value in named:
            if _is_path(value):
                probe = media.probe_video if name.startswith("video") else media.probe_image
                probe(value, name)
        if videos and args["context_frames"] is not None:
            # A windowed source is taken whole: one too long for MAX_WINDOWED_FRAMES is refused now, not after loading.
            media.check_video_length(videos[0], args["fps"], None, MAX_WINDOWED_FRAMES, argument=named[0][0])

    @classmethod
    def estimate_tokens(cls, media_sizes: dict[str, tuple[int, int]] | None = None, **kwargs) -> tuple[int, tuple]:
        """The transformer sequence length of a call's longest guidance branch, without a model or the media.

        Each stream (target, every condition of the branch's combo) counts `T_lat x H/16 x W/16` tokens, a reference
        image one latent frame. `media_sizes` maps an input name (`video`, `video[1]`, `image`, `images[0]`) to its
        (width, height); an input without one is bounded by a `max_image_size` square and a source video by
        `num_frames` (with context windows, by `context_frames`: one forward sees one window), so the estimate is an
        upper bound. Returns (tokens, the largest (T_lat, H/16, W/16) grid of
        any stream) for the rope-table check. The arguments are assumed valid (`validate_call`).
        """
        bound = inspect.signature(cls.__call__).bind(None, **kwargs)
        bound.apply_defaults()
        args = bound.arguments
        spec, mode, videos, _ = _resolve_call(args)
        sizes, cap, stride = media_sizes or {}, args["max_image_size"], 16  # VAE 8 x patch 2

        def size(name: str) -> tuple[int, int]:
            if name in sizes:
                return media.target_size(*sizes[name], cap)
            return media.make_divisible(cap), media.make_divisible(cap)

        frames = 1 if spec.is_image else args["num_frames"] // TEMPORAL_FACTOR * TEMPORAL_FACTOR + 1
        if args["context_frames"] is not None and not spec.is_image:
            # One forward sees one window; a windowed source is not cut at `num_frames`, so bound it by the window.
            frames = args["context_frames"] if videos else min(frames, args["context_frames"])
        video_names = ["video" if len(videos) == 1 else f"video[{i}]" for i in range(len(videos))]
        video_grids = [((frames - 1) // TEMPORAL_FACTOR + 1, h // stride, w // stride) for w, h in map(size, video_names)]
        image_grid = [(1, h // stride, w // stride) for w, h in [size("image")]] if args["image"] is not None else []
        reference_grids = [
            (1, h // stride, w // stride) for w, h in (size(f"images[{i}]") for i in range(len(args["images"] or [])))
        ]
        if video_grids:
            target = video_grids[0]
        elif image_grid:
            target = image_grid[0]
        else:
            height, width = media.make_divisible(args["height"]), media.make_divisible(args["width"])
            target = ((frames - 1) // TEMPORAL_FACTOR + 1, height // stride, width // stride)
        if spec.is_image:
            target = (1, *target[1:])
        combos = {
            Combo.NONE: [],
            Combo.V: video_grids[:1],
            Combo.I: reference_grids,
            Combo.VI: [*video_grids, *image_grid, *reference_grids],
        }
        used = [[target, *combos[branch.combo]] for branch in GUIDANCE_SPECS[mode].branches]
        tokens = max(sum(t * h * w for t, h, w in streams) for streams in used)
        grids = [grid for streams in used for grid in streams]
        return tokens, tuple(max(grid[axis] for grid in grids) for axis in range(3))

    @classmethod
    def _check_call(
        cls, args: dict[str, Any], limits: tuple[int, int, int] = (1024, 4, 8)
    ) -> tuple[TaskSpec, GuidanceMode, list]:
        """Resolve the task, the guidance mode and the videos of a call's arguments, then `check_inputs` them."""
        spec, mode, videos, scalars = _resolve_call(args)
        cls.check_inputs(
            spec, args["prompt"], args["negative_prompt"], args["system_prompt"], videos, args["image"],
            args["images"], args["num_frames"], args["height"], args["width"], args["max_image_size"], args["fps"],
            args["num_inference_steps"], args["flow_shift"], scalars, args["norm_threshold"], args["generator"],
            args["latents"], args["output_type"], args["callback_on_step_end_tensor_inputs"], limits=limits,
            prompt_embeds=args["prompt_embeds"], negative_prompt_embeds=args["negative_prompt_embeds"],
            num_videos_per_prompt=args["num_videos_per_prompt"], guidance_scale=args["guidance_scale"],
            max_sequence_length=args["max_sequence_length"], context_frames=args["context_frames"],
            context_overlap=args["context_overlap"], attention_kwargs=args["attention_kwargs"],
            callback_on_step_end=args["callback_on_step_end"],
        )
        return spec, mode, videos

    def load_media(
        self, videos: list, image, images, max_image_size: int, fps: float, num_frames: int, windowed: bool = False
    ) -> tuple[list[torch.Tensor], torch.Tensor | None, list[torch.Tensor]]:
        """Read, sample and resize every input as upstream does: pixel tensors `[3, T, H, W]` in [-1, 1].

        `windowed` (context windows on): the first video is taken whole, up to `MAX_WINDOWED_FRAMES`, instead of its
        first `num_frames`, and the other videos are cut at its length (no window reaches past the output's end).
        """
        video_pixels = []
        for i, v in enumerate(videos):
            argument = "video" if len(videos) == 1 else f"video[{i}]"
            if not windowed:
                video_pixels.append(media.load_video(v, max_image_size, fps, num_frames, argument=argument))
            elif i == 0:
                video_pixels.append(
                    media.load_video(v, max_image_size, fps, None, argument=argument, max_frames=MAX_WINDOWED_FRAMES)
                )
            else:
                video_pixels.append(
                    media.load_video(v, max_image_size, fps, video_pixels[0].shape[1], argument=argument)
                )
        image_pixels = None if image is None else media.load_image(image, max_image_size, argument="image")
        reference_pixels = [
            media.load_image(img, max_image_size, argument=f"images[{i}]") for i, img in enumerate(images or [])
        ]
        return video_pixels, image_pixels, reference_pixels

    def output_geometry(
        self, spec: TaskSpec, video_pixels, image_pixels, num_frames: int, height: int, width: int
    ) -> tuple[int, int, int]:
        """(frames, height, width): the first video's, else the source image's, else the arguments'
        (docs/design.md#output-geometry)."""
        frames = num_frames
        if video_pixels:
            frames, height, width = video_pixels[0].shape[1:]
        elif image_pixels is not None:
            height, width = image_pixels.shape[2:]
        if spec.is_image:
            frames = 1
        # Upstream's 4k+1 rule rounds 80 up to 81 (and 81 stays 81): `n // 4 * 4 + 1`.
        frames = frames // self.vae_scale_factor_temporal * self.vae_scale_factor_temporal + 1
        return frames, media.make_divisible(height), media.make_divisible(width)

    # ------------------------------------------------------------------------------------------------ encoders

    def encode_prompt(
        self,
        prompt: str | list[str] | None,
        negative_prompt: str | list[str] | None = None,
        do_classifier_free_guidance: bool = True,
        num_videos_per_prompt: int = 1,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        max_sequence_length: int = MAX_SEQUENCE_LENGTH,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
        task_type: str | TaskType | None = "t2v",
        system_prompt: str | None = None,
    ):
        r"""
        Encode the positive and negative texts with UMT5, as `__call__` does; the embeddings can be passed to
        `__call__` as `prompt_embeds` and `negative_prompt_embeds`, which then equals the call with the texts.

        The task's system prefix belongs to the positive text: `task_type` (or `system_prompt`) prepends it to each
        cleaned prompt here, so encode with the `task_type` (and `system_prompt`) of the call the embeddings are for.
        `__call__` takes precomputed embeddings as given. The negative text is encoded raw (no prefix, no cleaning).
        Each distinct text is encoded on its own, so a batch's rows equal the single texts' embeddings exactly.

        Args:
            prompt (`str` or `list[str]`, *optional*):
                The prompt(s); `None` when `prompt_embeds` is given.
            negative_prompt (`str` or `list[str]`, *optional*):
                The negative text, one for all prompts or one per prompt. `None` uses the default Wan negative prompt.
            do_classifier_free_guidance (`bool`, defaults to `True`):
                Also encode the negative text. Every guidance mode of the renderer uses it; `False` returns `None` in
                its place.
            num_videos_per_prompt (`int`, defaults to 1):
                Repeat each prompt's row this many times (consecutively), as the batch of `__call__` does.
            prompt_embeds (`torch.Tensor`, *optional*):
                Precomputed positive embeddings `(num_prompts, sequence_length, text_dim)`, used as given.
            negative_prompt_embeds (`torch.Tensor`, *optional*):
                Precomputed negative embeddings, one row per prompt, used as given.
            max_sequence_length (`int`, defaults to 512):
                Tokens per text; the rows past a text's length are zero. The renderer uses 512.
            device (`torch.device`, *optional*):
                Where the embeddings go; defaults to the pipeline's execution device.
            dtype (`torch.dtype`, *optional*):
                Their dtype; defaults to the experts' (the text encoder's when the pipeline has no expert).
            task_type (`str` or `TaskType`, *optional*, defaults to `"t2v"`):
                The task whose system prefix is prepended to each cleaned prompt. `None` encodes `prompt` exactly as
                given (no prefix, no cleaning).
            system_prompt (`str`, *optional*):
                A prefix to use instead of the task's (with a `task_type`).

        Returns:
            `tuple[torch.Tensor, torch.Tensor | None]`: `prompt_embeds` and `negative_prompt_embeds`, each
            `(num_prompts * num_videos_per_prompt, max_sequence_length, text_dim)`.
        """
        legacy = isinstance(do_classifier_free_guidance, (torch.device, str))
        if legacy or isinstance(num_videos_per_prompt, torch.dtype):
            # The earlier form `encode_prompt(positive_text, negative_text, device, dtype)`, texts taken as given.
            warnings.warn(
                "`encode_prompt(prompt, negative_prompt, device, dtype)` is deprecated; pass `device=` and `dtype=` by "
                "name (and `task_type=None` for texts that already carry the system prefix).",
                FutureWarning,
                stacklevel=2,
            )
            device, dtype = do_classifier_free_guidance, num_videos_per_prompt
            do_classifier_free_guidance, num_videos_per_prompt, task_type = True, 1, None
        device = torch.device(device) if device is not None else self._execution_device
        if dtype is None:
            expert = self._first_expert(required=False)
            dtype = (expert or self.text_encoder).dtype

        if prompt_embeds is None:
            if prompt is None:
                raise ValueError("`encode_prompt` needs `prompt` or `prompt_embeds`; both are None.")
            prompts = [prompt] if isinstance(prompt, str) else list(prompt)
            if task_type is not None:
                task = parse_task_type(task_type)
                prompts = [positive_text(p, task, system_prompt) for p in prompts]
            prompt_embeds = self._encode_each(prompts, device, dtype, max_sequence_length)
        else:
            prompt_embeds = prompt_embeds.to(device=device, dtype=dtype)
        num_prompts = prompt_embeds.shape[0]

        if not do_classifier_free_guidance:
            negative_prompt_embeds = None
        elif negative_prompt_embeds is None:
            negative = DEFAULT_NEGATIVE_PROMPT if negative_prompt is None else negative_prompt
            negatives = [negative] * num_prompts if isinstance(negative, str) else list(negative)
            if len(negatives) != num_prompts:
                raise ValueError(
                    f"`negative_prompt` holds {len(negatives)} texts; it must hold one, or one per prompt "
                    f"({num_prompts})."
                )
            negative_prompt_embeds = self._encode_each(negatives, device, dtype, max_sequence_length)
        else:
            negative_prompt_embeds = negative_prompt_embeds.to(device=device, dtype=dtype)

        # (num_prompts, L, D) -> (num_prompts * num_videos_per_prompt, L, D): each prompt's videos side by side
        prompt_embeds = prompt_embeds.repeat_interleave(num_videos_per_prompt, dim=0)
        if negative_prompt_embeds is not None:
            negative_prompt_embeds = negative_prompt_embeds.repeat_interleave(num_videos_per_prompt, dim=0)
        return prompt_embeds, negative_prompt_embeds

    def _encode_each(self, texts: list[str], device, dtype, max_sequence_length: int) -> torch.Tensor:
        """UMT5 embeddings `(len(texts), L, D)`, each distinct text encoded alone (a batch then equals single calls)."""
        if self.text_encoder is None or self.tokenizer is None:
            raise ValueError(
                "This pipeline has no `text_encoder`/`tokenizer`; pass `prompt_embeds` and `negative_prompt_embeds`."
            )
        encoded: dict[str, torch.Tensor] = {}
        for text in texts:
            if text not in encoded:
                encoded[text] = encode_texts(
                    self.tokenizer, self.text_encoder, [text], device, dtype, max_sequence_length
                )
        return torch.cat([encoded[text] for text in texts])

    def _latents_stats(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (1, self.vae.config.z_dim, 1, 1, 1)
        mean = torch.tensor(self.vae.config.latents_mean, dtype=torch.float32).view(shape).to(device)
        std = torch.tensor(self.vae.config.latents_std, dtype=torch.float32).view(shape).to(device)
        return mean, std

    @torch.no_grad()
    def encode_condition(self, pixels: torch.Tensor, device: torch.device) -> torch.Tensor:
        """VAE `mode()` of one clip or image `[3, T, H, W]`, normalised: `[1, 16, T_lat, H/8, W/8]` float32."""
        vae_device = get_module_execution_device(self.vae)
        latent = self.vae.encode(pixels[None].to(vae_device, self.vae.dtype)).latent_dist.mode().float()
        mean, std = self._latents_stats(latent.device)
        return ((latent - mean) / std).to(device)

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor, output_type: str):
        vae_device = get_module_execution_device(self.vae)
        mean, std = self._latents_stats(vae_device)
        latents = latents.to(vae_device, torch.float32) * std + mean
        video = self.vae.decode(latents.to(self.vae.dtype), return_dict=False)[0]
        return self.video_processor.postprocess_video(video.float(), output_type=output_type)

    def prepare_latents(self, shape: tuple[int, ...], generator, latents, device: torch.device) -> torch.Tensor:
        """The initial noise `shape` (batch first), drawn in float32 on the CPU with `generator` (the first and only
        draw), then moved. As diffusers' `randn_tensor`: one generator draws the whole batch at once; a list of
        generators (one per video) draws each video's noise from its own, as a single call with it would."""
        if latents is not None:
            return latents.to(device=device, dtype=torch.float32)
        return randn_tensor(shape, generator=generator, device=torch.device("cpu"), dtype=torch.float32).to(device)

    def build_conditions(self, video_latents, image_latent, reference_latents) -> dict[Combo, _Conditions]:
        """The condition streams of each combo (docs/design.md#combos) with their source ids, videos first."""
        def with_ids(latents: list[torch.Tensor]) -> _Conditions:
            ids = assign_source_ids(len(latents), self.config.max_trained_src_id, self.config.interpolate_src_id)
            if not self.config.use_src_id_rotary_emb:
                ids = [0.0] * len(latents)  # id 0 adds no phase: every stream keeps the plain 3-D RoPE
            return _Conditions(list(latents), ids)

        everything = [*video_latents, *([image_latent] if image_latent is not None else []), *reference_latents]
        return {
            Combo.NONE: _Conditions([], []),
            Combo.V: with_ids(video_latents[:1]),
            Combo.I: with_ids(reference_latents),
            Combo.VI: with_ids(everything),
        }

    def plan_steps(
        self, timesteps: list[int], omegas: dict[str, float], omega_scale: float, num_train_timesteps: int
    ) -> list[tuple[int, dict[str, float]]]:
        """Per step: which expert (0 high, 1 low) and which guidance weights, decided before the loop.

        `t >= boundary` (on the integer timestep) uses the high-noise expert. At the first low-noise step the weights
        are multiplied by `omega_scale`, once; they stay scaled to the end. A single expert never rescales. Without a
        high-noise expert (`transformer=None`, `boundary_ratio >= 1`) every step is a low-noise step.
        """
        two_experts = self.transformer_2 is not None and self.config.boundary_ratio is not None
        boundary = self.config.boundary_ratio * num_train_timesteps if two_experts else None
        if two_experts and self.transformer is None:
            boundary = math.inf  # a timestep of exactly 1000 (the Euler fallback's first) stays on `transformer_2`
        plan, scaled = [], False
        for t in timesteps:
            expert = 1 if two_experts and t < boundary else 0
            if expert == 1 and not scaled:
                omegas = {name: value * omega_scale for name, value in omegas.items()}
                scaled = True
            plan.append((expert, omegas))
        return plan

    def predict_branches(
        self,
        model: BerniniTransformer3DModel,
        latents: torch.Tensor,
        timestep: torch.Tensor,
        branches: Sequence[tuple[_Conditions, bool]],
        branch_keys: Sequence[tuple],
        prompt_embeds: torch.Tensor,
        negative_prompt_embeds: torch.Tensor,
        attention_kwargs: dict[str, Any] | None = None,
        branch_names: Sequence[str] | None = None,
        cache_context_kwargs: dict[str, Any] | None = None,
    ) -> list[torch.Tensor]:
        """One step's prediction of every guidance branch, in branch order.

        Branches with the same key (identical conditions and text, e.g. V == none without a video) share one forward.
        Under branch parallelism the distinct forwards are dealt to the branch groups and exchanged, so every process
        returns all of them.

        Each forward runs inside `model.cache_context(name, **cache_context_kwargs)`, `name` being the first of its
        branches' `branch_names` (by default `"branch<i>"`), so that diffusers' cache hooks keep one state per branch.
        """
        names = list(branch_names) if branch_names is not None else [f"branch{i}" for i in range(len(branches))]
        forwards: dict[tuple, Callable[[], torch.Tensor]] = {}
        for (conditions, positive), key, name in zip(branches, branch_keys, names):
            if key in forwards:
                continue

            def forward(conditions=conditions, positive=positive, name=name) -> torch.Tensor:
                with model.cache_context(name, **(cache_context_kwargs or {})):
                    return model(
                        hidden_states=latents,
                        timestep=timestep,
                        encoder_hidden_states=prompt_embeds if positive else negative_prompt_embeds,
                        condition_latents=conditions.latents or None,
                        condition_source_ids=conditions.ids or None,
                        attention_kwargs=attention_kwargs,
                        return_dict=False,
                    )[0]

            forwards[key] = forward
        if self._parallel_state is None:
            outputs = [forward() for forward in forwards.values()]
        else:
            outputs = self._parallel_state.run_branches(list(forwards.values()), like=latents, model=model)
        by_key = dict(zip(forwards, outputs))
        return [by_key[key] for key in branch_keys]

    def _offload_if_hooked(self, module: torch.nn.Module) -> None:
        """Send `module` back to the CPU now if `enable_model_cpu_offload` manages it (its hook reloads it later)."""
        for hook in getattr(self, "_all_hooks", None) or []:
            if getattr(hook, "model", None) is module:
                hook.offload()

    def _scheduler_for_call(self, flow_shift: float):
        if not self.config.use_unipc:
            num_train_timesteps = self.scheduler.config.num_train_timesteps
            return FlowMatchEulerScheduler(num_train_timesteps=num_train_timesteps, shift=flow_shift)
        config = dict(self.scheduler.config)
        shift_key = "flow_shift" if "flow_shift" in config else "shift"
        return type(self.scheduler).from_config(config, **{shift_key: flow_shift})

    # ------------------------------------------------------------------------------------------------ call

    @property
    def num_timesteps(self) -> int:
        return self._num_timesteps

    @property
    def current_timestep(self):
        return self._current_timestep

    @property
    def interrupt(self) -> bool:
        return self._interrupt

    @property
    def guidance_scale(self) -> float:
        """The text weight (`omega_txt`) of the current or last call, under diffusers' name."""
        return self._guidance_scale

    @property
    def attention_kwargs(self) -> dict[str, Any] | None:
        return self._attention_kwargs

    def _non_finite_message(self, step: int, num_steps: int, plan, given: list[str]) -> str:
        """The one-line message of a `NonFiniteOutputError`: where the latents went bad and what likely caused it."""
        names = ("transformer", "transformer_2")
        expert = names[plan[step][0]]
        experts = (self.transformer, self.transformer_2)
        adapters = sorted({a for e in experts for a in (getattr(e, "peft_config", None) or {})})
        causes = [f"a LoRA ({', '.join(adapters)}): try the call without it" for _ in adapters[:1]]
        causes += [f"the given {', '.join(given)}"] if given else []
        causes.append(
            "a guidance setting (omega_*, omega_scale, eta, momentum, norm_threshold, flow_shift) too large for the "
            f"experts' dtype ({self._first_expert().dtype}), or non-finite expert weights"
        )
        return (
            f"The denoising produced non-finite latents (NaN or inf) at step {step + 1} of {num_steps} ({expert}); "
            f"nothing was decoded or written. Likely cause: {'; or '.join(causes)}."
        )

    def _first_expert(self, required: bool = True) -> BerniniTransformer3DModel | None:
        """The high-noise expert, else the low-noise one (they share their config); `required` raises without one."""
        expert = self.transformer if self.transformer is not None else self.transformer_2
        if expert is None and required:
            raise ValueError(
                "This pipeline has no expert (`transformer` and `transformer_2` are None); it can only `encode_prompt`."
            )
        return expert

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        task_type: str | TaskType = "t2v",
        video: Any = None,
        image: str | os.PathLike | PIL.Image.Image | None = None,
        images: Sequence[str | os.PathLike | PIL.Image.Image] | None = None,
        negative_prompt: str | list[str] | None = None,
        system_prompt: str | None = None,
        guidance_mode: str | GuidanceMode | None = None,
        num_frames: int = 81,
        height: int = 480,
        width: int = 848,
        max_image_size: int = 848,
        fps: float = 16,
        num_inference_steps: int = 40,
        flow_shift: float = 5.0,
        omega_vid: float = 1.25,
        omega_img: float = 4.5,
        omega_txt: float = 4.0,
        omega_scale: float = 0.8,
        eta: float = 0.5,
        momentum: float = 0.0,
        norm_threshold: float | Sequence[float] = 50.0,
        guidance_scale: float | None = None,
        num_videos_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        output_type: str = "np",
        return_dict: bool = True,
        attention_kwargs: dict[str, Any] | None = None,
        callback_on_step_end: Callable | PipelineCallback | MultiPipelineCallbacks | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],
        max_sequence_length: int = MAX_SEQUENCE_LENGTH,
        context_frames: int | None = None,
        context_overlap: int = DEFAULT_CONTEXT_OVERLAP,
    ) -> BerniniPipelineOutput | tuple:
        r"""
        Run the Bernini-R renderer.

        Args:
            prompt (`str` or `list[str]`, *optional*):
                What to generate or how to edit. The task's system prefix is prepended (no separator) after cleaning.
                A list renders one batch, each prompt with the same media and settings. Give `prompt_embeds` instead
                to skip the text encoder.
            task_type (`str` or `TaskType`, defaults to `"t2v"`):
                One of `t2i`, `t2v`, `i2i`, `v2v`, `mv2v`, `r2v`, `rv2v`, `ads2v`.
            video (`str`, `list[str]` or frames, *optional*):
                The source video (v2v, mv2v, rv2v) or `[source, insert]` (ads2v): paths, or decoded frames (a list of
                PIL images or a uint8 array `[T, H, W, 3]`, taken to be at `fps`). Shared by every video of a batch.
            image (`str` or `PIL.Image.Image`, *optional*):
                The source image of i2i. Shared by every video of a batch.
            images (`list[str | PIL.Image.Image]`, *optional*):
                Reference images (r2v, rv2v; optional for i2i and ads2v). Shared by every video of a batch.
            negative_prompt (`str` or `list[str]`, *optional*):
                Tokenized raw, with no prefix and no cleaning; one for all prompts or one per prompt. `None` uses the
                default Wan negative prompt.
            system_prompt (`str`, *optional*):
                The prefix of the positive prompt. `None` uses the task's. Not applied to `prompt_embeds`.
            guidance_mode (`str` or `GuidanceMode`, *optional*):
                One of `t2v`, `t2v_apg`, `v2v`, `v2v_apg`, `v2v_chain`, `r2v_apg`, `rv2v`. `None` uses the task's default.
            num_frames (`int`, defaults to 81):
                Frames of a generated video; for video inputs, the cap on the frames taken from the source (4k+1).
            height (`int`, defaults to 480):
                Output height when no video or source image sets it.
            width (`int`, defaults to 848):
                Output width when no video or source image sets it.
            max_image_size (`int`, defaults to 848):
                Long-side limit of the input media (never upscaled; sizes snap to multiples of 16). A limit above what
                the experts' RoPE table holds (`rope_max_seq_len` x 16 pixels, 16384 for the released models) is
                lowered to it, so the default fits small test models too.
            fps (`float`, defaults to 16):
                The rate source videos are resampled to, and the output video's rate: 1 to 240 (`constants.MIN_FPS`,
                `constants.MAX_FPS`).
            num_inference_steps (`int`, defaults to 40):
                Denoising steps.
            flow_shift (`float`, defaults to 5.0):
                The flow shift of the UniPC sigmas, for this call.
            omega_vid (`float`, defaults to 1.25):
                Weight of the video condition (rv2v, v2v_chain).
            omega_img (`float`, defaults to 4.5):
                Weight of the image/reference condition (rv2v, r2v_apg).
            omega_txt (`float`, defaults to 4.0):
                Weight of the text.
            omega_scale (`float`, defaults to 0.8):
                Multiplies the omegas once, at the first low-noise step (two-expert models only).
            eta (`float`, defaults to 0.5):
                APG weight of the component parallel to the conditional prediction.
            momentum (`float`, defaults to 0.0):
                APG momentum.
            norm_threshold (`float` or `list[float]`, defaults to 50.0):
                APG per-frame norm clamp (0 disables); a list gives one value per APG link.
            guidance_scale (`float`, *optional*):
                diffusers' name of the text weight: the same as `omega_txt` (an `omega_txt` other than its default
                that disagrees with it is an error). The low-noise steps scale it by `omega_scale` as they do
                `omega_txt`; there is no `guidance_scale_2`.
            num_videos_per_prompt (`int`, defaults to 1):
                Videos per prompt; the batch is `len(prompt) * num_videos_per_prompt`, each prompt's videos
                consecutive. Every sample is guided on its own (per-sample APG norms), so a batch equals its samples
                run one by one with the same generators.
            generator (`torch.Generator` or `list[torch.Generator]`, *optional*):
                CPU generator(s) for the initial noise: one draws the whole batch at once; a list holds one per video
                (in batch order), and a video then gets the noise a single call with its generator gets.
            latents (`torch.Tensor`, *optional*):
                Initial noise `[batch, 16, T_lat, H/8, W/8]` instead of drawing it.
            prompt_embeds (`torch.Tensor`, *optional*):
                Precomputed positive text embeddings `(num_prompts, sequence_length, text_dim)`, used as given: make
                them with [`~BerniniPipeline.encode_prompt`] and the call's `task_type`, which adds the system prefix.
            negative_prompt_embeds (`torch.Tensor`, *optional*):
                Precomputed negative text embeddings, one row per prompt. `None` encodes `negative_prompt`.
            output_type (`str`, defaults to `"np"`):
                `"np"`, `"pil"`, `"pt"`, or `"latent"` for the final normalised latent.
            return_dict (`bool`, defaults to `True`):
                Return a [`BerniniPipelineOutput`] instead of a tuple.
            attention_kwargs (`dict`, *optional*):
                Passed to the attention processors.
            callback_on_step_end (`Callable`, *optional*):
                Called as `callback_on_step_end(pipe, step, timestep, callback_kwargs)` after each step.
            callback_on_step_end_tensor_inputs (`list[str]`, defaults to `["latents"]`):
                The tensors passed in `callback_kwargs`.
            max_sequence_length (`int`, defaults to 512):
                Tokens per text (at most 512, the renderer's length).
            context_frames (`int`, *optional*):
                Temporal context windows for clips longer than the model was trained on (81 frames): the window length
                in frames, 4k+1 (e.g. 81). Each step then predicts overlapping windows of the latent clip on their own
                (each with its slice of the video conditions and RoPE positions from 0; the text and reference images
                are shared), applies the mode's guidance per window and blends the windows over their overlaps. A
                source video is then taken whole (after resampling to `fps`) instead of its first `num_frames`, up to
                `constants.MAX_WINDOWED_FRAMES` (961 frames, 60 s at 16 fps); t2v's `num_frames` may go up to it too.
                A clip no longer than the window is a plain call, bit for bit. `None` (default) turns windows off.
                Cost: windows x forwards per step (docs/design.md#long-videos).
            context_overlap (`int`, defaults to 16):
                Frames shared by neighbouring windows, a multiple of 4 below `context_frames`; the windows are spread
                evenly, so the real overlaps are at least this.

        Returns:
            [`BerniniPipelineOutput`] or `tuple`: the frames (or latents) of every video of the batch, and the fps.
        """
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs

        # 1. Check inputs and read the media, before any model work.
        given_embeds = prompt_embeds is not None or negative_prompt_embeds is not None
        given_latents = latents is not None
        expert = self._first_expert()
        _check_experts(self.transformer, self.transformer_2, self.config.boundary_ratio)
        rope_len = expert.config.rope_max_seq_len
        limits = (rope_len, self.vae_scale_factor_temporal, self.vae_scale_factor_spatial)
        spec, mode, videos = self._check_call(locals(), limits)
        acceleration.check_cache_for_call(self, mode, num_inference_steps)  # a MagCache table of another mode/steps
        if prompt_embeds is not None and prompt_embeds.shape[-1] != expert.config.text_dim:
            raise ValueError(
                f"`prompt_embeds` must have the experts' text_dim {expert.config.text_dim} as last size, got shape "
                f"{tuple(prompt_embeds.shape)}."
            )
        task = spec.task
        context_frames = None if context_frames is None else int(context_frames)  # a numpy integer is fine too
        context_overlap = int(context_overlap)
        omega_txt = omega_txt if guidance_scale is None else guidance_scale
        omegas = {"omega_vid": omega_vid, "omega_img": omega_img, "omega_txt": omega_txt}
        if spec.is_image:
            num_frames = 1
        max_image_size = min(max_image_size, _max_pixels(limits))
        video_pixels, image_pixels, reference_pixels = self.load_media(
            videos, image, images, max_image_size, fps, num_frames, windowed=context_frames is not None
        )
        frames, height, width = self.output_geometry(spec, video_pixels, image_pixels, num_frames, height, width)
        if prompt_embeds is not None:
            num_prompts = prompt_embeds.shape[0]
        else:
            num_prompts = 1 if isinstance(prompt, str) else len(prompt)
        latent_shape = (
            num_prompts * num_videos_per_prompt,
            expert.config.in_channels,
            (frames - 1) // self.vae_scale_factor_temporal + 1,
            height // self.vae_scale_factor_spatial,
            width // self.vae_scale_factor_spatial,
        )
        if latents is not None and tuple(latents.shape) != latent_shape:
            raise ValueError(f"`latents` must have shape {latent_shape}, got {tuple(latents.shape)}.")
        context = windows.context_windows(latent_shape[2], context_frames, context_overlap)

        self._guidance_scale = omega_txt
        self._attention_kwargs = attention_kwargs
        self._current_timestep = None
        self._interrupt = False
        device = self._execution_device
        dtype = expert.dtype

        # 2. Encode the text: each positive with the task prefix, the negatives raw; precomputed embeddings as given.
        if prompt is None:
            positive = None
        elif isinstance(prompt, str):
            positive = positive_text(prompt, task, system_prompt)
        else:
            positive = [positive_text(p, task, system_prompt) for p in prompt]
        negative = negative_prompt
        if negative_prompt is None and negative_prompt_embeds is None:
            negative = DEFAULT_NEGATIVE_PROMPT
        # In `encode_prompt`'s order, ending with task_type=None: `positive` already carries the prefix.
        prompt_embeds, negative_prompt_embeds = self.encode_prompt(
            positive, negative, True, num_videos_per_prompt, prompt_embeds, negative_prompt_embeds,
            max_sequence_length, device, dtype, None,
        )

        # 3. Encode the conditions, each on its own, and group them into the combos guidance uses. The batch shares
        # them. Media the mode never looks at (e.g. references under v2v_chain's V) are not encoded.
        guidance = Guidance(mode, eta=eta, momentum=momentum, norm_threshold=norm_threshold)
        needed = {branch.combo for branch in guidance.spec.branches}
        if not needed & {Combo.V, Combo.VI}:
            video_pixels = []
        elif Combo.VI not in needed:
            video_pixels = video_pixels[:1]
        if Combo.VI not in needed:
            image_pixels = None
        if not needed & {Combo.I, Combo.VI}:
            reference_pixels = []
        video_latents = [self.encode_condition(p, device) for p in video_pixels]
        image_latent = None if image_pixels is None else self.encode_condition(image_pixels, device)
        reference_latents = [self.encode_condition(p, device) for p in reference_pixels]
        # Each window sees its own slice of every video condition (windows.condition_span); the source image and the
        # references are shared. One window is the whole clip with the conditions as they are.
        window_combos = [
            self.build_conditions(
                [v[:, :, slice(*windows.condition_span(span, v.shape[2]))] for v in video_latents],
                image_latent,
                reference_latents,
            )
            if len(context) > 1
            else self.build_conditions(video_latents, image_latent, reference_latents)
            for span in context.spans
        ]
        if video_pixels or image_pixels is not None or reference_pixels:
            self._offload_if_hooked(self.vae)  # under model offload it would otherwise sit out the whole loop

        # 4. Timesteps with the official flow sigmas and this call's shift.
        scheduler = self._scheduler_for_call(flow_shift)
        if isinstance(scheduler, FlowMatchEulerScheduler):
            scheduler.set_timesteps(sigmas=official_euler_sigmas(num_inference_steps), device=device)
        elif scheduler.config.get("use_flow_sigmas", False):
            scheduler.set_timesteps(sigmas=official_flow_sigmas(num_inference_steps), device=device)
        else:
            scheduler.set_timesteps(num_inference_steps, device=device)
        scheduler.set_begin_index(0)
        timesteps = scheduler.timesteps
        sigmas = list(scheduler.sigmas.to(torch.float32).unbind(0))  # 0-dim float32 tensors
        self._num_timesteps = len(timesteps)

        # 5. The initial noise, one per video.
        latents = self.prepare_latents(latent_shape, generator, latents, device)
        if self._parallel_state is not None:
            # one noise for every process of a data group, whatever seed each was given
            latents = self._parallel_state.broadcast(latents)

        # 6. Decide each step's expert and weights, which branches are the same forward, and their cache names.
        plan = self.plan_steps(timesteps.tolist(), omegas, omega_scale, scheduler.config.num_train_timesteps)
        split = {name: sum(e == i for e, _ in plan) for i, name in enumerate(("transformer", "transformer_2"))}
        acceleration.check_cache_for_call(self, mode, num_inference_steps, split)
        experts = (self.transformer, self.transformer_2)
        steps = []  # per window: its span, branches, their keys and cache names, and its own guidance state
        for j, (span, combos) in enumerate(zip(context.spans, window_combos)):
            branches = [(combos[b.combo], b.positive) for b in GUIDANCE_SPECS[mode].branches]
            names = [branch_name(b) for b in GUIDANCE_SPECS[mode].branches]
            if len(context) > 1:
                names = [f"{name}_w{j}" for name in names]  # cache hooks keep one state per window and branch
            window_guidance = guidance if j == 0 else Guidance(
                mode, eta=eta, momentum=momentum, norm_threshold=norm_threshold
            )
            steps.append((span, branches, [(c.key(), positive) for c, positive in branches], names, window_guidance))
        blend = context.weights.to(device=device, dtype=torch.float32)
        if len(context) > 1:
            logger.info(
                f"{len(context)} context windows of {context_frames} frames over {latent_shape[2]} latent frames: "
                f"{len(context)} x {guidance.spec.forwards_per_step} forwards per step."
            )

        # 7. Denoising loop. Guidance reduces per sample (APG norms over each video's frames), so the batch's
        # videos never mix. Cache hooks start clean even when an earlier call stopped on an error before its reset.
        for expert in (e for e in experts if e is not None):
            expert._reset_stateful_cache()
        # The first step whose latents hold a NaN/inf, kept on the device (no host sync per step) and read once after
        # the loop; `len(timesteps)` while all are finite (docs/design.md#non-finite-results).
        first_bad = torch.full((), len(timesteps), dtype=torch.long, device=latents.device)
        replaced_latents = False
        with self.progress_bar(total=num_inference_steps) as progress_bar:
            for i, t in enumerate(timesteps):
                if self.interrupt:
                    continue
                self._current_timestep = t
                expert_index, weights = plan[i]
                model = experts[expert_index]
                timestep = t.expand(latents.shape[0])
                link_weights = [weights[name] for name in guidance.spec.weights]
                cache_kwargs = {"step_index": i, "sigma": sigmas[i], "num_inference_steps": len(timesteps)}
                if len(steps) == 1:
                    _, branches, branch_keys, branch_names, _ = steps[0]
                    branch_outputs = self.predict_branches(
                        model, latents.to(dtype), timestep, branches, branch_keys, prompt_embeds,
                        negative_prompt_embeds, attention_kwargs, branch_names, cache_context_kwargs=cache_kwargs,
                    )
                    noise_pred = guidance(latents, branch_outputs, link_weights, sigmas[i])
                else:
                    # Every window is guided on its own, then the guided predictions are blended (weights summing to
                    # one per latent frame) into one prediction of the whole clip for the scheduler.
                    noise_pred = torch.zeros_like(latents)
                    for j, ((start, end), branches, branch_keys, branch_names, window_guidance) in enumerate(steps):
                        window = latents[:, :, start:end].contiguous()
                        branch_outputs = self.predict_branches(
                            model, window.to(dtype), timestep, branches, branch_keys, prompt_embeds,
                            negative_prompt_embeds, attention_kwargs, branch_names, cache_context_kwargs=cache_kwargs,
                        )
                        prediction = window_guidance(window, branch_outputs, link_weights, sigmas[i])
                        noise_pred[:, :, start:end] += blend[j, start:end].view(1, 1, -1, 1, 1) * prediction.float()
                latents = scheduler.step(noise_pred, t, latents, return_dict=False)[0]

                if callback_on_step_end is not None:
                    tensors = {
                        "latents": latents,
                        "prompt_embeds": prompt_embeds,
                        "negative_prompt_embeds": negative_prompt_embeds,
                    }
                    callback_kwargs = {k: tensors[k] for k in callback_on_step_end_tensor_inputs}
                    callback_outputs = callback_on_step_end(self, i, t, callback_kwargs)
                    returned = callback_outputs.pop("latents", latents)
                    replaced_latents |= returned is not latents
                    latents = returned
                    prompt_embeds = callback_outputs.pop("prompt_embeds", prompt_embeds)
                    negative_prompt_embeds = callback_outputs.pop("negative_prompt_embeds", negative_prompt_embeds)
                first_bad = torch.minimum(first_bad, torch.where(torch.isfinite(latents).all(), len(timesteps), i))
                progress_bar.update()
        self._current_timestep = None
        bad_step = int(first_bad)  # the check's one host sync, after the loop
        if bad_step < len(timesteps):
            self.maybe_free_model_hooks()
            given = [name for name, value in (("prompt_embeds", given_embeds), ("latents", given_latents)) if value]
            if replaced_latents:
                given.append("the latents returned by callback_on_step_end")
            raise NonFiniteOutputError(self._non_finite_message(bad_step, len(timesteps), plan, given), bad_step)

        # 8. Decode, in one process per data group (docs/design.md#parallel-layout): the others hold the same latents
        # and write nothing.
        if output_type == "latent":
            result = latents
        elif self.is_writer:
            result = self.decode_latents(latents, output_type)
        else:
            result = None
        self.maybe_free_model_hooks()

        if not return_dict:
            return (result,)
        return BerniniPipelineOutput(frames=result, fps=fps, output_type=output_type)


def check_device(device: Any, name: str = "device") -> None:
    """Refuse the meta device (no storage: weights moved there are gone); other names are left to torch."""
    try:
        kind = None if device is None else torch.device(device).type
    except (RuntimeError, TypeError):
        return
    if kind == "meta":
        raise ValueError(
            f"`{name}`={str(device)!r} is not allowed: the meta device holds no data, so moving the weights there "
            "would destroy them; use cpu, cuda or cuda:N."
        )


def _check_experts(transformer, transformer_2, boundary_ratio) -> None:
    """A pipeline without a high-noise expert must send every step to `transformer_2` (as `WanPipeline` allows)."""
    if transformer is None and transformer_2 is not None and (boundary_ratio is None or boundary_ratio < 1.0):
        raise ValueError(
            f"`transformer` is None but `boundary_ratio`={boundary_ratio!r} sends the high-noise steps to it; with "
            "only the low-noise expert `transformer_2`, set `boundary_ratio=1.0` (every step runs on `transformer_2`), "
            "or pass the expert as `transformer` (a single-expert model, e.g. the 1.3B one)."
        )


def _max_pixels(limits: tuple[int, int, int]) -> int:
    """The longest side, in pixels, whose 2x2-patch tokens fit the experts' RoPE table: rope_len * 2 * spatial."""
    rope_len, _, spatial = limits
    return rope_len * spatial * 2


def _short(value: Any, limit: int = 80) -> str:
    """`repr(value)` cut at `limit` characters: a message never carries a 20 MB argument."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({type(value).__name__})"


def _check_range(name: str, value: Any, alternative: str = "") -> None:
    """`value` is a finite real in `GUIDANCE_RANGES[name]` (both ends included), else a ValueError with the range."""
    low, high = GUIDANCE_RANGES[name]
    if not _is_real(value) or not low <= value <= high:
        raise ValueError(f"`{name}`={_short(value)} must be a number in [{low:g}, {high:g}]{alternative}.")


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    if isinstance(value, (list, tuple)):
        return f"a {type(value).__name__} of {len(value)}: {_short(value, 200)}"
    return type(value).__name__


def _resolve_call(args: dict[str, Any]) -> tuple[TaskSpec, GuidanceMode, list, dict[str, Any]]:
    """The task spec, the guidance mode, the list of videos and the scalar weights of a call's arguments."""
    spec = TASKS[parse_task_type(args["task_type"])]
    mode = args["guidance_mode"]
    mode = spec.default_guidance_mode if mode is None else parse_guidance_mode(mode)
    names = ("omega_vid", "omega_img", "omega_txt", "omega_scale", "eta", "momentum")
    return spec, mode, media.split_videos(args["video"]), {name: args[name] for name in names}


def _describe_inputs(spec: TaskSpec) -> str:
    parts = [f"`{name}` ({need.value})" for name, need in spec.inputs]
    return f"it takes {', '.join(parts)}" if parts else "it takes text only"
