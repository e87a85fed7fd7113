"""diffusers' call conventions on BerniniPipeline: precomputed text, batches, `guidance_scale`, small models, and a
pipeline without a high-noise expert."""

import numpy as np
import pytest
import torch
from diffusers import UniPCMultistepScheduler, WanPipeline

from bernini_diffusers import BerniniPipeline
from bernini_diffusers.guidance import Guidance
from bernini_diffusers.scheduling import official_flow_sigmas
from bernini_diffusers.tasks import DEFAULT_NEGATIVE_PROMPT, GuidanceMode, TaskType
from bernini_diffusers.testing import get_tiny_components, tiny_transformer
from bernini_diffusers.text import positive_text

SMALL = dict(num_frames=5, height=32, width=48, num_inference_steps=2, output_type="latent")
CPU = torch.device("cpu")


def _gen(seed=0):
    return torch.Generator("cpu").manual_seed(seed)


# --- prompt_embeds / encode_prompt ------------------------------------------------------------------------------------


@pytest.mark.parametrize("task_type, media", [("t2v", {}), ("v2v", {"video": np.zeros((5, 32, 48, 3), np.uint8)})])
def test_prompt_embeds_equal_the_text_path(tiny_pipe, task_type, media):
    text = tiny_pipe("a red ball", task_type=task_type, generator=_gen(), **media, **SMALL).frames
    prompt_embeds, negative_prompt_embeds = tiny_pipe.encode_prompt("a red ball", task_type=task_type)
    embeds = tiny_pipe(prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds,
                       task_type=task_type, generator=_gen(), **media, **SMALL).frames  # fmt: skip
    assert torch.equal(embeds, text)
    # Only the negative precomputed: the positive text is encoded with the task's prefix, the same result.
    mixed = tiny_pipe("a red ball", negative_prompt_embeds=negative_prompt_embeds, task_type=task_type,
                      generator=_gen(), **media, **SMALL).frames  # fmt: skip
    assert torch.equal(mixed, text)
    # Embeddings of the bare prompt (no task prefix) are taken as given: another result.
    bare, _ = tiny_pipe.encode_prompt("a red ball", task_type=None)
    other = tiny_pipe(prompt_embeds=bare, negative_prompt_embeds=negative_prompt_embeds, task_type=task_type,
                      generator=_gen(), **media, **SMALL).frames  # fmt: skip
    assert not torch.allclose(other, text, atol=1e-4)


def test_encode_prompt_in_isolation_and_its_texts(tiny_pipe):
    components = get_tiny_components()
    text_only = BerniniPipeline(**{
        name: value if name in ("tokenizer", "text_encoder") else None for name, value in components.items()
    })  # fmt: skip
    positive, negative = text_only.encode_prompt(["a red ball", "a cube"], negative_prompt="blurry",
                                                 num_videos_per_prompt=2, system_prompt="SYS:")  # fmt: skip
    assert positive.shape == negative.shape == (4, 512, 32) and positive.dtype == torch.float32
    # What `__call__` encodes: the prefixed, cleaned prompt and the raw negative, each prompt's videos consecutive.
    expected = tiny_pipe.encode_prompt(["SYS:a red ball", "SYS:a cube"], "blurry", task_type=None)
    assert torch.equal(positive, expected[0].repeat_interleave(2, dim=0))
    assert torch.equal(negative, expected[1].repeat_interleave(2, dim=0))
    assert not torch.equal(positive[1], positive[2])
    # None is the default Wan negative prompt, as in `__call__`; no negative without guidance.
    _, default_negative = text_only.encode_prompt("x", max_sequence_length=16)
    assert torch.equal(default_negative, tiny_pipe.encode_prompt(DEFAULT_NEGATIVE_PROMPT, max_sequence_length=16,
                                                                 task_type=None)[0])  # fmt: skip
    assert text_only.encode_prompt("x", do_classifier_free_guidance=False)[1] is None
    with pytest.raises(ValueError, match="no expert"):
        text_only("x", **SMALL)


def test_encode_prompt_keeps_its_earlier_positional_form(tiny_pipe):
    text = positive_text("a fox", TaskType.T2V, None)
    with pytest.warns(FutureWarning, match="deprecated"):
        old = tiny_pipe.encode_prompt(text, DEFAULT_NEGATIVE_PROMPT, CPU, torch.float32)
    new = tiny_pipe.encode_prompt("a fox", device=CPU, dtype=torch.float32)
    assert torch.equal(old[0], new[0]) and torch.equal(old[1], new[1])


