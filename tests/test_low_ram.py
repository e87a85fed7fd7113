"""The `low_ram` profile (`from_pretrained(..., memory_profile="low_ram")`, `--memory_profile low_ram`): host RAM
holds one large component at a time (the text encoder, then each expert read from its file for its own steps), and
the output equals the resident run's bit for bit. Peak RSS at a medium size is `benchmarks/bench_low_ram.py`'s."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from bernini_diffusers import BerniniPipeline, cli, low_ram
from bernini_diffusers.testing import save_tiny_pretrained

# Two steps: the first on the high-noise expert, the second on the low-noise one (boundary 0.875).
CALL = dict(prompt="a red car", task_type="v2v", num_frames=5, height=32, width=48, num_inference_steps=2)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return save_tiny_pretrained(tmp_path_factory.mktemp("low_ram") / "tiny", layout="diffusers")


def _call(pipe, media_dir, **kwargs):
    pipe.set_progress_bar_config(disable=True)
    video = str(media_dir / "source.mp4")
    return pipe(**CALL, video=video, generator=torch.Generator().manual_seed(0), **kwargs).frames


def _runs(seen):
    """`seen` with repeats in a row collapsed."""
    return [state for i, state in enumerate(seen) if i == 0 or seen[i - 1] != state]


def _record_loaded(pipe) -> list:
    """The returned list gets, at each forward of either expert, what the `low_ram` store holds then."""
    seen, store = [], pipe._low_ram
    for expert in (pipe.transformer, pipe.transformer_2):
        expert.register_forward_hook(lambda *_: seen.append(tuple(store.loaded())))
    return seen


def _one_expert_at_a_time(pipe, media_dir, reference: torch.Tensor, calls: int = 2) -> list[dict]:
    """Make `calls` calls, each equal to `reference` and each forward with its expert alone in memory (the high-noise
    one's steps, then the low-noise one's); returns the store's read counts after each call."""
    seen, loads = _record_loaded(pipe), []
    for _ in range(calls):
        seen.clear()
        assert torch.equal(_call(pipe, media_dir, output_type="latent"), reference)
        assert _runs(seen) == [("transformer",), ("transformer_2",)]
        loads.append(dict(pipe._low_ram.loads))
    return loads


def _weights(module):
    return sum(p.numel() for p in module.parameters())


def test_low_ram_equals_resident_and_holds_one_expert(folder, media_dir):
    resident = BerniniPipeline.from_pretrained(folder)
    low = BerniniPipeline.from_pretrained(folder, memory_profile="low_ram", device="cpu")
    store = low._low_ram
    # after the load nothing large is in memory: the experts and the text encoder were read once and released
    assert store.loaded() == [] and store.loads == {"text_encoder": 1, "transformer": 1, "transformer_2": 1}
    assert _weights(low.transformer) == _weights(low.transformer_2) == 0
    assert low.transformer.dtype == resident.transformer.dtype and low._execution_device == torch.device("cpu")
    seen = _record_loaded(low)
    reference = _call(resident, media_dir, output_type="latent")
    assert torch.equal(_call(low, media_dir, output_type="latent"), reference)
    # every forward (one per guidance branch) ran with its expert alone in memory: never both, never the text encoder
    assert _runs(seen) == [("transformer",), ("transformer_2",)]
    assert store.loads == {"text_encoder": 2, "transformer": 2, "transformer_2": 2}
    # a second call reads the text encoder and each expert again, once; the experts are released before the decode
    seen.clear()
    frames = _call(low, media_dir)
    assert np.array_equal(frames, resident.decode_latents(reference, "np"))
    assert _runs(seen) == [("transformer",), ("transformer_2",)] and store.loaded() == []
    assert store.loads == {"text_encoder": 3, "transformer": 3, "transformer_2": 3}


def test_fp8_low_ram_equals_fp8(folder, media_dir):
    """`fp8+low_ram` reads the experts back into float8 where the `fp8` profile stores them, with the same rounding."""
    fp8 = BerniniPipeline.from_pretrained(folder, memory_profile="fp8", device="cpu")
    low = BerniniPipeline.from_pretrained(folder, memory_profile="fp8+low_ram", device="cpu")
    assert torch.equal(_call(low, media_dir, output_type="latent"), _call(fp8, media_dir, output_type="latent"))
    assert low.transformer_2.blocks[0].attn1.to_q.weight.dtype == torch.float8_e4m3fn
    assert low._memory_profile == ("fp8+low_ram", torch.device("cpu"))


def test_low_ram_is_chosen_at_load(folder):
    pipe = BerniniPipeline.from_pretrained(folder)
    with pytest.raises(ValueError, match=r"chosen at load.*from_pretrained\(\.\.\., memory_profile='low_ram'\)"):
        pipe.enable_memory_profile("low_ram")
    offloaded = BerniniPipeline.from_pretrained(folder, memory_profile="expert_offload", device="cpu")
    assert offloaded._memory_profile == ("expert_offload", torch.device("cpu"))
    with pytest.raises(ValueError, match="`device`='cpu' goes with `memory_profile`"):
        BerniniPipeline.from_pretrained(folder, device="cpu")
    with pytest.raises(ValueError, match="`memory_profile`='tiny'"):
        BerniniPipeline.from_pretrained(folder, memory_profile="tiny")


