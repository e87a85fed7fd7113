"""BerniniPipeline: the Bernini-R renderer (every task type and guidance mode) as a diffusers pipeline.

The call's argument rules live in `pipeline_inputs`, its output in `pipeline_output`, the condition streams in
`conditions`, the per-call scheduler in `scheduling`, the feature switches in `pipeline_features`, the loading in
`pipeline_loading` and the denoising loop in `pipeline_denoising`; this module holds the call: encoding, preparing,
its phases and decoding.
"""

from __future__ import annotations

import enum
import inspect
import os
import warnings
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import PIL.Image
import torch
from diffusers import AutoencoderKLWan, DiffusionPipeline, UniPCMultistepScheduler
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.loaders import WanLoraLoaderMixin
from diffusers.utils import logging
from diffusers.utils.torch_utils import get_module_execution_device, randn_tensor
from diffusers.video_processor import VideoProcessor

from . import acceleration, media, pipeline_inputs, windows
from .conditions import (
    _Conditions,
    branch_name,
    build_conditions,
    drop_unused_media,
    window_branches,
    window_conditions,
)
from .constants import DEFAULT_CONTEXT_OVERLAP, MAX_WINDOWED_FRAMES, TEMPORAL_FACTOR
from .guidance import Combo, Guidance
from .pipeline_denoising import BerniniDenoisingMixin
from .pipeline_features import BerniniFeaturesMixin
from .pipeline_inputs import check_call_defaults, check_experts, max_pixels
from .pipeline_loading import BerniniLoadingMixin
from .pipeline_output import OUTPUT_TYPES, BerniniPipelineOutput, NonFiniteOutputError
from .scheduling import scheduler_for_call, set_official_timesteps
from .tasks import DEFAULT_NEGATIVE_PROMPT, GuidanceMode, TaskSpec, TaskType, parse_task_type
from .text import MAX_SEQUENCE_LENGTH, encode_texts, positive_text, restore_tokenizer_pipeline
from .transformer_bernini import BerniniTransformer3DModel

logger = logging.get_logger(__name__)

# Public names that lived here before the split stay importable from here.
__all__ = ["BerniniPipeline", "BerniniPipelineOutput", "NonFiniteOutputError", "OUTPUT_TYPES", "branch_name"]


_CALL_NAMES = (
    "prompt",
    "task_type",
    "video",
    "image",
    "images",
    "negative_prompt",
    "system_prompt",
    "guidance_mode",
    "num_frames",
    "height",
    "width",
    "max_image_size",
    "fps",
    "num_inference_steps",
    "flow_shift",
    "omega_vid",
    "omega_img",
    "omega_txt",
    "omega_scale",
    "eta",
    "momentum",
    "norm_threshold",
    "guidance_scale",
    "num_videos_per_prompt",
    "generator",
    "latents",
    "prompt_embeds",
    "negative_prompt_embeds",
    "output_type",
    "return_dict",
    "attention_kwargs",
    "callback_on_step_end",
    "callback_on_step_end_tensor_inputs",
    "max_sequence_length",
    "context_frames",
    "context_overlap",
)


class CallPhase(NamedTuple):
    """Where a call paused (see `BerniniPipeline.call_phases`): the phase done, and the bytes of tensors the call's
    state holds while paused (its latents, text embeddings and encoded conditions; counted at "prepared", else 0)."""

    name: str
    state_bytes: int


def run_phases(phases):
    """Run a call's phases to the end and return its result."""
    while True:
        try:
            next(phases)
        except StopIteration as done:
            return done.value


def _tensor_bytes(value: Any) -> int:
    """The bytes of every tensor in `value` (nested tuples, lists, dicts and objects with a `__dict__`)."""
    if isinstance(value, torch.Tensor):
        return value.nbytes
    if isinstance(value, dict):
        return sum(_tensor_bytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_tensor_bytes(v) for v in value)
    if hasattr(value, "__dict__") and not isinstance(value, (torch.nn.Module, type, enum.Enum)):
        return sum(_tensor_bytes(v) for v in vars(value).values())
    return 0


