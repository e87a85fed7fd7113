"""BerniniTransformer3DModel: diffusers' Wan transformer plus Bernini-R's multi-stream conditioning.

The checkpoints are key-identical to `WanTransformer3DModel`; Bernini-R adds no weight. What it adds
(docs/design.md#streams-and-source-ids):
clean condition latents (source videos, reference images) are patch-embedded one stream at a time and placed before
the noisy target in one sequence with full attention and one timestep for all tokens; each stream gets its own 3D
RoPE grid from (0, 0, 0) rotated by a constant source-id phase; the output keeps the target tokens only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from diffusers import ContextParallelConfig, WanTransformer3DModel
from diffusers.hooks import (
    FasterCacheConfig,
    FirstBlockCacheConfig,
    PyramidAttentionBroadcastConfig,
)
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.utils import apply_lora_scale
from torch.distributed.fsdp import FSDPModule


def assign_source_ids(num_sources: int, max_trained_src_id: int = 5, interpolate: bool = True) -> list[float]:
    """Source ids 1..n of the condition streams; past `max_trained_src_id` they are spread over [1, max] instead."""
    if num_sources > max_trained_src_id and interpolate:
        return torch.linspace(1.0, float(max_trained_src_id), num_sources, dtype=torch.float64).tolist()
    return [float(i) for i in range(1, num_sources + 1)]


def source_id_phase(source_id: float, head_dim: int, theta: float = 10000.0) -> torch.Tensor:
    """Angles `s * theta^(-2k/head_dim)` of the 1-D RoPE over the whole head at position s, one per pair k (float64)."""
    k = torch.arange(0, head_dim, 2, dtype=torch.float64)
    return source_id * theta ** (-k / head_dim)


def rotate_rope(freqs_cos: torch.Tensor, freqs_sin: torch.Tensor, source_id: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Add the source-id phase to every pair's angle of diffusers' interleaved real RoPE (`[1, L, 1, D]` each)."""
    head_dim = freqs_cos.shape[-1]
    # pair k sits at positions 2k and 2k+1 of diffusers' repeat-interleaved layout: (D/2,) -> (D,)
    phase = source_id_phase(source_id, head_dim).repeat_interleave(2).to(freqs_cos.device)
    cos64, sin64 = freqs_cos.double(), freqs_sin.double()
    # cos(a+b), sin(a+b): the complex product exp(i a) * exp(i b), in float64 as upstream
    cos = cos64 * phase.cos() - sin64 * phase.sin()
    sin = sin64 * phase.cos() + cos64 * phase.sin()
    return cos.to(freqs_cos.dtype), sin.to(freqs_sin.dtype)


# Bounds of an expert config, checked before the model is built: a hostile or corrupt config.json (200000 layers,
# a RoPE table of 1e9 positions) would otherwise exhaust memory building it. Generous: Wan 2.2 A14B is 40 layers of
# 40 x 128 heads, FFN 13824, text 4096, RoPE 1024; the largest parameter count allowed is 7x its 14B.
CONFIG_BOUNDS: dict[str, tuple[int, int]] = {
    "num_layers": (1, 200),
    "num_attention_heads": (1, 256),
    "attention_head_dim": (2, 1024),
    "in_channels": (1, 4096),
    "out_channels": (1, 4096),
    "text_dim": (1, 65536),
    "freq_dim": (2, 65536),
    "ffn_dim": (1, 262144),
    "rope_max_seq_len": (1, 65536),
    "image_dim": (1, 65536),
    "added_kv_proj_dim": (1, 65536),
    "pos_embed_seq_len": (1, 1 << 20),
}
MAX_PARAMETERS = 100_000_000_000


