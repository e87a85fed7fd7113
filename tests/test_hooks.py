"""diffusers' runtime machinery on both experts: cache hooks per guidance branch, the Wan LoRA loader, no
context-parallel plan, and an attention backend that stays the model's own."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from diffusers.hooks import (
    FasterCacheConfig,
    FirstBlockCacheConfig,
    PyramidAttentionBroadcastConfig,
)
from forward_counter import EXPERTS, FullForwards

from bernini_diffusers.guidance import GUIDANCE_SPECS
from bernini_diffusers.pipeline_bernini import BerniniPipeline, branch_name
from bernini_diffusers.tasks import GuidanceMode
from bernini_diffusers.testing import get_tiny_components, tiny_transformer

# Timesteps ~999, 937, 833, 625 with the default shift: two steps on the high-noise expert, two on the low.
SMALL = dict(num_frames=5, height=32, width=48, num_inference_steps=4, output_type="latent")


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
        spy.reset()
        assert torch.equal(_run(pipe, media, mode), reference)
        assert spy.counts == uncached

        # A threshold nothing reaches: each branch runs the whole stack once per expert, on its first step there
        # (no state carried over from another branch, or from the high-noise expert to the low-noise one).
        for name in EXPERTS:
            getattr(pipe, name).disable_cache()
        cached(lambda: FirstBlockCacheConfig(threshold=1e9))
        spy.reset()
        seen: dict[str, set[str]] = {name: set() for name in EXPERTS}
        fast = _run(pipe, media, mode, callback_on_step_end=_contexts_per_step(pipe, seen))
    finally:
        spy.remove()
    assert spy.counts == {"transformer": len(branches), "transformer_2": len(branches)}
    assert seen == {"transformer": names, "transformer_2": names}
    assert torch.isfinite(fast).all() and not torch.equal(fast, reference)
    # The call leaves no state behind (`maybe_free_model_hooks` resets it): the next call starts from scratch.
    for name in EXPERTS:
        hook = getattr(pipe, name).blocks[0]._diffusers_hook.get_hook("fbc_leader_block_hook")
        assert hook.state_manager._state_cache == {} and hook.state_manager._context is None


def test_branches_sharing_a_forward_share_its_context(pipe, media_dir, cached):
    # rv2v guidance with references but no video: V has no stream, so its uncond branch is the none branch's forward.
    refs_only = {"task_type": "r2v", "images": [str(media_dir / "ref_a.png")]}
    spy = FullForwards(pipe)
    try:
        _run(pipe, refs_only, "rv2v")
        uncached = dict(spy.counts)
        cached(lambda: FirstBlockCacheConfig(threshold=0.0))
        spy.reset()
        seen: dict[str, set[str]] = {name: set() for name in EXPERTS}
        _run(pipe, refs_only, "rv2v", callback_on_step_end=_contexts_per_step(pipe, seen))
    finally:
        spy.remove()
    assert spy.counts == uncached and all(count % 3 == 0 for count in uncached.values())  # 3 forwards, 4 branches
    assert seen == dict.fromkeys(EXPERTS, {"uncond", "uncond_vi", "cond_vi"})


def test_a_call_stopped_by_an_error_leaves_no_cache_state(pipe, media, cached):
    cached(lambda: FirstBlockCacheConfig(threshold=1e9))
    clean = _run(pipe, media, "t2v")

    def fail_late(p, step, timestep, kwargs):
        if step == 3:
            raise RuntimeError("stopped")
        return kwargs

    with pytest.raises(RuntimeError, match="stopped"):
        _run(pipe, media, "t2v", callback_on_step_end=fail_late)
    assert torch.equal(_run(pipe, media, "t2v"), clean)


def test_caches_whose_state_is_not_per_branch_are_refused(pipe):
    with pytest.raises(ValueError, match="FasterCacheConfig.*guidance branch"):
        pipe.transformer.enable_cache(FasterCacheConfig(current_timestep_callback=lambda: 0))
    with pytest.raises(ValueError, match="PyramidAttentionBroadcastConfig.*guidance branch"):
        pipe.transformer.enable_cache(PyramidAttentionBroadcastConfig(current_timestep_callback=lambda: 0))
    assert not pipe.transformer.is_cache_enabled


def test_taylorseer_and_magcache_run_on_both_experts(pipe, media, cached):
    from diffusers.hooks import MagCacheConfig, TaylorSeerCacheConfig

    reference = _run(pipe, media, "v2v")
    cached(lambda: TaylorSeerCacheConfig(cache_interval=2, disable_cache_before_step=1, use_lite_mode=True,
                                         taylor_factors_dtype=torch.float32))
    spy = FullForwards(pipe)
    try:
        taylor = _run(pipe, media, "v2v")
        taylor_counts = dict(spy.counts)
        for name in EXPERTS:
            getattr(pipe, name).disable_cache()
        # Ratios of 1 never accumulate an error: after the first step of each expert every step reuses the residual.
        cached(lambda: MagCacheConfig(mag_ratios=[1.0] * 2, num_inference_steps=2, retention_ratio=0.0))
        spy.reset()
        mag = _run(pipe, media, "v2v")
    finally:
        spy.remove()
    branches = len(GUIDANCE_SPECS[GuidanceMode.V2V].branches)
    # TaylorSeer computes the first step of each expert (one warm-up step) and extrapolates the second.
    assert taylor_counts == {"transformer": branches, "transformer_2": branches}
    assert torch.isfinite(taylor).all() and not torch.equal(taylor, reference)
    assert spy.counts == {"transformer": branches, "transformer_2": branches}
    assert torch.isfinite(mag).all() and not torch.equal(mag, reference)


def test_first_block_cache_refused_under_ulysses():
    # Each process would judge the first block on its own tokens and could skip while another computes.
    model = tiny_transformer()
    model.enable_cache(FirstBlockCacheConfig(threshold=0.1))
    model.sequence_parallel = object()  # a seam is set: Ulysses is on; the check comes before it is used
    g = torch.Generator().manual_seed(0)
    with pytest.raises(ValueError, match="FirstBlockCache cannot run under Ulysses"), model.cache_context("cond"):
        model(torch.randn(1, 16, 1, 4, 4, generator=g), torch.tensor([500]), torch.randn(1, 8, 32, generator=g))


# ------------------------------------------------------------------------------------------------ LoRA

needs_peft = pytest.mark.skipif(importlib.util.find_spec("peft") is None, reason="the LoRA loader needs peft")
RANK = 4


MODULES = {"attn1.to_q": "self_attn.q", "attn1.to_out.0": "self_attn.o", "attn2.to_v": "cross_attn.v"}


def _lora(seed: int, fmt: str = "diffusers") -> dict[str, torch.Tensor]:
    """A Wan LoRA on both blocks' self-attention q and out and cross-attention v, in diffusers' key format
    (`transformer.blocks.N.attn1.to_q.lora_A.weight`) or the original one of Lightning / LightX2V files
    (`diffusion_model.blocks.N.self_attn.q.lora_down.weight` with an alpha): the same numbers either way."""
    g = torch.Generator().manual_seed(seed)
    inner = 256  # the tiny experts: 2 heads x 128
    state = {}
    for block in (0, 1):
        for ours, original in MODULES.items():
            down = torch.randn(RANK, inner, generator=g) * 0.1
            up = torch.randn(inner, RANK, generator=g) * 0.1
            if fmt == "diffusers":
                key = f"transformer.blocks.{block}.{ours}"
                state |= {f"{key}.lora_A.weight": down, f"{key}.lora_B.weight": up}
            else:
                key = f"diffusion_model.blocks.{block}.{original}"
                # alpha == rank: a scale of 1, so the converted weights are these very tensors
                alpha = torch.tensor(float(RANK))
                state |= {f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up, f"{key}.alpha": alpha}
    return state


def _lora_weights(model) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if "lora_" in k}


@pytest.fixture
def lora_pipe():
    pipe = BerniniPipeline(**get_tiny_components())
    yield pipe
    pipe.unload_lora_weights()


@needs_peft
def test_wan_lora_key_formats_load_alike(lora_pipe):
    other = BerniniPipeline(**get_tiny_components())
    for pipe, fmt in ((lora_pipe, "diffusers"), (other, "original")):
        pipe.load_lora_weights(_lora(1, fmt), adapter_name="style")
        pipe.load_lora_weights(_lora(2, fmt), adapter_name="style", load_into_transformer_2=True)
    for name in EXPERTS:
        ours, theirs = _lora_weights(getattr(lora_pipe, name)), _lora_weights(getattr(other, name))
        assert len(ours) == 2 * 2 * len(MODULES) and ours.keys() == theirs.keys()
        assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    # Each expert got its own file.
    high, low = _lora_weights(lora_pipe.transformer), _lora_weights(lora_pipe.transformer_2)
    assert not any(torch.equal(high[k], low[k]) for k in high)


@needs_peft
def test_wan_lora_on_both_experts(lora_pipe, media):
    mode = "v2v_chain"  # an unconditioned branch and two packed ones
    reference = _run(lora_pipe, media, mode)
    lora_pipe.load_lora_weights(_lora(1), adapter_name="style")
    lora_pipe.load_lora_weights(_lora(2), adapter_name="style", load_into_transformer_2=True)
    changed = _run(lora_pipe, media, mode)
    assert not torch.allclose(changed, reference, atol=1e-4)

    # Adapter weight 0 turns it off on both experts.
    lora_pipe.set_adapters(["style"], adapter_weights=[0.0])
    assert torch.equal(_run(lora_pipe, media, mode), reference)
    # Scale 0 in `attention_kwargs` too, on the packed forwards as on the plain one.
    lora_pipe.set_adapters(["style"], adapter_weights=[1.0])
    assert torch.equal(_run(lora_pipe, media, mode, attention_kwargs={"scale": 0.0}), reference)

    lora_pipe.fuse_lora(components=list(EXPERTS))
    assert torch.allclose(_run(lora_pipe, media, mode), changed, atol=1e-5)
    lora_pipe.unfuse_lora(components=list(EXPERTS))
    lora_pipe.unload_lora_weights()
    assert not any(_lora_weights(getattr(lora_pipe, name)) for name in EXPERTS)
    assert torch.allclose(_run(lora_pipe, media, mode), reference, atol=1e-5)


@needs_peft
def test_single_expert_lora():
    pipe = BerniniPipeline(**get_tiny_components(two_experts=False))
    with pytest.raises(ValueError, match="load_into_transformer_2=True.*transformer_2=None"):
        pipe.load_lora_weights(_lora(1), load_into_transformer_2=True)
    pipe.load_lora_weights(_lora(1, "original"), adapter_name="a")
    pipe.set_adapters(["a"], adapter_weights=[0.5])
    assert "a" in pipe.transformer.peft_config
    pipe.unload_lora_weights()
    assert not _lora_weights(pipe.transformer)


@needs_peft
def test_lora_scale_on_the_packed_forward():
    model = tiny_transformer()
    model.load_lora_adapter(_lora(3), adapter_name="a")
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
    from diffusers.models.attention_dispatch import (
        AttentionBackendName,
        _AttentionBackendRegistry,
        attention_backend,
    )

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
