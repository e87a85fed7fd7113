"""An independent restatement of the official Bernini-R renderer (docs/design.md#one-call-step-by-step), for parity
tests.

It shares only the model weights and their building blocks with the package: the token packing, the complex float64
source-id RoPE, the combos and ids, the text encoding, the guidance math (float64 APG), the expert switch and the
schedule are written here again from docs/design.md.
"""

from __future__ import annotations

import math

import numpy as np

import torch
from diffusers import UniPCMultistepScheduler

from bernini_diffusers import media
from bernini_diffusers.tasks import DEFAULT_NEGATIVE_PROMPT, SYSTEM_PROMPTS

THETA = 10000.0


def stream_rope(grid: tuple[int, int, int], source_id: float, head_dim: int) -> torch.Tensor:
    """Complex128 rotations `(L, head_dim/2)` of one stream: a 3D grid from (0,0,0) times the source-id phase."""
    h_dim = w_dim = 2 * (head_dim // 6)
    t_dim = head_dim - h_dim - w_dim

    def axis(dim):
        return THETA ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)

    f, h, w = grid
    pos_f, pos_h, pos_w = torch.meshgrid(
        torch.arange(f, dtype=torch.float64), torch.arange(h, dtype=torch.float64),
        torch.arange(w, dtype=torch.float64), indexing="ij",
    )
    angles = torch.cat(
        [pos_f.reshape(-1, 1) * axis(t_dim), pos_h.reshape(-1, 1) * axis(h_dim), pos_w.reshape(-1, 1) * axis(w_dim)],
        dim=1,
    )
    angles = angles + source_id * THETA ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    return torch.polar(torch.ones_like(angles), angles)


