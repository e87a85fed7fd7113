"""BerniniTransformer3DModel: Wan parity without conditions, multi-stream packing and the source-id RoPE with them."""

import math

import pytest
import torch
from diffusers import WanTransformer3DModel

from bernini_diffusers.testing import TINY_TEXT_DIM, tiny_transformer
from bernini_diffusers.transformer_bernini import (
    BerniniTransformer3DModel,
    assign_source_ids,
    rotate_rope,
    source_id_phase,
)


def _inputs(seed=0, frames=2, height=4, width=6):
    g = torch.Generator().manual_seed(seed)
    target = torch.randn(1, 16, frames, height, width, generator=g)
    text = torch.randn(1, 7, TINY_TEXT_DIM, generator=g)
    return target, torch.tensor([700]), text


def test_is_a_wan_transformer_with_identical_keys():
    model = tiny_transformer()
    wan = WanTransformer3DModel(**dict(model.config))
    assert isinstance(model, WanTransformer3DModel)
    assert set(model.state_dict()) == set(wan.state_dict())


def test_without_conditions_equals_wan_exactly():
    model = tiny_transformer()
    wan = WanTransformer3DModel(**dict(model.config)).eval()
    wan.load_state_dict(model.state_dict())
    target, t, text = _inputs()
    with torch.no_grad():
        ours = model(target, t, text, return_dict=False)[0]
        theirs = wan(target, t, text, return_dict=False)[0]
    assert torch.equal(ours, theirs)


def test_packed_output_has_the_target_shape_and_is_deterministic():
    model = tiny_transformer()
    target, t, text = _inputs()
    cond = torch.randn(1, 16, 1, 4, 4)
    with torch.no_grad():
        a = model(target, t, text, condition_latents=[cond], condition_source_ids=[1.0], return_dict=False)[0]
        b = model(target, t, text, condition_latents=[cond], condition_source_ids=[1.0], return_dict=False)[0]
    assert a.shape == target.shape
    assert torch.equal(a, b)