class BerniniPipeline(
    BerniniLoadingMixin, BerniniFeaturesMixin, BerniniDenoisingMixin, DiffusionPipeline, WanLoraLoaderMixin
):
    r"""
    The Bernini-R renderer: text-to-image, image editing, text-to-video, video editing, reference-to-video,
    reference+video editing and ad insertion with one model, numerically equal to the official renderer.

    Loading and saving come from [`~pipeline_loading.BerniniLoadingMixin`], the feature switches (attention backend,
    caches, LoRAs, `compile`, memory profiles, parallelism) from [`~pipeline_features.BerniniFeaturesMixin`].
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
        call_defaults (`dict[str, int]`, *optional*):
            Defaults of the call's size arguments (`num_frames`, `height`, `width`, `max_image_size`,
            `num_inference_steps`) that replace the official ones when a call leaves them out; saved with the config.
            The tiny model ([`~tiny.tiny_pipeline`]) sets its seconds-long sizes; `None` keeps the official defaults.
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
        call_defaults: dict[str, int] | None = None,
    ):
        super().__init__()
        for name, expert in (("transformer", transformer), ("transformer_2", transformer_2)):
            if expert is not None and not isinstance(expert, BerniniTransformer3DModel):
                raise ValueError(
                    f"`{name}` must be a BerniniTransformer3DModel, got {type(expert).__name__}; load the weights "
                    "with `BerniniTransformer3DModel.from_pretrained(...)` (the checkpoints are Wan-compatible)."
                )
        check_experts(transformer, transformer_2, boundary_ratio)
        call_defaults = check_call_defaults(call_defaults)
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
            call_defaults=call_defaults,
        )
        self.vae_scale_factor_temporal = vae.config.scale_factor_temporal if vae is not None else TEMPORAL_FACTOR
        self.vae_scale_factor_spatial = vae.config.scale_factor_spatial if vae is not None else 8
        self.video_processor = VideoProcessor(vae_scale_factor=self.vae_scale_factor_spatial)
        self._parallel_state = None  # a ParallelState once enable_parallelism runs
        self.set_attention_backend()

    # ------------------------------------------------------------------------------------------------ inputs

    @classmethod
    def check_inputs(cls, *args, **kwargs) -> None:
        """Validate every argument before any model work; each error names the argument, the value and what is allowed.

        The rules are [`~pipeline_inputs.check_inputs`] (same arguments: the task spec, the texts, the media, the sizes,
        the guidance settings, ...); this entry point adds the pipeline's callback tensors and `__call__`'s defaults.
        """
        pipeline_inputs.check_inputs(
            *args, allowed_tensor_inputs=cls._callback_tensor_inputs, omega_txt_default=cls._call_default("omega_txt"),
            max_windowed_frames=MAX_WINDOWED_FRAMES, **kwargs,
        )

    @classmethod
    def validate_call(cls, **kwargs) -> None:
        """Check the arguments of a call without a loaded model: the same errors `__call__` raises before any model
        work (unknown task or mode, wrong media, values out of range), plus missing or unreadable media files (each
        video's container and first frame, each image decoded: `media.probe_video`, `media.probe_image`) and, with
        context windows, a source longer than `MAX_WINDOWED_FRAMES` (`media.check_video_length`). For front ends
        that want to fail before loading 30 GB of weights.
        """
        args = cls._bind_call(kwargs)
        _, _, videos = cls._check_call(args)
        pipeline_inputs.probe_media(args, videos, MAX_WINDOWED_FRAMES)

    @classmethod
    def estimate_tokens(cls, media_sizes: dict[str, tuple[int, int]] | None = None, **kwargs) -> tuple[int, tuple]:
        """The transformer sequence length of a call's longest guidance branch, without a model or the media.

        Each stream (target, every condition of the branch's combo) counts `T_lat x H/16 x W/16` tokens, a reference
        image one latent frame. `media_sizes` maps an input name (`video`, `video[1]`, `image`, `images[0]`) to its
        (width, height); an input without one is bounded by a `max_image_size` square and a source video by
        `num_frames` (with context windows, by `context_frames`: one forward sees one window), so the estimate is an
        upper bound. Returns (tokens, the largest (T_lat, H/16, W/16) grid of any stream) for the rope-table check.
        The arguments are assumed valid (`validate_call`).
        """
        return pipeline_inputs.estimate_tokens(cls._bind_call(kwargs), media_sizes)

    @classmethod
    def _call_default(cls, name: str) -> Any:
        return inspect.signature(cls.__call__).parameters[name].default

    @classmethod
    def _bind_call(cls, kwargs: dict[str, Any]) -> dict[str, Any]:
        """`kwargs` bound to `__call__`'s signature with its defaults filled in (a TypeError names an unknown one)."""
        bound = inspect.signature(cls.__call__).bind(None, **kwargs)
        bound.apply_defaults()
        return bound.arguments

    @classmethod
    def _check_call(
        cls, args: dict[str, Any], limits: tuple[int, int, int] = pipeline_inputs.DEFAULT_LIMITS
    ) -> tuple[TaskSpec, GuidanceMode, list]:
        """Resolve the task, the guidance mode and the videos of a call's arguments, then `check_inputs` them."""
        return pipeline_inputs.check_call(
            args, limits, allowed_tensor_inputs=cls._callback_tensor_inputs,
            omega_txt_default=cls._call_default("omega_txt"), max_windowed_frames=MAX_WINDOWED_FRAMES,
        )

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
        return build_conditions(
            video_latents, image_latent, reference_latents, max_trained_src_id=self.config.max_trained_src_id,
            interpolate_src_id=self.config.interpolate_src_id, use_src_id_rotary_emb=self.config.use_src_id_rotary_emb,
        )

    def _offload_if_hooked(self, module: torch.nn.Module) -> None:
        """Send `module` back to the CPU now if `enable_model_cpu_offload` manages it (its hook reloads it later)."""
        for hook in getattr(self, "_all_hooks", None) or []:
            if getattr(hook, "model", None) is module:
                hook.offload()

    def _scheduler_for_call(self, flow_shift: float):
        return scheduler_for_call(self.scheduler, self.config.use_unipc, flow_shift)

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

    def _limits(self, expert: BerniniTransformer3DModel) -> tuple[int, int, int]:
        """(the experts' `rope_max_seq_len`, the VAE's temporal and spatial factors): what `check_inputs` bounds."""
        check_experts(self.transformer, self.transformer_2, self.config.boundary_ratio)
        return expert.config.rope_max_seq_len, self.vae_scale_factor_temporal, self.vae_scale_factor_spatial

    def _latent_shape(self, batch_size: int, frames: int, height: int, width: int, latents) -> tuple[int, ...]:
        """The shape of the call's latents `[batch, C, T_lat, H/8, W/8]`; given `latents` must have it."""
        shape = (
            batch_size,
            self._first_expert().config.in_channels,
            (frames - 1) // self.vae_scale_factor_temporal + 1,
            height // self.vae_scale_factor_spatial,
            width // self.vae_scale_factor_spatial,
        )
        if latents is not None and tuple(latents.shape) != shape:
            raise ValueError(f"`latents` must have shape {shape}, got {tuple(latents.shape)}.")
        return shape

    def _encode_call_text(
        self, prompt, negative_prompt, task: TaskType, system_prompt, num_videos_per_prompt: int, prompt_embeds,
        negative_prompt_embeds, max_sequence_length: int, device: torch.device, dtype: torch.dtype,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Step 2: each positive text with the task prefix, the negatives raw; precomputed embeddings as given."""
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
        return self.encode_prompt(
            positive, negative, True, num_videos_per_prompt, prompt_embeds, negative_prompt_embeds,
            max_sequence_length, device, dtype, None,
        )

    def prepare_conditions(
        self, mode: GuidanceMode, context: windows.ContextWindows, video_pixels: list, image_pixels, reference_pixels,
        device: torch.device,
    ) -> list[dict[Combo, _Conditions]]:
        """Step 3: VAE-encode the media the mode reads, each on its own (media it never looks at, e.g. references under
        v2v_chain's V, are not encoded), and group them into its combos, per context window. The batch shares them."""
        video_pixels, image_pixels, reference_pixels = drop_unused_media(
            mode, video_pixels, image_pixels, reference_pixels
        )
        video_latents = [self.encode_condition(p, device) for p in video_pixels]
        image_latent = None if image_pixels is None else self.encode_condition(image_pixels, device)
        reference_latents = [self.encode_condition(p, device) for p in reference_pixels]
        combos = window_conditions(self.build_conditions, context, video_latents, image_latent, reference_latents)
        if video_pixels or image_pixels is not None or reference_pixels:
            self._offload_if_hooked(self.vae)  # under model offload it would otherwise sit out the whole loop
        return combos

    def _first_expert(self, required: bool = True) -> BerniniTransformer3DModel | None:
        """The high-noise expert, else the low-noise one (they share their config); `required` raises without one."""
        expert = self.transformer if self.transformer is not None else self.transformer_2
        if expert is None and required:
            raise ValueError(
                "This pipeline has no expert (`transformer` and `transformer_2` are None); it can only `encode_prompt`."
            )
        return expert

    @torch.no_grad()
    @pipeline_inputs.with_call_defaults
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
                (This and the other size arguments default to the pipeline's `call_defaults` when it has them: the
                tiny model's 9 frames at 64x96, `max_image_size` 96, 4 steps.)
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

        return run_phases(self._call_phases(dict(locals())))

    def call_phases(self, **kwargs):
        """The call `self(**kwargs)` as a generator of [`CallPhase`]s: it pauses after the conditions are prepared
        ("prepared", with the bytes its state holds), where the expert changes ("first_expert_done", two-expert plans
        only) and before decoding ("denoised"); its return value (`StopIteration.value`, or [`run_phases`]) is the
        call's. Running several calls' phases interleaved (all "prepared", then all first-expert steps, ...) gives
        each the output it has alone: a call keeps its own scheduler, guidance state and latents. Under the
        `low_ram` profile this is how a batch reads each expert once. Step caches keep state across calls, so they
        must be off when calls interleave.
        """
        arguments = inspect.signature(type(self).__call__).bind(self, **kwargs)
        arguments.apply_defaults()
        call = dict(arguments.arguments)
        call.update({k: v for k, v in (self.config.get("call_defaults") or {}).items() if k not in kwargs})
        callback = call["callback_on_step_end"]
        if isinstance(callback, (PipelineCallback, MultiPipelineCallbacks)):
            call["callback_on_step_end_tensor_inputs"] = callback.tensor_inputs
        return self._call_phases(call)

    @torch.no_grad()
    def _call_phases(self, call: dict[str, Any]):
        (
            prompt,
            task_type,
            video,
            image,
            images,
            negative_prompt,
            system_prompt,
            guidance_mode,
            num_frames,
            height,
            width,
            max_image_size,
            fps,
            num_inference_steps,
            flow_shift,
            omega_vid,
            omega_img,
            omega_txt,
            omega_scale,
            eta,
            momentum,
            norm_threshold,
            guidance_scale,
            num_videos_per_prompt,
            generator,
            latents,
            prompt_embeds,
            negative_prompt_embeds,
            output_type,
            return_dict,
            attention_kwargs,
            callback_on_step_end,
            callback_on_step_end_tensor_inputs,
            max_sequence_length,
            context_frames,
            context_overlap,
        ) = (call[name] for name in _CALL_NAMES)

        # 1. Check inputs and read the media, before any model work.
        given = {"prompt_embeds": prompt_embeds, "negative_prompt_embeds": negative_prompt_embeds, "latents": latents}
        given = [name for name, value in given.items() if value is not None]
        expert = self._first_expert()
        limits = self._limits(expert)
        spec, mode, videos = self._check_call(call, limits)
        acceleration.check_cache_for_call(self, mode, num_inference_steps)  # a MagCache table of another mode/steps
        if prompt_embeds is not None and prompt_embeds.shape[-1] != expert.config.text_dim:
            raise ValueError(
                f"`prompt_embeds` must have the experts' text_dim {expert.config.text_dim} as last size, got shape "
                f"{tuple(prompt_embeds.shape)}."
            )
        context_frames = None if context_frames is None else int(context_frames)  # a numpy integer is fine too
        context_overlap = int(context_overlap)
        omega_txt = omega_txt if guidance_scale is None else guidance_scale
        omegas = {"omega_vid": omega_vid, "omega_img": omega_img, "omega_txt": omega_txt}
        if spec.is_image:
            num_frames = 1
        max_image_size = min(max_image_size, max_pixels(limits))
        video_pixels, image_pixels, reference_pixels = self.load_media(
            videos, image, images, max_image_size, fps, num_frames, windowed=context_frames is not None
        )
        frames, height, width = self.output_geometry(spec, video_pixels, image_pixels, num_frames, height, width)
        num_prompts = len(prompt_embeds) if prompt_embeds is not None else 1 if isinstance(prompt, str) else len(prompt)
        latent_shape = self._latent_shape(num_prompts * num_videos_per_prompt, frames, height, width, latents)
        context = windows.context_windows(latent_shape[2], context_frames, context_overlap)
        self._guidance_scale, self._attention_kwargs = omega_txt, attention_kwargs
        self._current_timestep, self._interrupt = None, False
        device, dtype = self._execution_device, expert.dtype

        # 2. Encode the text: each positive with the task prefix, the negatives raw; precomputed embeddings as given.
        prompt_embeds, negative_prompt_embeds = self._encode_call_text(
            prompt, negative_prompt, spec.task, system_prompt, num_videos_per_prompt, prompt_embeds,
            negative_prompt_embeds, max_sequence_length, device, dtype,
        )

        # 3. Encode the conditions the mode reads and group them into its combos, per context window.
        window_combos = self.prepare_conditions(mode, context, video_pixels, image_pixels, reference_pixels, device)

        # 4. Timesteps with the official flow sigmas and this call's shift.
        scheduler = self._scheduler_for_call(flow_shift)
        timesteps, _ = set_official_timesteps(scheduler, num_inference_steps, device)
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
        settings = {"eta": eta, "momentum": momentum, "norm_threshold": norm_threshold}
        guidance = Guidance(mode, **settings)
        per_window = window_branches(mode, context, window_combos, guidance, settings)
        if len(context) > 1:
            logger.info(
                f"{len(context)} context windows of {context_frames} frames over {latent_shape[2]} latent frames: "
                f"{len(context)} x {guidance.spec.forwards_per_step} forwards per step."
            )

        # 7. Denoising loop; a non-finite result is an error, never a video. It pauses where the expert changes.
        blend = context.weights.to(device=device, dtype=torch.float32)
        switch = next((i for i, (e, _) in enumerate(plan) if e != plan[0][0]), len(plan))
        state = (omega_txt, attention_kwargs, len(timesteps))
        yield CallPhase("prepared", _tensor_bytes((latents, prompt_embeds, negative_prompt_embeds, window_combos)))
        bad_step, causes = None, []
        progress_bar = self.progress_bar(total=len(plan))  # one bar for the call's steps, both experts' parts
        try:
            for start, stop in ((0, switch), (switch, len(plan))):
                if start == stop:
                    continue
                if start > 0:
                    yield CallPhase("first_expert_done", 0)
                # Another call may have run in between: this call's own settings come back.
                self._guidance_scale, self._attention_kwargs, self._num_timesteps = state
                latents, bad_step, more = self.denoise(
                    latents, scheduler, plan, per_window, blend, prompt_embeds, negative_prompt_embeds,
                    attention_kwargs, callback_on_step_end, callback_on_step_end_tensor_inputs, dtype, start, stop,
                    progress_bar=progress_bar,
                )
                causes += more
                if bad_step is not None:
                    break
        finally:
            progress_bar.close()
        if bad_step is not None:
            self.maybe_free_model_hooks()
            message = self._non_finite_message(bad_step, len(timesteps), plan, given, causes)
            raise NonFiniteOutputError(message, bad_step)

        yield CallPhase("denoised", 0)
        self._guidance_scale, self._attention_kwargs, self._num_timesteps = state

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