def test_text_argument_errors(tiny_pipe):
    embeds = torch.zeros(2, 16, 32)
    with pytest.raises(ValueError, match="`prompt`.*`prompt_embeds`"):
        tiny_pipe("x", prompt_embeds=embeds, **SMALL)
    with pytest.raises(ValueError, match="`negative_prompt`.*`negative_prompt_embeds`"):
        tiny_pipe("x", negative_prompt="n", negative_prompt_embeds=embeds[:1], **SMALL)
    with pytest.raises(ValueError, match="`negative_prompt_embeds`.*one row per prompt \\(2\\)"):
        tiny_pipe(prompt_embeds=embeds, negative_prompt_embeds=embeds[:1], **SMALL)
    with pytest.raises(ValueError, match="`negative_prompt` as a list.*\\(2\\)"):
        tiny_pipe(["a", "b"], negative_prompt=["n"], **SMALL)
    with pytest.raises(ValueError, match="text_dim 32"):
        tiny_pipe(prompt_embeds=torch.zeros(1, 16, 8), **SMALL)
    with pytest.raises(ValueError, match="`prompt`.*list"):
        tiny_pipe(["a", 3], **SMALL)
    with pytest.raises(ValueError, match="`max_sequence_length`=513"):
        tiny_pipe("x", max_sequence_length=513, **SMALL)


# --- batches ----------------------------------------------------------------------------------------------------------


