"""The feature switches of [`BerniniPipeline`], as a mixin: the attention backend, LoRAs (turbo pairs too), step
caches, regional `torch.compile`, memory profiles (and the memory plan) and parallelism. Each is a thin entry point into the module that
implements it (`attention`, `acceleration`, `memory`, `parallel`), so the pipeline class shows the pipeline.
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Callable

import torch
import torch._dynamo  # compile: the backends torch.compile knows
import torch._inductor  # compile: inductor's modes

from . import acceleration, memory, memory_plan, parallel
from .attention import set_attention_backend
from .constants import SHARDED_PROFILE_NAMES
from .parallel import ParallelState
from .pipeline_inputs import check_device


class BerniniFeaturesMixin:
    """Feature switches of a pipeline with two optional experts (`transformer`, `transformer_2`). Placed before
    `DiffusionPipeline` in the bases, so that `to` and `load_lora_weights` wrap diffusers' own."""

    _parallel_state: ParallelState | None = None

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
        sharded = bool(self._sharded_components())
        if sharded and getattr(self, "_memory_profile", None) is None and name not in ("resident", "expert_offload"):
            how = (
                "fp8 storage of sharded experts is chosen at load (`from_pretrained_sharded(..., memory_profile=...)`)"
                if name in SHARDED_PROFILE_NAMES
                else "its hooks move or read whole blocks and experts, FSDP2 places the shards"
            )
            raise ValueError(
                f"`name`={name!r}: the experts are sharded (`shard_weights=True`); {how}. A sharded pipeline takes "
                "'resident' or 'expert_offload' here."
            )
        return memory.apply_memory_profile(self, name, device, vae_tiling=vae_tiling)

    def enable_model_cpu_offload(self, gpu_id: int | None = None, device: torch.device | str = "cuda") -> None:
        r"""
        diffusers' model offload (one component on the device at a time); sharded experts and text encoder
        (`shard_weights=True`) are placed by their own [`~parallel.ShardPlacement`] instead of accelerate's hook,
        which would move them after FSDP2 has gathered their weights. See
        [`~diffusers.DiffusionPipeline.enable_model_cpu_offload`].
        """
        super().enable_model_cpu_offload(gpu_id=gpu_id, device=device)
        self._place_sharded_components()

    def _place_sharded_components(self) -> None:
        """Under model offload, give each sharded component (the experts, the text encoder) a placement hook that
        offloads whatever else is on the device and brings its shards, before FSDP2 gathers them."""
        components = self._sharded_components()
        if not components or not getattr(self, "_all_hooks", None):
            return
        pipe = weakref.ref(self)  # the experts' hooks must not keep the pipeline alive

        def offload_others(model: torch.nn.Module) -> None:
            for hook in pipe()._all_hooks:
                if hook.model is not model and parallel.device_of(hook.model) not in (None, torch.device("cpu")):
                    hook.offload()

        for component in components:
            parallel.place_sharded_module(component, self._offload_device, offload_others)

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
                Shard every block of both experts, and their other weights, and the text encoder, with torch's
                FSDP2 across the `ulysses_degree x branch_degree` processes of each data group (needs that product
                above 1): each process keeps 1 / (U x B) of each, on `state.device`, and all-gathers a block just
                before it runs. The sharding stays for the pipeline's life: load it again to change the layout;
                every process of a data group must keep making the same calls (docs/parallel.md).

        Returns:
            [`~parallel.ParallelState`]: this process's ranks (`data_rank`, `branch_rank`, `ulysses_rank`), degrees
            (`data_degree` = processes / (`ulysses_degree` x `branch_degree`)), `device`, `is_writer`, and
            `assign_cases(cases)` for this process's share of a case list.
        """
        self._parallel_state = parallel.enable_parallelism(
            self, ulysses_degree=ulysses_degree, branch_degree=branch_degree, shard_weights=shard_weights
        )
        if shard_weights:
            self._offload_sharded_components()
        return self._parallel_state

    def _offload_sharded_components(self) -> None:
        """After sharding under expert_offload (applied before it): the sharded components (the experts and the text
        encoder) get their placement hooks and their shards go to the CPU until they run."""
        if getattr(self, "_all_hooks", None):
            self._place_sharded_components()
            for component in self._sharded_components():
                component.to("cpu")

    @property
    def _execution_device(self) -> torch.device:
        """diffusers' execution device, which it reads from accelerate's offload hooks; sharded components placed by
        a [`~parallel.ShardPlacement`] have none, so under model offload their placement's device is the answer."""
        for component in self._sharded_components():
            placement = getattr(component, parallel.PLACEMENT_ATTRIBUTE, None)
            if placement is not None:
                return placement.device
        return super()._execution_device

    def _sharded_components(self) -> list[torch.nn.Module]:
        """The components sharded by `enable_parallelism(shard_weights=True)`: the experts and the text encoder."""
        names = ("text_encoder", "transformer", "transformer_2")
        return [c for n in names if (c := getattr(self, n, None)) is not None and parallel.is_sharded(c)]

    def _shard_weights(
        self, ulysses_degree: int, branch_degree: int, profile: memory.MemoryProfile | None = None
    ) -> dict[str, torch.dtype | None]:
        """`enable_parallelism(shard_weights=True)` for a pipeline whose memory profile is chosen with the sharding
        (`from_pretrained_sharded`, `bernini generate --shard_weights`): with an fp8 profile the experts' weights,
        real or still on the meta device, are stored in float8 first and their shards all-gathered in the experts'
        dtype. Returns each expert's compute dtype for float8 storage (None otherwise); apply the profile's
        placement with `_apply_sharded_profile` once the weights are in."""
        if profile is not None:
            memory.check_sharded_profile(profile.name)
        experts = {n: e for n in ("transformer", "transformer_2") if (e := getattr(self, n, None)) is not None}
        compute = {name: None for name in experts}
        if profile is not None and profile.fp8:
            compute = {name: memory.store_float8(expert) for name, expert in experts.items()}
        dtypes = {dtype for dtype in compute.values() if dtype is not None}
        if len(dtypes) > 1:
            raise ValueError(f"the experts compute in different dtypes ({sorted(map(str, dtypes))}); load them in one.")
        self._parallel_state = parallel.enable_parallelism(
            self, ulysses_degree, branch_degree, shard_weights=True, float8_compute_dtype=next(iter(dtypes), None)
        )
        self._offload_sharded_components()
        return compute

    def _apply_sharded_profile(self, profile: memory.MemoryProfile, device: str | torch.device | None = None) -> None:
        """The placement of `profile` on a pipeline sharded by `_shard_weights` (its fp8 storage is already done)."""
        memory.apply_memory_profile(self, profile.placement, device)
        self._memory_profile = (profile.name, self._memory_profile[1])

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