def check_config(config: dict[str, Any], where: str = "the transformer config") -> None:
    """Refuse an expert config whose sizes are out of [`CONFIG_BOUNDS`] or whose blocks would hold more than
    `MAX_PARAMETERS` weights, before anything is allocated.

    Raises:
        ValueError: naming the key, its value and the allowed range.
    """
    for key, (low, high) in CONFIG_BOUNDS.items():
        value = config.get(key)
        if value is None and key in ("out_channels", "image_dim", "added_kv_proj_dim", "pos_embed_seq_len"):
            continue  # optional (out_channels falls back to in_channels)
        if value is None:
            continue  # diffusers' default
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise ValueError(
                f"{where}: `{key}`={value!r} is out of range; expected an integer in [{low}, {high}] (Wan 2.2 A14B: "
                f"{_A14B.get(key, 'unset')}). The config.json is corrupt or not a Wan transformer's."
            )
    patch = config.get("patch_size", (1, 2, 2))
    if not isinstance(patch, (list, tuple)) or len(patch) != 3 or not all(
        isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= 16 for v in patch
    ):
        raise ValueError(f"{where}: `patch_size`={patch!r} must be 3 integers in [1, 16] (Wan: [1, 2, 2]).")
    inner = config.get("num_attention_heads", 40) * config.get("attention_head_dim", 128)
    per_block = 8 * inner * inner + 2 * inner * config.get("ffn_dim", 13824)  # attention q/k/v/o twice, the FFN
    total = config.get("num_layers", 40) * per_block
    if total > MAX_PARAMETERS:
        raise ValueError(
            f"{where}: {config.get('num_layers', 40)} layers of width {inner} and FFN {config.get('ffn_dim', 13824)} "
            f"would hold about {total / 1e9:.0f}B weights, more than the {MAX_PARAMETERS / 1e9:.0f}B allowed; the "
            "config.json is corrupt or not a Bernini/Wan expert's."
        )


_A14B = {
    "num_layers": 40, "num_attention_heads": 40, "attention_head_dim": 128, "in_channels": 16, "out_channels": 16,
    "text_dim": 4096, "freq_dim": 256, "ffn_dim": 13824, "rope_max_seq_len": 1024,
}  # fmt: skip


