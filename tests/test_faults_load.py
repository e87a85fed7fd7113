"""Faults of loading that must be refused before memory is allocated or a weight is read: a hostile or corrupt
transformer `config.json`, and a `device_map` naming a device this machine lacks.

Each test asserts the message, the exception or exit status, and that nothing was built or read.
"""

from __future__ import annotations

import functools
import json
import resource
import signal

import pytest
import torch

from bernini_diffusers import BerniniPipeline, BerniniTransformer3DModel, cli, loading
from bernini_diffusers.testing import save_tiny_original_checkpoints, save_tiny_pretrained
from bernini_diffusers.tiny import save_tiny_tokenizer


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    root = tmp_path_factory.mktemp("load")
    return save_tiny_pretrained(root / "base"), save_tiny_original_checkpoints(root / "Bernini-R")


def hostile(tmp_path, base, **changes):
    """A copy of `base` (links to its weights) whose experts' config.json carry `changes`."""
    folder = tmp_path / "hostile"
    folder.mkdir()
    for item in base.iterdir():
        if item.name in EXPERTS:
            (folder / item.name).mkdir()
            for file in item.iterdir():
                if file.name == "config.json":
                    config = json.loads(file.read_text())
                    (folder / item.name / file.name).write_text(json.dumps({**config, **changes}))
                else:
                    (folder / item.name / file.name).symlink_to(file)
        else:
            (folder / item.name).symlink_to(item, target_is_directory=item.is_dir())
    return folder


EXPERTS = ("transformer", "transformer_2")


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"num_layers": 200000}, r"`num_layers`=200000 is out of range; expected an integer in \[1, 200\]"),
        ({"rope_max_seq_len": 10**9}, r"`rope_max_seq_len`=1000000000 is out of range"),
        ({"rope_max_seq_len": 1e9}, r"`rope_max_seq_len`=1000000000.0 is out of range"),
        ({"ffn_dim": 10**10}, r"`ffn_dim`=10000000000 is out of range"),
        ({"num_attention_heads": 256, "attention_head_dim": 1024}, r"about \d+B weights, more than the 100B allowed"),
        ({"patch_size": [1, 2, 2000]}, r"`patch_size`=\[1, 2, 2000\] must be 3 integers"),
    ],
)
def test_hostile_transformer_config_is_refused_before_building(tmp_path, model, monkeypatch, changes, message):
    folder = hostile(tmp_path, model[0], **changes)
    built = []
    original = BerniniTransformer3DModel.__init__

    @functools.wraps(original)
    def spy(self, *args, **kwargs):
        built.append(args)
        original(self, *args, **kwargs)

    monkeypatch.setattr(BerniniTransformer3DModel, "__init__", spy)
    with pytest.raises(ValueError, match=message) as err:
        BerniniPipeline.from_pretrained(folder)
    assert "config.json" in str(err.value) and str(folder) in str(err.value) and built == []
    with pytest.raises(ValueError, match=message):  # the expert alone, and the config as a dict
        BerniniTransformer3DModel.from_pretrained(folder, subfolder="transformer")
    with pytest.raises(ValueError, match=message):
        BerniniTransformer3DModel.from_config(json.loads((folder / "transformer" / "config.json").read_text()))


def test_hostile_config_under_original_checkpoints_is_refused_before_reading(tmp_path, model, monkeypatch):
    folder = hostile(tmp_path, model[0], num_layers=200000)
    monkeypatch.setattr(loading, "load_checkpoint_expert", lambda *a, **k: pytest.fail("a checkpoint was read"))
    with pytest.raises(ValueError, match="`num_layers`=200000"):
        BerniniPipeline.from_pretrained(folder, high_noise_ckpt=model[1], low_noise_ckpt=model[1])


def test_cli_hostile_config_exits_2(tmp_path, model, capsys):
    folder = hostile(tmp_path, model[0], rope_max_seq_len=10**9)
    out = tmp_path / "o.mp4"
    code = cli.main(["generate", "--model", str(folder), "--prompt", "p", "--num_frames", "5", "--height", "32",
                     "--width", "32", "--device", "cpu", "--output", str(out)])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "`rope_max_seq_len`=1000000000 is out of range" in err and "Traceback" not in err, err
    assert not out.exists()


def test_sane_configs_still_load(model):
    pipe = BerniniPipeline.from_pretrained(model[0])
    assert pipe.transformer.config.num_layers == 2
    BerniniTransformer3DModel.from_config({**pipe.transformer.config, "num_layers": 40, "rope_max_seq_len": 1024},
                                          num_attention_heads=1)  # fmt: skip


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("device_map", ["cuda", "cuda:1", torch.device("cuda")])
def test_device_map_without_cuda_is_refused_before_reading(model, monkeypatch, device_map):
    monkeypatch.setattr(loading, "load_checkpoint_expert", lambda *a, **k: pytest.fail("a checkpoint was read"))
    with pytest.raises(ValueError, match=r"`device_map`=.*cuda.*: this machine has 0 CUDA device\(s\); use device_map"):
        BerniniPipeline.from_pretrained(
            model[0], high_noise_ckpt=model[1], low_noise_ckpt=model[1], device_map=device_map
        )
    with pytest.raises(ValueError, match="`device_map`='gpu0' is neither a device"):
        BerniniPipeline.from_pretrained(model[0], device_map="gpu0")


@pytest.mark.skipif(not hasattr(resource, "RLIMIT_FSIZE"), reason="needs a POSIX file-size limit")
def test_file_size_limit_while_writing_the_tiny_tokenizer_names_the_path(tmp_path):
    # `bernini generate --model tiny` writes the tiny tokenizer to a temporary folder; under `ulimit -f` the write
    # failed with tokenizers' "File too large (os error 27)", naming no file. The limit is lowered in this process
    # for the one call (SIGXFSZ ignored, as Python does at startup), then restored.
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, hard))
    try:
        with pytest.raises(OSError) as err:
            save_tiny_tokenizer(tmp_path / "tok")
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)
    assert f"cannot write '{tmp_path / 'tok' / 'tokenizer.json'}'" in str(err.value)
    assert "File too large" in str(err.value)