def test_batch_of_two_prompts_by_two_videos_equals_four_single_runs(tiny_pipe):
    # APG with momentum and a clamping norm threshold: a norm or a buffer shared across the batch would show.
    settings = dict(momentum=0.5, norm_threshold=1.0, **SMALL)
    prompts, seeds = ["a red ball", "a blue cube"], [11, 12, 13, 14]
    batch = tiny_pipe(prompts, num_videos_per_prompt=2, generator=[_gen(s) for s in seeds], **settings).frames
    assert batch.shape == (4, 16, 2, 4, 6)
    singles = [tiny_pipe(prompts[i // 2], generator=_gen(seed), **settings).frames for i, seed in enumerate(seeds)]
    # Equal up to float32 rounding: batched convolution and matmul kernels sum in another order than batch-1 ones
    # (the patch embedding already differs by ~1e-6); text, noise and guidance are per sample and exact.
    torch.testing.assert_close(batch, torch.cat(singles), rtol=0, atol=2e-5)
    assert not torch.allclose(batch[0], batch[1], atol=1e-2) and not torch.allclose(batch[0], batch[2], atol=1e-2)


def test_batch_shares_the_media_and_decodes_every_video(tiny_pipe, media_dir):
    refs = [str(media_dir / "ref_a.png"), str(media_dir / "ref_b.png")]
    kwargs = dict(task_type="r2v", images=refs, num_frames=5, height=32, width=32, num_inference_steps=1)
    batch = tiny_pipe(["a", "b"], generator=[_gen(1), _gen(2)], **kwargs).frames
    assert batch.shape == (2, 5, 32, 32, 3)
    single = tiny_pipe("b", generator=_gen(2), **kwargs).frames
    np.testing.assert_allclose(batch[1:], single, atol=1e-4)


def test_noise_follows_randn_tensor(tiny_pipe):
    shape = (3, 16, 2, 4, 6)
    # One generator draws the whole batch at once; a list gives each video its own generator's first draw.
    assert torch.equal(tiny_pipe.prepare_latents(shape, _gen(5), None, CPU), torch.randn(shape, generator=_gen(5)))
    listed = tiny_pipe.prepare_latents(shape, [_gen(5), _gen(6), _gen(7)], None, CPU)
    for i, seed in enumerate((5, 6, 7)):
        assert torch.equal(listed[i:i + 1], torch.randn((1, *shape[1:]), generator=_gen(seed)))
    with pytest.raises(ValueError, match="`generator` is a list of 2.*= 4"):
        tiny_pipe(["a", "b"], num_videos_per_prompt=2, generator=[_gen(), _gen()], **SMALL)
    with pytest.raises(ValueError, match="`latents` must have shape \\(2, 16"):
        tiny_pipe(["a", "b"], latents=torch.zeros(1, 16, 2, 4, 6), **SMALL)


def test_apg_guidance_reduces_per_sample_exactly():
    """The guidance functions on a batch equal them on each sample, bit for bit, momentum buffers included."""
    torch.manual_seed(0)
    steps = [(torch.randn(2, 16, 3, 4, 6), [torch.randn(2, 16, 3, 4, 6) * 3 for _ in range(3)]) for _ in range(3)]
    sigma = torch.tensor(0.7)
    settings = dict(eta=0.5, momentum=0.5, norm_threshold=[1.0, 30.0])
    batched, alone = Guidance(GuidanceMode.R2V_APG, **settings), [Guidance(GuidanceMode.R2V_APG, **settings)
                                                                   for _ in range(2)]  # fmt: skip
    for latents, outputs in steps:
        together = batched(latents, outputs, [4.5, 4.0], sigma)
        apart = [g(latents[i:i + 1], [o[i:i + 1] for o in outputs], [4.5, 4.0], sigma) for i, g in enumerate(alone)]
        assert torch.equal(together, torch.cat(apart))


# --- guidance_scale ---------------------------------------------------------------------------------------------------


def test_guidance_scale_is_the_text_weight(tiny_pipe):
    by_omega = tiny_pipe("x", omega_txt=6.0, generator=_gen(), **SMALL).frames
    by_scale = tiny_pipe("x", guidance_scale=6.0, generator=_gen(), **SMALL).frames
    assert torch.equal(by_scale, by_omega) and tiny_pipe.guidance_scale == 6.0
    assert torch.equal(tiny_pipe("x", guidance_scale=6.0, omega_txt=6.0, generator=_gen(), **SMALL).frames, by_omega)
    assert not torch.allclose(tiny_pipe("x", generator=_gen(), **SMALL).frames, by_omega, atol=1e-4)
    with pytest.raises(ValueError, match="`guidance_scale`=6.0 and `omega_txt`=5.0"):
        tiny_pipe("x", guidance_scale=6.0, omega_txt=5.0, **SMALL)


# --- small models -----------------------------------------------------------------------------------------------------


def test_default_max_image_size_fits_a_short_rope_table(media_dir):
    """A rope table of 16 positions holds 16 * 2 * 8 = 256 pixels a side: the default limit (848) is lowered to it."""
    components = get_tiny_components()
    components["transformer"] = tiny_transformer(1, rope_max_seq_len=16)
    components["transformer_2"] = tiny_transformer(2, rope_max_seq_len=16)
    pipe = BerniniPipeline(**components)
    assert pipe("x", generator=_gen(), **SMALL).frames.shape == (1, 16, 2, 4, 6)
    with pytest.raises(ValueError, match="`height`=480 must be an integer in \\[16, 256\\]"):
        pipe("x", num_frames=5, num_inference_steps=1, output_type="latent")  # an output size is never changed
    # With media the defaults of num_frames, height and width are not used, and the image keeps its size (the
    # lowered limit still exceeds it).
    image = pipe("x", task_type="i2i", image=str(media_dir / "source.png"), num_inference_steps=1,
                 output_type="latent").frames  # fmt: skip
    assert image.shape == (1, 16, 1, 4, 6)


# --- a pipeline without the high-noise expert -------------------------------------------------------------------------


class _OfficialSigmasUniPC(UniPCMultistepScheduler):
    def set_timesteps(self, num_inference_steps=None, device=None, sigmas=None, mu=None):
        super().set_timesteps(device=device, sigmas=official_flow_sigmas(num_inference_steps))


def test_only_the_low_noise_expert_runs_every_step_as_wan_pipeline():
    components = get_tiny_components()
    low = components["transformer_2"]
    with pytest.raises(ValueError, match="`transformer` is None but `boundary_ratio`=0.875"):
        BerniniPipeline(**{**components, "transformer": None})
    pipe = BerniniPipeline(**{**components, "transformer": None, "boundary_ratio": 1.0})
    wan = WanPipeline(
        tokenizer=pipe.tokenizer, text_encoder=pipe.text_encoder, vae=pipe.vae, transformer=None, transformer_2=low,
        scheduler=_OfficialSigmasUniPC.from_config(pipe.scheduler.config, flow_shift=5.0), boundary_ratio=1.0,
    )
    omega_txt, omega_scale = 4.0, 0.8
    ours = pipe("a cat", guidance_mode="t2v", system_prompt="", negative_prompt="bad", omega_txt=omega_txt,
                omega_scale=omega_scale, generator=_gen(7), **SMALL).frames  # fmt: skip
    # Every step is a low-noise step, so the weight is scaled from the first: WanPipeline's guidance_scale_2.
    theirs = wan("a cat", negative_prompt="bad", guidance_scale=omega_txt, guidance_scale_2=omega_txt * omega_scale,
                 generator=_gen(7), **SMALL).frames  # fmt: skip
    assert torch.equal(ours, theirs)
    # The Euler fallback starts at t = 1000 exactly, still on the only expert.
    pipe.register_to_config(use_unipc=False)
    assert pipe("a cat", generator=_gen(7), **SMALL).frames.shape == ours.shape


def test_wan22_5b_layout_settings_are_accepted():
    """A Wan2.2 TI2V-5B-style configuration (48 latent channels, 16x VAE, `expand_timesteps`) builds and runs; per-token
    timesteps would all be equal, so the setting changes nothing."""
    from diffusers import AutoencoderKLWan

    def pipe(expand_timesteps):
        torch.manual_seed(0)
        vae = AutoencoderKLWan(base_dim=3, z_dim=48, in_channels=12, out_channels=12, is_residual=True, patch_size=2,
                               latents_mean=[0.0] * 48, latents_std=[1.0] * 48, dim_mult=[1, 1, 1, 1],
                               num_res_blocks=1, scale_factor_spatial=16, scale_factor_temporal=4,
                               temperal_downsample=[False, True, True]).eval()  # fmt: skip
        components = {**get_tiny_components(two_experts=False), "vae": vae}
        components["transformer"] = tiny_transformer(1, in_channels=48, out_channels=48)
        return BerniniPipeline(**components, expand_timesteps=expand_timesteps)

    expanded = pipe(True)
    assert expanded.config.expand_timesteps is True
    out = expanded("x", num_frames=5, height=32, width=32, num_inference_steps=2, generator=_gen(), output_type="pt")
    assert out.frames.shape == (1, 5, 3, 32, 32)
    plain = pipe(False)("x", num_frames=5, height=32, width=32, num_inference_steps=2, generator=_gen(),
                        output_type="pt")  # fmt: skip
    assert torch.equal(out.frames, plain.frames)
