"""diffusers' runtime machinery on both experts: cache hooks per guidance branch, the Wan LoRA loader, no
context-parallel plan, and an attention backend that stays the model's own."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from diffusers.hooks import FasterCacheConfig, FirstBlockCacheConfig, PyramidAttentionBroadcastConfig

from bernini_diffusers.guidance import GUIDANCE_SPECS
from bernini_diffusers.pipeline_bernini import BerniniPipeline, branch_name
from bernini_diffusers.tasks import GuidanceMode
from bernini_diffusers.testing import get_tiny_components, tiny_transformer

# Timesteps ~999, 952, 882, 769, 555 with the default shift: three steps on the high-noise expert, two on the low.
SMALL = dict(num_frames=5, height=32, width=48, num_inference_steps=5, output_type="latent")
EXPERTS = ("transformer", "transformer_2")


@pytest.fixture(scope="module")
def pipe():
    """A two-expert tiny pipeline of its own: the tests add and remove hooks and adapters on it."""
    return BerniniPipeline(**get_tiny_components())


@pytest.fixture(scope="module")
def media(media_dir):
    """rv2v's media: with a video and a reference every combo differs, so every guidance mode runs all its branches."""
    return {"task_type": "rv2v", "video": str(media_dir / "source.mp4"), "images": [str(media_dir / "ref_a.png")]}


def _run(pipe, media, mode, **kwargs):
    generator = torch.Generator().manual_seed(0)
    return pipe("a red ball", guidance_mode=mode, generator=generator, **media, **SMALL, **kwargs).frames


class FullForwards:
    """Counts, per expert, the forwards that ran the whole block stack (the last block's feed-forward ran)."""

    def __init__(self, pipe):
        self.counts = dict.fromkeys(EXPERTS, 0)
        self.handles = [
            getattr(pipe, name).blocks[-1].ffn.register_forward_hook(lambda *_, name=name: self._count(name))
            for name in EXPERTS
        ]

    def _count(self, name):
        self.counts[name] += 1

    def remove(self):
        for handle in self.handles:
            handle.remove()


@pytest.fixture
def cached(pipe):
    """Enable a cache config on both experts for one test; always disabled afterwards."""

    def enable(config_factory):
        for name in EXPERTS:
            getattr(pipe, name).enable_cache(config_factory())

    yield enable
    for name in EXPERTS:
        model = getattr(pipe, name)
        if model.is_cache_enabled:
            model.disable_cache()


def _contexts_per_step(pipe, seen):
    """A step-end callback that records the cache-context names each expert's FirstBlockCache holds state for."""

    def callback(p, step, timestep, kwargs):
        for name in EXPERTS:
            hook = getattr(p, name).blocks[0]._diffusers_hook.get_hook("fbc_leader_block_hook")
            seen[name] |= set(hook.state_manager._state_cache)
        return kwargs

    return callback


@pytest.mark.parametrize("mode", list(GuidanceMode), ids=lambda m: m.value)
def test_first_block_cache_on_both_experts(pipe, media, cached, mode):
    branches = GUIDANCE_SPECS[mode].branches
    names = {branch_name(b) for b in branches}
    assert len(names) == len(branches)  # one cache state per branch
    spy = FullForwards(pipe)
    try:
        reference = _run(pipe, media, mode)
        uncached = dict(spy.counts)
        # Both experts run, every branch once per step.
        assert all(count > len(branches) and count % len(branches) == 0 for count in uncached.values())

        # Threshold 0: every block always runs, so the result is the uncached one, bit for bit.
        cached(lambda: FirstBlockCacheConfig(threshold=0.0))
        spy.counts = dict.fromkeys(EXPERTS, 0)
        assert torch.equal(_run(pipe, media, mode), reference)
        assert spy.counts == uncached

        # A threshold nothing reaches: each branch runs the whole stack once per expert, on its first step there
        # (no state carried over from another branch, or from the high-noise expert to the low-noise one).
        for name in EXPERTS:
            getattr(pipe, name).disable_cache()
        cached(lambda: FirstBlockCacheConfig(threshold=1e9))
        spy.counts = dict.fromkeys(EXPERTS, 0)
        seen: dict[str, set[str]] = {name: set() for name in EXPERTS}
        fast = _run(pipe, media, mode, callback_on_step_end=_contexts_per_step(pipe, seen))
        fast_counts = dict(spy.counts)
        # The call leaves no state behind: the next call starts from scratch and gives the same result.
        again = _run(pipe, media, mode)
    finally:
        spy.remove()
    assert fast_counts == {"transformer": len(branches), "transformer_2": len(branches)}
    assert seen == {"transformer": names, "transformer_2": names}
    assert torch.isfinite(fast).all() and not torch.equal(fast, reference)
    assert torch.equal(again, fast)


