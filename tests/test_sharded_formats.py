"""The sharded loader (`from_pretrained_sharded`) reading single-file checkpoints in every format formats.py reads:
scaled float8 (ComfyUI's current format per tensor, the older one per channel), plain float8, GGUF (Q8_0, Q4_0, F32
small tensors, a 5-D tensor stored flattened), Wan keys in bf16, diffusers keys under ComfyUI's prefix in fp16 and one
official file holding both experts.

In this process: each file's rows, read as a rank reads them, equal the rows of what the unsharded load of the same
file computes with (values and dtypes), and a file that does not fit the base's config is refused before any weight
is read. In `torchrun` processes (gloo, CPU; tests/sharded_formats_worker.py, one launch of 2 processes): the sharded
pipeline's output equals the unsharded one's, each rank's shards equal its rows of the whole load, and each rank holds
half of every expert.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import gguf
import pytest
import torch
from safetensors.torch import save_file

from bernini_diffusers import BerniniPipeline, sharded_load
from bernini_diffusers.hub_export.convert import original_key
from bernini_diffusers.loading import load_checkpoint_expert, plan_checkpoint_expert
from bernini_diffusers.testing import save_tiny_pretrained, wan_key
from bernini_diffusers.tiny import TINY_TRANSFORMER_CONFIG, tiny_transformer

from sharded_formats_worker import EXPERTS, LOADS, effective_weights
from torchrun_launch import finish, start, torchrun_command
from test_formats import _scaled, _write_gguf

WORKER = Path(__file__).with_name("sharded_formats_worker.py")
CONFIG = dict(TINY_TRANSFORMER_CONFIG)
ATOL = 1e-5
FORMATS = {
    "comfy_fp8": "scaled_float8",
    "legacy_fp8_per_channel": "scaled_float8_legacy",
    "gguf_q8_0": "gguf",
    "gguf_q4_0": "gguf",
    "gguf_q8_0_flattened": "gguf",
    "wan_bf16": "none",
    "comfy_diffusers_keys_f16": "none",
    "plain_fp8": "float8",
    "official": "none",
}


def _state(seed: int) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone().contiguous() for k, v in tiny_transformer(seed).state_dict().items()}


def write_checkpoints(root: Path) -> dict[str, str]:
    """A tiny diffusers base (`root/base`) and one file of each format (weights of other seeds than the base's, so
    that the base's experts would not pass for them); `root/files.json` names them for the worker."""
    root.mkdir(parents=True, exist_ok=True)
    save_tiny_pretrained(root / "base", layout="diffusers")
    paths = {name: root / f"{name}.{'gguf' if name.startswith('gguf') else 'safetensors'}" for name in FORMATS}
    save_file(_scaled(_state(21), prefix="model.diffusion_model.")[0], str(paths["comfy_fp8"]))
    save_file(_scaled(_state(22), legacy=True, per_channel=True)[0], str(paths["legacy_fp8_per_channel"]))
    _write_gguf(paths["gguf_q8_0"], _state(23), gguf.GGMLQuantizationType.Q8_0)
    _write_gguf(paths["gguf_q4_0"], _state(24), gguf.GGMLQuantizationType.Q4_0)
    _write_gguf(paths["gguf_q8_0_flattened"], _state(28), gguf.GGMLQuantizationType.Q8_0, flatten=True)
    save_file({wan_key(k): v.to(torch.bfloat16) for k, v in _state(25).items()}, str(paths["wan_bf16"]))
    save_file({f"model.diffusion_model.{k}": v.half() for k, v in _state(29).items()},
              str(paths["comfy_diffusers_keys_f16"]))  # fmt: skip
    fp8 = {wan_key(k): v.to(torch.float8_e4m3fn) if k.startswith("blocks.") and v.ndim == 2 else v
           for k, v in _state(30).items()}  # fmt: skip
    save_file(fp8, str(paths["plain_fp8"]))
    both = {original_key(k, "transformer"): v for k, v in _state(26).items()}
    both.update({original_key(k, "transformer_2"): v for k, v in _state(27).items()})
    save_file(both, str(paths["official"]))
    paths = {name: str(path) for name, path in paths.items()}
    (root / "files.json").write_text(json.dumps(paths))
    return paths


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("sharded_formats")
    return root, write_checkpoints(root)


# ------------------------------------------------------------------------------------------------ in this process


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", list(FORMATS))
def test_rows_equal_the_whole_load(checkpoints, name, dtype):
    """A rank's read (`open_rows` of the file's plan) gives the rows of what the unsharded load computes with."""
    _, paths = checkpoints
    expert = "transformer_2" if name == "official" else "transformer"  # the second expert of the two-expert file
    plan, _ = plan_checkpoint_expert(paths[name], expert, CONFIG)
    assert plan.fmt.quantization == FORMATS[name]
    if name.endswith("flattened"):
        assert plan.fmt.gguf_orig_shapes  # the 5-D patch embedding, read whole and sliced
    whole = effective_weights(load_checkpoint_expert(paths[name], expert, CONFIG, dtype))
    assert set(plan.tensors) == set(whole)
    with sharded_load.open_rows(plan, dtype) as read:
        for key, expected in whole.items():
            rows = read(key, 1, 3)  # a middle rank's rows (empty for the 1-row modulation table)
            assert rows.dtype == expected.dtype == plan.load_dtype(key, dtype), key
            assert torch.equal(rows, expected[1:3]), key
            assert torch.equal(read(key, None, None), expected), key  # read whole (a parameter FSDP2 keeps whole)


@pytest.mark.parametrize("fault", ["shapes", "missing", "gguf_fp8"])
def test_a_file_that_does_not_fit_is_refused_before_any_weight_is_read(checkpoints, tmp_path, monkeypatch, fault):
    """Wrong shapes and missing keys, named as the unsharded load names them; and the fp8 profile over a GGUF expert,
    refused as the unsharded load refuses it (already quantized)."""
    root, paths = checkpoints
    kwargs, bad = {}, tmp_path / "bad.safetensors"
    if fault == "gguf_fp8":
        kwargs, bad, match = {"memory_profile": "fp8"}, paths["gguf_q8_0"], "already quantized"
    elif fault == "shapes":
        state = {wan_key(k): v for k, v in tiny_transformer(21, ffn_dim=CONFIG["ffn_dim"] * 2).state_dict().items()}
        match = r"does not match the config of `transformer`: .* tensor\(s\) of another shape"
    else:
        state = {wan_key(k): v for k, v in _state(21).items() if not k.startswith("blocks.1.ffn.")}
        match = r"does not match the config of `transformer`: 4 missing key\(s\): blocks.1.ffn"
    if fault != "gguf_fp8":
        save_file({k: v.contiguous() for k, v in state.items()}, str(bad))
    with pytest.raises(ValueError, match=match):  # the unsharded load says the same
        BerniniPipeline.from_pretrained(root / "base", high_noise_ckpt=bad, low_noise_ckpt=paths["wan_bf16"], **kwargs)

    def never(*args, **kwargs):
        raise AssertionError("a weight was read or the pipeline loaded before the file was checked")

    monkeypatch.setattr(sharded_load.FileRows, "__call__", never)
    monkeypatch.setattr(sharded_load, "materialize_shards", never)
    monkeypatch.setattr(BerniniPipeline, "from_pretrained", never)
    with pytest.raises(ValueError, match=match):
        BerniniPipeline.from_pretrained_sharded(root / "base", 1, 2, high_noise_ckpt=bad,
                                                low_noise_ckpt=paths["wan_bf16"], **kwargs)  # fmt: skip
    assert not (torch.distributed.is_available() and torch.distributed.is_initialized())  # refused before any launch


# ------------------------------------------------------------------------------------------------ torchrun


def _launch(out: Path, files: Path, nproc: int = 2, timeout: float = 300) -> list[dict]:
    """Run the worker under `torchrun --standalone` and read every rank's report."""
    proc = start(torchrun_command(nproc, str(WORKER), str(out), str(files)), stdout=subprocess.PIPE,
                 stderr=subprocess.STDOUT)  # fmt: skip
    finish(proc, timeout, "the sharded loads")
    return [json.loads((out / f"rank{rank}.json").read_text()) for rank in range(nproc)]


@pytest.mark.multiprocess
def test_sharded_loads_of_single_files_equal_the_whole_load(checkpoints, tmp_path):
    """Each load of the worker's `LOADS`: the output equals the unsharded pipeline's (1e-5 in fp32; bf16 without
    Ulysses runs the same operations), every shard equals its rows of the whole load in value and dtype (float8 with
    the fp8 profile), and each of the 2 ranks holds half of each expert (up to a block's rounding)."""
    root, _ = checkpoints
    reports = _launch(tmp_path / "reports", root)
    for report in reports:
        assert [(r["high"], r["low"], r["dtype"]) for r in report["loads"]] == [load[:3] for load in LOADS]
        for result in report["loads"]:
            tolerance = ATOL if result["dtype"] == "fp32" else 0.0
            assert result["max_abs_diff"] <= tolerance, (report["rank"], result)
            for expert in EXPERTS:
                shards = result[expert]
                assert shards["max_param_diff"] == 0.0 and shards["wrong_dtypes"] == [], (report["rank"], result)
                half = shards["full_bytes"] / 2
                assert abs(shards["local_bytes"] - half) <= result["block_bytes"] / 2, (report["rank"], result)