def _reference_packed_forward(model, target, t, text, conds, ids):
    """An independent re-statement of docs/design.md#streams-and-source-ids in complex float64 RoPE, built from the
    model's own modules."""
    cfg = model.config
    head_dim = cfg.attention_head_dim
    theta = 10000.0
    dims = [head_dim - 4 * (head_dim // 6), 2 * (head_dim // 6), 2 * (head_dim // 6)]

    def axis_freqs(dim):
        return theta ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)

    def stream_rope(shape, sid):
        f, h, w = shape[2], shape[3] // 2, shape[4] // 2
        angles = []
        for pos_f in range(f):
            for pos_h in range(h):
                for pos_w in range(w):
                    angles.append(torch.cat([pos_f * axis_freqs(dims[0]), pos_h * axis_freqs(dims[1]),
                                             pos_w * axis_freqs(dims[2])]))
        angles = torch.stack(angles) + sid * theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
        return torch.polar(torch.ones_like(angles), angles)  # (L, D/2) complex128

    streams = [*conds, target]
    sids = [*ids, 0.0]
    freqs = torch.cat([stream_rope(s.shape, sid) for s, sid in zip(streams, sids)])
    tokens = torch.cat([model.patch_embedding(s).flatten(2).transpose(1, 2) for s in streams], dim=1)

    # Convert the complex table into diffusers' interleaved real layout and run the model's own blocks.
    cos = freqs.real.repeat_interleave(2, dim=-1)[None, :, None, :]
    sin = freqs.imag.repeat_interleave(2, dim=-1)[None, :, None, :]
    temb, proj, text_emb, _ = model.condition_embedder(t, text)
    proj = proj.unflatten(1, (6, -1))
    hidden = tokens
    for block in model.blocks:
        hidden = block(hidden, text_emb, proj, (cos.float(), sin.float()))
    n = math.prod(s // p for s, p in zip(target.shape[2:], cfg.patch_size))
    return model._output_head(hidden[:, -n:], temb, (target.shape[2], target.shape[3] // 2, target.shape[4] // 2))


def test_packed_forward_matches_independent_restatement():
    model = tiny_transformer()
    target, t, text = _inputs(frames=2, height=4, width=6)
    conds = [torch.randn(1, 16, 2, 4, 6), torch.randn(1, 16, 1, 6, 4)]  # a clip and an image of another aspect
    ids = [1.0, 2.0]
    with torch.no_grad():
        ours = model(target, t, text, condition_latents=conds, condition_source_ids=ids, return_dict=False)[0]
        ref = _reference_packed_forward(model, target, t, text, conds, ids)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


def test_conditions_change_the_output_and_ids_matter():
    model = tiny_transformer()
    target, t, text = _inputs()
    cond = torch.randn(1, 16, 1, 4, 4)
    with torch.no_grad():
        plain = model(target, t, text, return_dict=False)[0]
        id1 = model(target, t, text, condition_latents=[cond], condition_source_ids=[1.0], return_dict=False)[0]
        id2 = model(target, t, text, condition_latents=[cond], condition_source_ids=[2.0], return_dict=False)[0]
        id15 = model(target, t, text, condition_latents=[cond], condition_source_ids=[1.5], return_dict=False)[0]
    assert (id1 - plain).abs().max() > 1e-4
    assert (id2 - id1).abs().max() > 1e-6
    assert (id15 - id1).abs().max() > 1e-7 and (id15 - id2).abs().max() > 1e-7


def test_stream_order_does_not_matter_only_ids_do():
    # Self-attention is permutation-equivariant and positions come from RoPE only (docs/design.md#packing).
    model = tiny_transformer()
    target, t, text = _inputs()
    a, b = torch.randn(1, 16, 1, 4, 4), torch.randn(1, 16, 2, 2, 4)
    with torch.no_grad():
        ab = model(target, t, text, condition_latents=[a, b], condition_source_ids=[1.0, 2.0], return_dict=False)[0]
        ba = model(target, t, text, condition_latents=[b, a], condition_source_ids=[2.0, 1.0], return_dict=False)[0]
    torch.testing.assert_close(ab, ba, rtol=1e-5, atol=1e-5)


def test_source_id_phase_values():
    phase = source_id_phase(3.0, 128)
    assert phase.dtype == torch.float64 and phase.shape == (64,)
    k = torch.arange(64, dtype=torch.float64)
    torch.testing.assert_close(phase, 3.0 * 10000.0 ** (-2 * k / 128))
    assert phase[0] == 3.0


def test_rotate_rope_is_angle_addition_and_zero_is_identity():
    angles = torch.rand(1, 5, 1, 64, dtype=torch.float64) * 10
    cos, sin = angles.cos().repeat_interleave(2, -1), angles.sin().repeat_interleave(2, -1)
    rc, rs = rotate_rope(cos, sin, 2.5)
    expected = angles + source_id_phase(2.5, 128)
    torch.testing.assert_close(rc, expected.cos().repeat_interleave(2, -1))
    torch.testing.assert_close(rs, expected.sin().repeat_interleave(2, -1))
    zc, zs = rotate_rope(cos, sin, 0.0)
    torch.testing.assert_close(zc, cos) and torch.testing.assert_close(zs, sin)


@pytest.mark.parametrize(
    "n, expected",
    [
        (0, []),
        (1, [1.0]),
        (3, [1.0, 2.0, 3.0]),
        (5, [1.0, 2.0, 3.0, 4.0, 5.0]),
        (6, [1.0, 1.8, 2.6, 3.4, 4.2, 5.0]),
        (9, [1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0, 4.5, 5.0]),
    ],
)
def test_assign_source_ids(n, expected):
    assert assign_source_ids(n) == pytest.approx(expected, abs=1e-12)


def test_assign_source_ids_without_interpolation_counts_on():
    assert assign_source_ids(7, 5, interpolate=False) == [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]


def test_bad_condition_arguments_raise():
    model = tiny_transformer()
    target, t, text = _inputs()
    cond = torch.randn(1, 16, 1, 4, 4)
    with pytest.raises(ValueError, match="condition_source_ids"):
        model(target, t, text, condition_latents=[cond])
    with pytest.raises(ValueError, match="condition_source_ids"):
        model(target, t, text, condition_latents=[cond], condition_source_ids=[1.0, 2.0])


def test_loads_a_wan_transformer_folder_unchanged(tmp_path):
    torch.manual_seed(3)
    wan = WanTransformer3DModel(**dict(tiny_transformer().config)).eval()
    wan.save_pretrained(tmp_path / "transformer")
    model = BerniniTransformer3DModel.from_pretrained(tmp_path / "transformer")
    for key, value in wan.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