def test_branches_sharing_a_forward_share_its_context(pipe, media_dir, cached):
    # rv2v guidance with references but no video: V has no stream, so its uncond branch is the none branch's forward.
    refs_only = {"task_type": "r2v", "images": [str(media_dir / "ref_a.png")]}
    spy = FullForwards(pipe)
    try:
        _run(pipe, refs_only, "rv2v")
        uncached = dict(spy.counts)
        cached(lambda: FirstBlockCacheConfig(threshold=0.0))
        spy.counts = dict.fromkeys(EXPERTS, 0)
        seen: dict[str, set[str]] = {name: set() for name in EXPERTS}
        _run(pipe, refs_only, "rv2v", callback_on_step_end=_contexts_per_step(pipe, seen))
    finally:
        spy.remove()
    assert spy.counts == uncached and all(count % 3 == 0 for count in uncached.values())  # 3 forwards, 4 branches
    assert seen == dict.fromkeys(EXPERTS, {"uncond", "uncond_vi", "cond_vi"})


def test_caches_whose_state_is_not_per_branch_are_refused(pipe):
    with pytest.raises(ValueError, match="FasterCacheConfig.*guidance branch"):
        pipe.transformer.enable_cache(FasterCacheConfig(current_timestep_callback=lambda: 0))
    with pytest.raises(ValueError, match="PyramidAttentionBroadcastConfig.*guidance branch"):
        pipe.transformer.enable_cache(PyramidAttentionBroadcastConfig(current_timestep_callback=lambda: 0))
    assert not pipe.transformer.is_cache_enabled


def test_taylorseer_and_magcache_run_on_both_experts(pipe, media, cached):
    from diffusers.hooks import MagCacheConfig, TaylorSeerCacheConfig

    reference = _run(pipe, media, "rv2v")
    cached(lambda: TaylorSeerCacheConfig(cache_interval=2, disable_cache_before_step=1, use_lite_mode=True,
                                         taylor_factors_dtype=torch.float32))
    spy = FullForwards(pipe)
    try:
        taylor = _run(pipe, media, "rv2v")
        taylor_counts = dict(spy.counts)
        for name in EXPERTS:
            getattr(pipe, name).disable_cache()
        # Ratios of 1 never accumulate an error: after the first step of each expert every step reuses the residual.
        cached(lambda: MagCacheConfig(mag_ratios=[1.0] * 3, num_inference_steps=3, retention_ratio=0.0))
        spy.counts = dict.fromkeys(EXPERTS, 0)
        mag = _run(pipe, media, "rv2v")
    finally:
        spy.remove()
    branches = len(GUIDANCE_SPECS[GuidanceMode.RV2V].branches)
    # TaylorSeer computes steps 0 and 2 of each expert (interval 2 after one warm-up step) and extrapolates step 1.
    assert taylor_counts == {"transformer": 2 * branches, "transformer_2": branches} and torch.isfinite(taylor).all()
    assert spy.counts == {"transformer": branches, "transformer_2": branches}
    assert torch.isfinite(mag).all() and not torch.equal(mag, reference)


# ------------------------------------------------------------------------------------------------ LoRA

needs_peft = pytest.mark.skipif(importlib.util.find_spec("peft") is None, reason="the LoRA loader needs peft")
RANK = 4


def _diffusers_lora(seed: int) -> dict[str, torch.Tensor]:
    """A Wan LoRA in diffusers' key format on both blocks' self-attention q and v and cross-attention k."""
    g = torch.Generator().manual_seed(seed)
    inner = 256  # tiny: 2 heads x 128
    state = {}
    for block in (0, 1):
        for module in ("attn1.to_q", "attn1.to_v", "attn2.to_k"):
            key = f"transformer.blocks.{block}.{module}"
            state[f"{key}.lora_A.weight"] = torch.randn(RANK, inner, generator=g) * 0.1
            state[f"{key}.lora_B.weight"] = torch.randn(inner, RANK, generator=g) * 0.1
    return state