def test_cli_low_ram(folder, tmp_path, capsys):
    out = tmp_path / "low.mp4"
    argv = ["generate", "--prompt", "a cat", "--task_type", "t2v", "--num_frames", "5", "--height", "32",
            "--width", "48", "--num_inference_steps", "2", "--memory_profile", "low_ram", "--device", "cpu"]  # fmt: skip
    assert cli.main([*argv, "--model", str(folder), "--output", str(out)]) == 0
    assert out.is_file()
    # the tiny model is built in code: nothing to read back, refused before any model work
    assert cli.main([*argv, "--model", "tiny", "--output", str(tmp_path / "tiny.mp4")]) == 2
    assert "--model tiny is built in code" in capsys.readouterr().err


def _batch(folder, tmp_path, name, entries, *extra):
    path = tmp_path / f"{name}.jsonl"
    path.write_text("".join(json.dumps(entry) + "\n" for entry in entries))
    argv = ["generate", "--model", str(folder), "--inputs", str(path), "--num_frames", "5", "--height", "32",
            "--width", "48", "--num_inference_steps", "2", "--memory_profile", "low_ram",
            "--device", "cpu"]  # fmt: skip
    return cli.main([*argv, *extra])


def test_cli_batch_runs_expert_major(folder, media_dir, tmp_path, monkeypatch, capsys):
    """A low_ram batch reads each expert once for all its cases, writes what each case writes alone, reports a case
    that fails in the high-noise steps while the others complete, and a rerun redoes only what was not written."""
    entries = [
        {"prompt": "a cat", "task_type": "t2v", "output": str(tmp_path / "out" / "a.mp4")},
        {"prompt": "a red car", "task_type": "v2v", "video": str(media_dir / "source.mp4"),
         "output": str(tmp_path / "out" / "b.mp4")},  # fmt: skip
        {"prompt": "a dog", "task_type": "t2i", "output": str(tmp_path / "out" / "c.png")},
    ]
    alone = []
    for i, entry in enumerate(entries):  # one case per batch: no expert-major run
        single = {**entry, "output": str(tmp_path / "alone" / Path(entry["output"]).name)}
        assert _batch(folder, tmp_path, f"single{i}", [single]) == 0
        alone.append(Path(single["output"]).read_bytes())

    reads = []
    load = low_ram.LowRamStore.load

    def counting(store, name):
        if not store.components[name].loaded:
            reads.append(name)
        return load(store, name)

    monkeypatch.setattr(low_ram.LowRamStore, "load", counting)
    assert _batch(folder, tmp_path, "batch", entries) == 0
    assert reads.count("transformer") == 1 and reads.count("transformer_2") == 1, reads
    assert [Path(entry["output"]).read_bytes() for entry in entries] == alone

    # the second case's noise is NaN: it fails in its high-noise steps, the others are written
    for entry in entries:
        Path(entry["output"]).unlink()
    prepare = BerniniPipeline.prepare_latents
    made = []

    def poisoned(pipe, *args, **kwargs):
        latents = prepare(pipe, *args, **kwargs)
        made.append(latents)
        return latents * float("nan") if len(made) == 2 else latents

    monkeypatch.setattr(BerniniPipeline, "prepare_latents", poisoned)
    capsys.readouterr()
    assert _batch(folder, tmp_path, "batch", entries) == 1
    err = capsys.readouterr().err
    assert "[2/3] failed: NonFiniteOutputError" in err
    assert [Path(entry["output"]).is_file() for entry in entries] == [True, False, True]
    assert not list((tmp_path / "out").glob("*.lock"))

    # a rerun (as after a kill) redoes only the case whose output is missing
    monkeypatch.setattr(BerniniPipeline, "prepare_latents", prepare)
    reads.clear()
    assert _batch(folder, tmp_path, "batch", entries) == 0
    assert Path(entries[1]["output"]).read_bytes() == alone[1]
    err = capsys.readouterr().err
    assert err.count("exists (--overwrite to redo it)") == 2


def test_interleaved_call_phases_equal_calls(media_dir):
    """Calls run phase by phase, interleaved (the expert-major order), each equal their plain call: every call keeps
    its own scheduler history and guidance momentum across the pauses."""
    from bernini_diffusers.pipeline_bernini import run_phases
    from bernini_diffusers.testing import tiny_pipeline

    pipe = tiny_pipeline()
    pipe.set_progress_bar_config(disable=True)
    calls = [
        dict(CALL, video=str(media_dir / "source.mp4"), momentum=-0.5, num_inference_steps=4),
        dict(CALL, prompt="a cat", task_type="t2v", num_inference_steps=4, flow_shift=3.0),
    ]
    seeds = [torch.Generator().manual_seed(i) for i in range(2)]
    alone = [pipe(**c, generator=g, output_type="np").frames for c, g in zip(calls, seeds)]
    seeds = [torch.Generator().manual_seed(i) for i in range(2)]
    phases = [pipe.call_phases(**c, generator=g, output_type="np") for c, g in zip(calls, seeds)]
    assert [next(p).name for p in phases] == ["prepared", "prepared"]
    assert [next(p).name for p in phases] == ["first_expert_done", "first_expert_done"]
    assert [next(p).name for p in phases] == ["denoised", "denoised"]
    for p, frames in zip(phases, alone):
        assert np.array_equal(run_phases(p).frames, frames)