class BerniniTransformer3DModel(WanTransformer3DModel):
    r"""
    The Bernini-R renderer expert: a [`WanTransformer3DModel`] that also attends to clean condition latents.

    Called with `WanTransformer3DModel`'s own arguments and no conditions it is exactly `WanTransformer3DModel`.
    With `condition_latents` (each `[B, C, T_i, H_i, W_i]`, any size) and their `condition_source_ids`, the streams
    are packed before the target and the prediction for the target alone is returned.
    """

    # Sequence parallelism is declared here and applied by `bernini_diffusers.parallel`. Only the attention modules
    # named below mix tokens across the packed sequence; every other layer works token by token (cross-attention
    # reads the whole text). When `sequence_parallel` is set, `forward` hands the packed tokens and their RoPE to its
    # `split` after patch-embedding and the output head's per-token projections to its `gather`; the named modules
    # get a processor that attends over the whole sequence.
    _sequence_parallel_attention: tuple[str, ...] = ("attn1",)
    sequence_parallel: Any = None

    # diffusers' context-parallel plan for Wan splits the target's tokens at `blocks.0` and the output of `rope`, and
    # gathers after `proj_out`. None of it fits the packed sequence: its RoPE is built per stream, and the output head
    # keeps the target tokens before `proj_out`, which on a shard would cut the wrong tokens. So there is no plan, and
    # `enable_parallelism` refuses context parallelism; sequence parallelism is `BerniniPipeline.enable_parallelism`.
    _cp_plan = None

    # Set by `bernini_diffusers.formats` (the loading floor), which reads every single-file format; see
    # `from_single_file`. diffusers' own single-file loader is never used for these files: it drops the scales of
    # scaled-fp8 files without a word and cannot read the renderer's layout.
    _single_file_loader: Any = None

    @classmethod
    def from_single_file(cls, pretrained_model_link_or_path_or_dict=None, **kwargs):
        r"""
        Load one expert from a single checkpoint file, with diffusers' signature; the format is read from the file.

        Accepted (docs/checkpoints.md): the official renderer checkpoint (`ema.diff_dec.transformer.*`: one file, an
        index or a folder of shards), Wan's original keys with or without ComfyUI's `model.diffusion_model.` prefix,
        diffusers' layout, in float32/float16/bfloat16, plain float8 (e4m3fn, e5m2), ComfyUI's scaled float8 (both
        formats; the scales are applied exactly) and GGUF (kept quantized through diffusers'
        `GGUFQuantizationConfig`). Pickles and quantizations this package does not implement are refused.

        Args:
            pretrained_model_link_or_path_or_dict (`str` or `os.PathLike`):
                A local `.safetensors`/`.gguf` file (or index, or shard folder), or a Hub file
                (`https://huggingface.co/<owner>/<repo>/blob/<revision>/<file>` or `owner/repo[@revision]/<file>`).
            config (`str`, `os.PathLike` or `dict`, *optional*):
                A diffusers folder or repo id holding the transformer config (in `subfolder`, by default
                `transformer`), or the config dict. Without it the Wan2.2-A14B expert and Wan2.1-1.3B configs are
                recognised from the weights' shapes; any other shape needs it.
            subfolder (`str`, *optional*):
                The config's subfolder; `"transformer"`/`"transformer_2"` also picks the expert of an official file
                that holds both.
            dtype (`torch.dtype`, *optional*):
                The weights' dtype (`torch_dtype` is diffusers' older name); float32 by default. Scaled float8 is
                dequantized to it exactly (`float32(weight) * scale`, rounded once); GGUF computes in it.
            quantization_config (*optional*):
                A diffusers quantization config; a GGUF file gets a `GGUFQuantizationConfig(compute_dtype=dtype)`
                without one.
            keep_float8 (`bool`, defaults to `False`):
                Keep a float8 file's Linear weights in float8 (one byte each) and dequantize them per layer at
                compute (`float32(weight) * scale` to `dtype`): the same output, bit for bit, at half of bf16's bytes.
            device, revision, cache_dir, local_files_only, token, force_download, proxies:
                As in diffusers.

        Raises:
            ValueError: a pickle, a quantization this package does not load (naming the format and a layer), missing
                or unexpected keys (named), or shapes that need `config`.
        """
        if cls._single_file_loader is None:
            raise ValueError(
                "Single-file loading is provided by `bernini_diffusers.formats`; import `BerniniTransformer3DModel` "
                "from `bernini_diffusers` (which loads it) or import `bernini_diffusers.formats` first."
            )
        return cls._single_file_loader(pretrained_model_link_or_path_or_dict, **kwargs)

    @classmethod
    def load_config(cls, pretrained_model_name_or_path, return_unused_kwargs=False, return_commit_hash=False, **kwargs):
        """diffusers' `load_config`, where `from_pretrained` and the checkpoint loader read `config.json`, followed by
        [`check_config`] naming the file: a config out of bounds is refused before any model is built."""
        outputs = super().load_config(
            pretrained_model_name_or_path, return_unused_kwargs=return_unused_kwargs,
            return_commit_hash=return_commit_hash, **kwargs,
        )  # fmt: skip
        config = outputs[0] if isinstance(outputs, tuple) else outputs
        where = Path(str(pretrained_model_name_or_path), kwargs.get("subfolder") or "", "config.json")
        check_config(config, f"'{where}'")
        return outputs

    @classmethod
    def from_config(cls, config=None, return_unused_kwargs=False, **kwargs):
        """diffusers' `from_config` (which `from_pretrained` and the checkpoint loader build through), after
        [`check_config`]: a config out of bounds is refused before any memory is allocated."""
        if isinstance(config, dict):
            where = f"transformer config of {config['_name_or_path']!r}" if config.get("_name_or_path") else None
            check_config({**config, **{k: v for k, v in kwargs.items() if k in CONFIG_BOUNDS}}, where or "the "
                         "transformer config")  # fmt: skip
        return super().from_config(config, return_unused_kwargs=return_unused_kwargs, **kwargs)

    def enable_parallelism(self, *, config, cp_plan=None):
        r"""
        diffusers' model parallelism, without context parallelism: the packed sequence has no context-parallel plan.

        Raises:
            ValueError: for a config with a `context_parallel_config` (or a `ContextParallelConfig`), before anything
                is changed; split the sequence with [`~BerniniPipeline.enable_parallelism`] instead.
        """
        if (
            isinstance(config, ContextParallelConfig)
            or getattr(config, "context_parallel_config", None) is not None
            or cp_plan is not None
        ):
            raise ValueError(
                f"`config`={config!r}: BerniniTransformer3DModel does not support diffusers' context parallelism "
                "(its plan splits the target sequence, not the packed condition + target sequence); use "
                "`BerniniPipeline.enable_parallelism(ulysses_degree=...)` for sequence parallelism."
            )
        return super().enable_parallelism(config=config)

    def enable_cache(self, config) -> None:
        r"""
        diffusers' [`~CacheMixin.enable_cache`] for the caches whose state is kept per `cache_context`: FirstBlockCache,
        TaylorSeer, MagCache (`BerniniPipeline` names each guidance branch's context).

        Raises:
            ValueError: for FasterCache and Pyramid Attention Broadcast. Their hooks keep one state for every call of
                the model, so the guidance branches (whose packed sequences differ in length) would reuse each other's
                attention outputs; FasterCache also expects the unconditional and conditional inputs batched in one
                forward, while `BerniniPipeline` runs one forward per branch.
        """
        if isinstance(config, (FasterCacheConfig, PyramidAttentionBroadcastConfig)):
            raise ValueError(
                f"`config` is a {type(config).__name__}, whose state is shared by every guidance branch: the branches "
                "would reuse each other's attention. Use FirstBlockCacheConfig, TaylorSeerCacheConfig or "
                "MagCacheConfig, which keep one state per guidance branch."
            )
        super().enable_cache(config)

    @apply_lora_scale("attention_kwargs")
    def forward(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.LongTensor,
        encoder_hidden_states: torch.Tensor,
        encoder_hidden_states_image: torch.Tensor | None = None,
        return_dict: bool = True,
        attention_kwargs: dict[str, Any] | None = None,
        condition_latents: Sequence[torch.Tensor] | None = None,
        condition_source_ids: Sequence[float] | None = None,
    ) -> torch.Tensor | Transformer2DModelOutput:
        r"""
        Args:
            hidden_states (`torch.Tensor` of shape `(batch_size, num_channels, num_frames, height, width)`):
                The noisy target latent.
            timestep (`torch.LongTensor` of shape `(batch_size,)`):
                The timestep, shared by the target and every condition token.
            encoder_hidden_states (`torch.Tensor` of shape `(batch_size, sequence_len, text_dim)`):
                The text embeddings.
            encoder_hidden_states_image (`torch.Tensor`, *optional*):
                Image embeddings of Wan's I2V models; only accepted without conditions.
            return_dict (`bool`, defaults to `True`):
                Whether to return a [`~models.modeling_outputs.Transformer2DModelOutput`] instead of a tuple.
            attention_kwargs (`dict`, *optional*):
                As in `WanTransformer3DModel`: its `"scale"` scales the LoRA layers for this call, with or without
                conditions.
            condition_latents (`list[torch.Tensor]`, *optional*):
                Clean condition latents, each `(batch_size or 1, num_channels, frames_i, height_i, width_i)`, packed in
                this order before the target.
            condition_source_ids (`list[float]`, *optional*):
                The source id of each condition stream (the target's is 0). Fractional ids are allowed.
        """
        if not condition_latents and self.sequence_parallel is None:
            # `attention_kwargs` no longer holds "scale" here (the decorator took it), so the parent's own
            # `apply_lora_scale` scales by 1, a no-op: the LoRA scale is applied once.
            return super().forward(
                hidden_states,
                timestep,
                encoder_hidden_states,
                encoder_hidden_states_image=encoder_hidden_states_image,
                return_dict=return_dict,
                attention_kwargs=attention_kwargs,
            )
        condition_latents = list(condition_latents or [])
        if condition_latents and (condition_source_ids is None or len(condition_source_ids) != len(condition_latents)):
            raise ValueError(
                f"`condition_source_ids` must give one id per condition latent ({len(condition_latents)}), "
                f"got {condition_source_ids!r}."
            )
        condition_source_ids = list(condition_source_ids or []) if condition_latents else []
        if encoder_hidden_states_image is not None:
            raise ValueError(
                "`encoder_hidden_states_image` cannot be combined with `condition_latents` or sequence parallelism."
            )
        if timestep.ndim != 1:
            raise ValueError(f"`timestep` must hold one value per sample, got shape {tuple(timestep.shape)}.")
        if self.sequence_parallel is not None and isinstance(self._cache_config, FirstBlockCacheConfig):
            # Each process would judge the first block's change on its own slice of the tokens; processes that
            # decide differently then wait on different collectives.
            raise ValueError(
                "FirstBlockCache cannot run under Ulysses sequence parallelism (each process would decide on its own "
                "tokens); call `disable_cache()` on the experts or use `branch_degree` instead of `ulysses_degree`."
            )
        if isinstance(self, FSDPModule) and isinstance(self._cache_config, FirstBlockCacheConfig):
            # Branch groups would skip blocks on their own branch's judgement, and a skipped block issues no
            # all-gather: the data group's collectives would part ways.
            raise ValueError(
                "FirstBlockCache cannot run with sharded weights (`shard_weights=True`): a block one rank skips "
                "issues no all-gather; call `disable_cache()` on the experts or use MagCache or TaylorSeer."
            )

        batch_size, _, num_frames, height, width = hidden_states.shape
        p_t, p_h, p_w = self.config.patch_size
        grid = (num_frames // p_t, height // p_h, width // p_w)
        dtype = self.patch_embedding.weight.dtype

        # 1. Patch-embed each stream on its own; conditions first, the target last.
        streams = [*condition_latents, hidden_states]
        source_ids = [*condition_source_ids, 0.0]
        tokens, rope_cos, rope_sin = [], [], []
        for latent, source_id in zip(streams, source_ids):
            latent = latent.to(dtype).expand(batch_size, -1, -1, -1, -1)
            freqs_cos, freqs_sin = self.rope(latent)  # (1, L_i, 1, D) each, grid from (0, 0, 0)
            if source_id != 0:
                freqs_cos, freqs_sin = rotate_rope(freqs_cos, freqs_sin, float(source_id))
            rope_cos.append(freqs_cos)
            rope_sin.append(freqs_sin)
            # (B, C, T, H, W) -> (B, inner, T', H', W') -> (B, L_i, inner)
            tokens.append(self.patch_embedding(latent).flatten(2).transpose(1, 2))
        hidden = torch.cat(tokens, dim=1).contiguous()  # (B, sum L_i, inner)
        rotary_emb = (torch.cat(rope_cos, dim=1), torch.cat(rope_sin, dim=1))
        num_target_tokens = tokens[-1].shape[1]
        if self.sequence_parallel is not None:
            # (B, S, inner) -> (B, S_local, inner): this process's slice of the tokens, RoPE sliced alike
            hidden, rotary_emb = self.sequence_parallel.split(hidden, rotary_emb)

        # 2. One timestep embedding for all tokens, and the text.
        temb, timestep_proj, encoder_hidden_states, _ = self.condition_embedder(timestep, encoder_hidden_states)
        timestep_proj = timestep_proj.unflatten(1, (6, -1))  # (B, 6 * inner) -> (B, 6, inner)

        # 3. Full attention over every stream.
        for block in self.blocks:
            if torch.is_grad_enabled() and self.gradient_checkpointing:
                hidden = self._gradient_checkpointing_func(block, hidden, encoder_hidden_states, timestep_proj, rotary_emb)
            else:
                hidden = block(hidden, encoder_hidden_states, timestep_proj, rotary_emb)

        # 4. The output head for the target tokens. The head works token by token, so under sequence parallelism each
        # process projects its own slice and only the projections, p_t * p_h * p_w * C_out wide instead of `inner`,
        # are gathered (as upstream).
        if self.sequence_parallel is None:
            output = self._output_head(hidden[:, -num_target_tokens:], temb, grid)
        else:
            projected = self.sequence_parallel.gather(self._project_out(hidden, temb))  # (B, S_local, P) -> (B, S, P)
            output = self._unpatchify(projected[:, -num_target_tokens:], grid)
        if not return_dict:
            return (output,)
        return Transformer2DModelOutput(sample=output)

    def _output_head(self, hidden: torch.Tensor, temb: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        """Modulated norm, projection and unpatchify: (B, L, inner) -> (B, C_out, T, H, W)."""
        return self._unpatchify(self._project_out(hidden, temb), grid)

    def _project_out(self, hidden: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        """Modulated norm and projection, token by token: (B, L, inner) -> (B, L, p_t * p_h * p_w * C_out)."""
        shift, scale = (self.scale_shift_table.to(temb.device) + temb.unsqueeze(1)).chunk(2, dim=1)
        shift, scale = shift.to(hidden.device), scale.to(hidden.device)
        hidden = (self.norm_out(hidden.float()) * (1 + scale) + shift).type_as(hidden)
        return self.proj_out(hidden)

    def _unpatchify(self, hidden: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        """(B, T' * H' * W', p_t * p_h * p_w * C_out) -> (B, C_out, T, H, W)."""
        batch_size = hidden.shape[0]
        p_t, p_h, p_w = self.config.patch_size
        # (B, T', H', W', p_t, p_h, p_w, C) -> (B, C, T', p_t, H', p_h, W', p_w) -> (B, C, T, H, W)
        hidden = hidden.reshape(batch_size, *grid, p_t, p_h, p_w, -1)
        hidden = hidden.permute(0, 7, 1, 4, 2, 5, 3, 6)
        return hidden.flatten(6, 7).flatten(4, 5).flatten(2, 3)


def num_tokens(latent_shape: Sequence[int], patch_size: Sequence[int] = (1, 2, 2)) -> int:
    """Tokens of one stream of latent shape `(..., T, H, W)`."""
    return math.prod(size // patch for size, patch in zip(latent_shape[-3:], patch_size))