def packed_forward(model, target, timestep, text, conds, ids):
    """One forward of docs/design.md#packing: streams patch-embedded alone, conditions first, target tokens kept."""
    cfg = model.config
    p_t, p_h, p_w = cfg.patch_size
    dtype = model.patch_embedding.weight.dtype
    streams = [*conds, target]
    grids = [(s.shape[2] // p_t, s.shape[3] // p_h, s.shape[4] // p_w) for s in streams]
    rope = torch.cat([stream_rope(g, sid, cfg.attention_head_dim) for g, sid in zip(grids, [*ids, 0.0])])
    # complex (L, D/2) -> diffusers' interleaved real cos/sin (1, L, 1, D)
    cos = rope.real.repeat_interleave(2, dim=-1)[None, :, None, :]
    sin = rope.imag.repeat_interleave(2, dim=-1)[None, :, None, :]
    tokens = torch.cat([model.patch_embedding(s.to(dtype)).flatten(2).transpose(1, 2) for s in streams], dim=1)
    temb, proj, text_emb, _ = model.condition_embedder(timestep, text)
    proj = proj.unflatten(1, (6, -1))
    hidden = tokens
    for block in model.blocks:
        hidden = block(hidden, text_emb, proj, (cos, sin))
    n = math.prod(grids[-1])
    return model._output_head(hidden[:, -n:], temb, grids[-1])


def encode_text(pipe, text: str, dtype) -> torch.Tensor:
    inputs = pipe.tokenizer([text], padding="max_length", max_length=512, truncation=True, return_tensors="pt")
    hidden = pipe.text_encoder(inputs.input_ids, inputs.attention_mask).last_hidden_state
    length = int(inputs.attention_mask.sum())
    hidden = hidden.clone()
    hidden[:, length:] = 0
    return hidden.to(dtype)


def vae_latent(pipe, pixels: torch.Tensor) -> torch.Tensor:
    z = pipe.vae.encode(pixels[None].float()).latent_dist.mode()
    mean = torch.tensor(pipe.vae.config.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(pipe.vae.config.latents_std).view(1, -1, 1, 1, 1)
    return (z - mean) / std


def source_ids(n: int, max_id: int = 5) -> list[float]:
    if n > max_id:
        return [1.0 + (max_id - 1.0) * i / (n - 1) for i in range(n)]
    return [float(i + 1) for i in range(n)]


def apg_operator(d, r, buffer, *, eta, tau, momentum):
    """N(d, r) in float64 with explicit per-frame loops; `buffer` is a one-element list holding the momentum state."""
    if momentum != 0:
        buffer[0] = d + momentum * buffer[0]
        d = buffer[0]
    d, r = d.double().clone(), r.double()
    out = torch.empty_like(d)
    for t in range(d.shape[2]):
        df = d[0, :, t]
        if tau > 0:
            norm = float(df.pow(2).sum().sqrt())
            df = df * min(1.0, tau / norm)
        rf = r[0, :, t]
        unit = rf / max(float(rf.pow(2).sum().sqrt()), 1e-12)
        par = float((df * unit).sum()) * unit
        out[0, :, t] = (df - par) + eta * par
    return out


# mode -> (branches as (combo, positive text), omega names of the links, APG)
MODES = {
    "t2v": ((("none", False), ("none", True)), ("omega_txt",), False),
    "v2v": ((("vi", False), ("vi", True)), ("omega_txt",), False),
    "v2v_chain": ((("none", False), ("v", False), ("vi", True)), ("omega_vid", "omega_txt"), False),
    "rv2v": ((("none", False), ("v", False), ("vi", False), ("vi", True)), ("omega_vid", "omega_img", "omega_txt"),
             False),
    "t2v_apg": ((("none", False), ("none", True)), ("omega_txt",), True),
    "v2v_apg": ((("vi", False), ("vi", True)), ("omega_txt",), True),
    "r2v_apg": ((("none", False), ("i", False), ("i", True)), ("omega_img", "omega_txt"), True),
}


@torch.no_grad()
def reference_render(pipe, *, prompt, task_type, mode, video=(), image=None, images=(), num_frames=81, height=480,
                     width=848, max_image_size=848, fps=16, steps=3, flow_shift=5.0, omegas=None, omega_scale=0.8,
                     eta=0.5, momentum=0.0, taus=(50.0, 50.0), seed=42):
    """The final normalised latent of the official renderer for one call, restated from
    docs/design.md#one-call-step-by-step."""
    omegas = dict(omegas or {"omega_vid": 1.25, "omega_img": 4.5, "omega_txt": 4.0})
    dtype = pipe.transformer.dtype
    pos = encode_text(pipe, SYSTEM_PROMPTS[task_type] + media_clean(prompt), dtype)
    neg = encode_text(pipe, DEFAULT_NEGATIVE_PROMPT, dtype)

    videos = [media.load_video(v, max_image_size, fps, num_frames) for v in video]
    source = None if image is None else media.load_image(image, max_image_size)
    refs = [media.load_image(i, max_image_size) for i in images]
    if videos:
        frames, height, width = videos[0].shape[1:]
    elif source is not None:
        frames, (height, width) = 1, source.shape[2:]
    else:
        frames = num_frames
    frames = 1 if task_type in ("t2i", "i2i") else frames
    frames = frames // 4 * 4 + 1
    height, width = media.make_divisible(height), media.make_divisible(width)

    v_lat = [vae_latent(pipe, v) for v in videos]
    s_lat = [] if source is None else [vae_latent(pipe, source)]
    r_lat = [vae_latent(pipe, r) for r in refs]
    everything = v_lat + s_lat + r_lat
    combos = {
        "none": ([], []),
        "v": (v_lat[:1], source_ids(len(v_lat[:1]))),
        "i": (r_lat, source_ids(len(r_lat))),
        "vi": (everything, source_ids(len(everything))),
    }

    generator = torch.Generator("cpu").manual_seed(seed)
    x = torch.randn((1, 16, (frames - 1) // 4 + 1, height // 8, width // 8), generator=generator, dtype=torch.float32)

    scheduler = UniPCMultistepScheduler.from_config(pipe.scheduler.config, flow_shift=flow_shift)
    scheduler.set_timesteps(sigmas=np.array([0.999 * (steps - i) / steps for i in range(steps)]))
    branches, links, apg = MODES[mode]
    buffers = [[0.0] for _ in links]
    scaled = False
    for i, t in enumerate(scheduler.timesteps):
        if pipe.transformer_2 is not None and int(t) < 875:
            model = pipe.transformer_2
            if not scaled:
                omegas = {k: v * omega_scale for k, v in omegas.items()}
                scaled = True
        else:
            model = pipe.transformer
        outs = []
        for combo, positive in branches:
            conds, ids = combos[combo]
            outs.append(packed_forward(model, x.to(dtype), t.expand(1), pos if positive else neg, conds, ids))
        weights = [omegas[name] for name in links]
        if not apg:
            v = outs[0]
            for w, prev, cur in zip(weights, outs[:-1], outs[1:]):
                v = v + w * (cur - prev)
        else:
            sigma = scheduler.sigmas[i]
            x0 = [x.double() - float(sigma) * o.double() for o in outs]
            guided = x0[0]
            for k, (w, prev, cur) in enumerate(zip(weights, x0[:-1], x0[1:])):
                guided = guided + w * apg_operator(cur - prev, cur, buffers[k], eta=eta, tau=taus[k],
                                                   momentum=momentum)
            v = ((x.double() - guided) / float(sigma)).float()
        x = scheduler.step(v, t, x, return_dict=False)[0]
    return x


def media_clean(text: str) -> str:
    """ftfy, double html unescape, whitespace collapse (docs/design.md#text-encoding)."""
    import html
    import re

    import ftfy

    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return re.sub(r"\s+", " ", text).strip()