def _original_lora(seed: int) -> dict[str, torch.Tensor]:
    """The same kind of LoRA in the original (Lightning / LightX2V) format: `diffusion_model.` keys, lora_down/up."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for block in (0, 1):
        for module in ("self_attn.q", "self_attn.o", "cross_attn.v"):
            key = f"diffusion_model.blocks.{block}.{module}"
            state[f"{key}.lora_down.weight"] = torch.randn(RANK, 256, generator=g) * 0.1
            state[f"{key}.lora_up.weight"] = torch.randn(256, RANK, generator=g) * 0.1
            state[f"{key}.alpha"] = torch.tensor(float(RANK))
    return state


@pytest.fixture
def lora_pipe():
    pipe = BerniniPipeline(**get_tiny_components())
    yield pipe
    pipe.unload_lora_weights()


@needs_peft
@pytest.mark.parametrize("fmt", ["diffusers", "original"])
def test_wan_lora_on_both_experts(lora_pipe, media, fmt):
    make = _diffusers_lora if fmt == "diffusers" else _original_lora
    reference = _run(lora_pipe, media, "rv2v")
    lora_pipe.load_lora_weights(make(1), adapter_name="style")
    lora_pipe.load_lora_weights(make(2), adapter_name="style", load_into_transformer_2=True)
    for name in EXPERTS:
        assert "style" in getattr(lora_pipe, name).peft_config
    changed = _run(lora_pipe, media, "rv2v")
    assert not torch.allclose(changed, reference, atol=1e-4)

    # Weight 0 turns the adapter off on both experts; weight 1 brings it back.
    lora_pipe.set_adapters(["style"], adapter_weights=[0.0])
    assert torch.equal(_run(lora_pipe, media, "rv2v"), reference)
    lora_pipe.set_adapters(["style"], adapter_weights=[1.0])
    assert torch.equal(_run(lora_pipe, media, "rv2v"), changed)
    # The packed (conditioned) forwards honour the LoRA scale in `attention_kwargs`, as the plain one does.
    assert torch.equal(_run(lora_pipe, media, "rv2v", attention_kwargs={"scale": 0.0}), reference)

    lora_pipe.fuse_lora(components=list(EXPERTS))
    assert torch.allclose(_run(lora_pipe, media, "rv2v"), changed, atol=1e-5)
    lora_pipe.unfuse_lora(components=list(EXPERTS))
    lora_pipe.unload_lora_weights()
    assert torch.allclose(_run(lora_pipe, media, "rv2v"), reference, atol=1e-5)


@needs_peft
def test_lora_scale_on_the_packed_forward():
    model = tiny_transformer()
    model.load_lora_adapter(_diffusers_lora(3), adapter_name="a")
    g = torch.Generator().manual_seed(0)
    inputs = dict(
        hidden_states=torch.randn(1, 16, 2, 4, 6, generator=g),
        timestep=torch.tensor([700]),
        encoder_hidden_states=torch.randn(1, 8, 32, generator=g),
        condition_latents=[torch.randn(1, 16, 1, 4, 4, generator=g)],
        condition_source_ids=[1.0],
    )
    with torch.no_grad():
        full = model(**inputs).sample
        half = model(**inputs, attention_kwargs={"scale": 0.5}).sample
        model.set_adapters("a", 0.5)
        weighted = model(**inputs).sample
        model.disable_lora()
        without = model(**inputs).sample
        model.enable_lora()
        model.set_adapters("a", 1.0)
        zero = model(**inputs, attention_kwargs={"scale": 0.0}).sample
        again = model(**inputs).sample
    assert torch.equal(zero, without) and not torch.allclose(full, without, atol=1e-4)
    assert torch.allclose(half, weighted, atol=1e-6)
    assert torch.equal(again, full)  # the scale was undone after the call


# ------------------------------------------------------------------------------------------------ parallel plan


def test_no_context_parallel_plan():
    from diffusers import ContextParallelConfig, ParallelConfig, WanTransformer3DModel

    model = tiny_transformer()
    assert model._cp_plan is None and WanTransformer3DModel._cp_plan is not None
    ring = ParallelConfig(context_parallel_config=ContextParallelConfig(ring_degree=2))
    for config in (ContextParallelConfig(ulysses_degree=2), ring):
        with pytest.raises(ValueError, match="BerniniPipeline.enable_parallelism"):
            model.enable_parallelism(config=config)
    # Refused before anything changed: no config recorded, no processor touched.
    assert model._parallel_config is None
    processors = [m.processor for m in model.modules() if hasattr(m, "processor")]
    assert processors and all(getattr(p, "_parallel_config", None) is None for p in processors)


# ------------------------------------------------------------------------------------------------ attention backend


def test_pipeline_backend_does_not_change_other_models():
    from diffusers import WanTransformer3DModel
    from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry, attention_backend

    torch.manual_seed(0)
    wan = WanTransformer3DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, text_dim=8, freq_dim=8,
        ffn_dim=16, num_layers=1, rope_max_seq_len=32,
    )
    wan_processors = [m.processor for m in wan.modules() if hasattr(m, "processor")]
    # Another process-wide backend than the one the pipeline picks (sdpa -> "native" on this CPU).
    with attention_backend(AttentionBackendName._NATIVE_MATH):
        pipe = BerniniPipeline(**get_tiny_components())
        pipe.set_attention_backend("sdpa")
        assert _AttentionBackendRegistry._active_backend == AttentionBackendName._NATIVE_MATH
    assert all(p._attention_backend is None for p in wan_processors)  # still follows the process-wide choice
    experts = [m.processor for name in EXPERTS for m in getattr(pipe, name).modules() if hasattr(m, "processor")]
    assert experts and all(p._attention_backend == AttentionBackendName.NATIVE for p in experts)
