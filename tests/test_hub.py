"""The Hub side: every published layout, original checkpoints, export, remote code, the offline cache, upload.

Everything is tiny and offline: the bases are `save_tiny_pretrained` folders, the original checkpoints are tiny experts
written in the `ByteDance/Bernini-R` layout (seeds `ORIGINAL_SEEDS`, different from the base's, so a test sees whose
weights loaded), with raw twins holding other values (so a test sees that the EMA copy won), and Hub repos are laid out
in a temporary cache as huggingface_hub lays them out.
"""

import copy
import json
import runpy
import shutil
import sys
from pathlib import Path

import huggingface_hub
import pytest
import torch
from huggingface_hub import HfApi, ModelCard, constants
from safetensors.torch import load_file, save_file

from bernini_diffusers import BerniniPipeline, BerniniTransformer3DModel
from bernini_diffusers.cli import main as cli_main
from bernini_diffusers.hub_export import export_pipeline
from bernini_diffusers.hub_export.convert import EXPERTS, KEY_PREFIXES, convert_key, original_key
from bernini_diffusers.testing import (
    ORIGINAL_SEEDS,
    save_original_checkpoint,
    save_tiny_original_checkpoints,
    save_tiny_pretrained,
    save_to_hub_cache,
    tiny_transformer,
)

WAN_BASE = "Wan-AI/Wan2.2-T2V-A14B-Diffusers"


@pytest.fixture(scope="module", autouse=True)
def _offline():
    # conftest sets HF_HUB_OFFLINE before huggingface_hub is imported; every Hub test below relies on it.
    assert constants.HF_HUB_OFFLINE, "these tests must run with HF_HUB_OFFLINE=1 (tests/conftest.py sets it)"


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A Wan-layout base, the original checkpoints, their export, and a Hub cache holding all of them."""
    root = tmp_path_factory.mktemp("hub")
    save_tiny_pretrained(root / "base", layout="wan")
    save_tiny_original_checkpoints(root / "Bernini-R")
    export_pipeline(
        root / "Bernini-R" / "bernini_renderer_high",
        root / "Bernini-R" / "bernini_renderer_low",
        root / "export",
        base=root / "base",
        max_shard_size="150KB",
        repo_id="ByteDance/Bernini-R-Diffusers",
    )
    return root


@pytest.fixture(scope="module")
def reference():
    """The experts the original checkpoints hold (their EMA weights), on the attention backend a pipeline picks."""
    from bernini_diffusers.attention import set_attention_backend

    experts = {expert: tiny_transformer(seed) for expert, seed in ORIGINAL_SEEDS.items()}
    for expert in experts.values():
        set_attention_backend(expert, None)
    return experts


def _inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return dict(
        hidden_states=torch.randn(1, 16, 2, 8, 8, generator=g),
        timestep=torch.tensor([500]),
        encoder_hidden_states=torch.randn(1, 5, 32, generator=g),
    )


def _outputs_equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    # CPU matmul kernels round differently with the storage alignment of the weights (memory-mapped safetensors vs
    # fresh allocations), so both models run on fresh copies of their (equal) weights.
    a, b = copy.deepcopy(a), copy.deepcopy(b)
    with torch.no_grad():
        return torch.equal(a(**_inputs(), return_dict=False)[0], b(**_inputs(), return_dict=False)[0])


def _same_weights(model: torch.nn.Module, reference: torch.nn.Module) -> bool:
    state = model.state_dict()
    return state.keys() == reference.state_dict().keys() and all(
        torch.equal(state[k], v) for k, v in reference.state_dict().items()
    )


def _leftovers(parent: Path, name: str) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name == name or p.name.startswith(f".{name}."))


# ------------------------------------------------------------------------------------------------ key table


@pytest.mark.parametrize("expert", EXPERTS)
def test_key_table_round_trip(expert):
    keys = list(tiny_transformer().state_dict())
    for key in keys:
        assert convert_key(original_key(key, expert), expert) == (key, 0)  # the EMA copy: best rank
        assert convert_key(original_key(key, expert, ema=False), expert) == (key, 1)
        assert convert_key(f"{expert}.{key}", expert)[0] == key
        assert convert_key(key, expert) == (key, len(KEY_PREFIXES[expert]) - 1)  # bare keys: last resort
    # the high-noise expert's keys never pass as the low-noise expert's EMA copies, nor the other way round
    assert convert_key("ema.diff_dec.transformer_2.x", "transformer") == ("ema.diff_dec.transformer_2.x", 3)
    assert convert_key("ema.diff_dec.transformer.x", "transformer_2")[1] > 1


# ------------------------------------------------------------------------------------------------ separate checkpoints


def test_separate_checkpoints_load_ema_weights(work, reference):
    ckpts = work / "Bernini-R"
    pipe = BerniniPipeline.from_pretrained(
        work / "base",
        high_noise_ckpt=ckpts / "bernini_renderer_high",
        low_noise_ckpt=ckpts,  # the repo folder too
    )
    for expert in EXPERTS:
        model = getattr(pipe, expert)
        assert type(model) is BerniniTransformer3DModel
        assert _same_weights(model, reference[expert])  # EMA copies, not the raw twins (+1) nor the base's
        assert _outputs_equal(model, reference[expert])
    assert pipe.config.boundary_ratio == 0.875


def test_checkpoint_forms_and_dtype(work, reference, tmp_path):
    """An index file, a single .safetensors of bare keys, `transformer.`-prefixed keys; `dtype` as diffusers."""
    high = reference["transformer"].state_dict()
    save_file({k: v.contiguous() for k, v in high.items()}, str(tmp_path / "bare.safetensors"))
    low = reference["transformer_2"].state_dict()
    save_file({f"transformer.{k}": v.contiguous() for k, v in low.items()}, str(tmp_path / "prefixed.safetensors"))
    pipe = BerniniPipeline.from_pretrained(
        work / "base",
        dtype=torch.bfloat16,
        high_noise_ckpt=tmp_path / "bare.safetensors",
        low_noise_ckpt=tmp_path / "prefixed.safetensors",
    )
    exported = BerniniPipeline.from_pretrained(work / "export", dtype=torch.bfloat16)
    for expert in EXPERTS:
        ours, theirs = getattr(pipe, expert).state_dict(), getattr(exported, expert).state_dict()
        assert {k: v.dtype for k, v in ours.items()} == {k: v.dtype for k, v in theirs.items()}
        assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
    assert pipe.transformer.scale_shift_table.dtype == torch.float32  # kept in float32, as from_pretrained does
    assert pipe.transformer.blocks[0].attn1.to_q.weight.dtype == torch.bfloat16
    index = work / "Bernini-R" / "bernini_renderer_high" / "model.safetensors.index.json"
    pipe = BerniniPipeline.from_pretrained(work / "base", high_noise_ckpt=index, low_noise_ckpt=work / "Bernini-R")
    assert _same_weights(pipe.transformer, reference["transformer"])


def test_checkpoints_never_read_the_base_transformer_weights(work, reference, tmp_path):
    base = shutil.copytree(work / "base", tmp_path / "base")
    for weights in base.glob("transformer*/*.safetensors"):
        weights.unlink()
    ckpts = work / "Bernini-R"
    pipe = BerniniPipeline.from_pretrained(base, high_noise_ckpt=ckpts, low_noise_ckpt=ckpts)
    assert _same_weights(pipe.transformer_2, reference["transformer_2"])


def test_checkpoint_argument_errors(work, tmp_path):
    ckpts = work / "Bernini-R"
    with pytest.raises(ValueError, match="must be given together.*got only `high_noise_ckpt`"):
        BerniniPipeline.from_pretrained(work / "base", high_noise_ckpt=ckpts)
    with pytest.raises(ValueError, match="low_noise_ckpt.*without `high_noise_ckpt`"):
        BerniniPipeline.from_pretrained(work / "base", low_noise_ckpt=ckpts)
    torch.save({}, tmp_path / "expert.pt")
    with pytest.raises(ValueError, match=r"expert\.pt.*safetensors only"):
        BerniniPipeline.from_pretrained(work / "base", high_noise_ckpt=tmp_path / "expert.pt", low_noise_ckpt=ckpts)
    (tmp_path / "pickled").mkdir()
    torch.save({}, tmp_path / "pickled" / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"pytorch_model\.bin"):
        BerniniPipeline.from_pretrained(work / "base", high_noise_ckpt=ckpts, low_noise_ckpt=tmp_path / "pickled")
    with pytest.raises(FileNotFoundError, match="high_noise_ckpt"):
        BerniniPipeline.from_pretrained(work / "base", high_noise_ckpt=tmp_path / "nowhere", low_noise_ckpt=ckpts)
    with pytest.raises(FileNotFoundError, match=r"nowhere' does not exist"):  # a missing path is not a repo id
        export_pipeline(tmp_path / "nowhere", ckpts, tmp_path / "out", base=work / "base")
    # swapped experts: the low-noise keys do not fit the high-noise expert
    with pytest.raises(ValueError, match="swapped"):
        BerniniPipeline.from_pretrained(
            work / "base",
            high_noise_ckpt=ckpts / "bernini_renderer_low",
            low_noise_ckpt=ckpts / "bernini_renderer_high",
        )


def test_pickle_weights_in_a_model_folder_are_refused(work, tmp_path):
    base = shutil.copytree(work / "base", tmp_path / "base")
    (base / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    torch.save({}, base / "vae" / "diffusion_pytorch_model.bin")
    with pytest.raises(ValueError, match=r"diffusion_pytorch_model\.bin.*safetensors only"):
        BerniniPipeline.from_pretrained(base)
    with pytest.raises(ValueError, match="use_safetensors"):
        BerniniPipeline.from_pretrained(work / "base", use_safetensors=False)


def _broken_checkpoint(work: Path, tmp_path: Path, how: str) -> Path:
    """A copy of the high-noise checkpoint broken in one way."""
    ckpt = shutil.copytree(work / "Bernini-R" / "bernini_renderer_high", tmp_path / how)
    shards = sorted(ckpt.glob("*.safetensors"))
    if how == "missing_shard":
        shards[1].unlink()
    elif how == "bad_index":
        (ckpt / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}}))
    elif how == "truncated_shard":
        shards[1].write_bytes(shards[1].read_bytes()[:-64])
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            tensors = load_file(shard)
            for key in [k for k in tensors if k.endswith("blocks.0.attn1.to_q.weight")]:
                if how == "missing_key":
                    del tensors[key]  # the EMA copy and its twin
                elif how == "wrong_shape" and key.startswith("ema."):
                    tensors[key] = tensors[key][:, :-1].contiguous()
            if how == "extra_key" and i == 0:
                tensors["ema.diff_dec.transformer.blocks.9.extra.weight"] = torch.zeros(2)
            save_file(tensors, str(shard))
            weight_map.update(dict.fromkeys(tensors, shard.name))
        (ckpt / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return ckpt


BROKEN = {
    "bad_index": (ValueError, r"model\.safetensors\.index\.json' is not a safetensors index.*weight_map"),
    "missing_shard": (FileNotFoundError, r"model-00002-of-00003\.safetensors"),
    "truncated_shard": (ValueError, r"model-00002-of-00003\.safetensors.*truncated"),
    "wrong_shape": (ValueError, r"blocks\.0\.attn1\.to_q\.weight: shape \[256, 255\], the config expects \[256, 256\]"),
    "extra_key": (ValueError, r"1 unexpected key\(s\): ema\.diff_dec\.transformer\.blocks\.9\.extra\.weight"),
    "missing_key": (ValueError, r"1 missing key\(s\): blocks\.0\.attn1\.to_q\.weight"),
}


@pytest.mark.parametrize("how", sorted(BROKEN))
def test_broken_checkpoints_fail_clearly_and_export_leaves_nothing(how, work, tmp_path):
    error, message = BROKEN[how]
    ckpt = _broken_checkpoint(work, tmp_path, how)
    with pytest.raises(error, match=message):
        BerniniPipeline.from_pretrained(work / "base", high_noise_ckpt=ckpt, low_noise_ckpt=work / "Bernini-R")
    with pytest.raises(error, match=message):
        export_pipeline(ckpt, work / "Bernini-R", tmp_path / "out" / "export", base=work / "base")
    assert not (tmp_path / "out").exists()  # neither the folder, nor its temporary twin, nor the parent it made


# ------------------------------------------------------------------------------------------------ export


def test_export_layout_and_round_trip(work, reference):
    out = work / "export"
    for expert in EXPERTS:
        index = json.loads((out / expert / "diffusion_pytorch_model.safetensors.index.json").read_text())
        shards = sorted(set(index["weight_map"].values()))
        assert len(shards) > 1 and shards[0] == f"diffusion_pytorch_model-00001-of-{len(shards):05d}.safetensors"
        assert set(index["weight_map"]) == set(reference[expert].state_dict())
        assert json.loads((out / expert / "config.json").read_text())["_class_name"] == "BerniniTransformer3DModel"
    assert {p.name for p in out.iterdir()} >= {"vae", "text_encoder", "tokenizer", "scheduler", "README.md"}
    assert not list(out.rglob("*.bin"))
    pipe = BerniniPipeline.from_pretrained(out)
    direct = BerniniPipeline.from_pretrained(
        work / "base", high_noise_ckpt=work / "Bernini-R", low_noise_ckpt=work / "Bernini-R"
    )
    for expert in EXPERTS:
        assert _outputs_equal(getattr(pipe, expert), getattr(direct, expert))
    assert pipe.config.boundary_ratio == 0.875
    card = ModelCard.load(out / "README.md")
    assert card.data.license == "apache-2.0" and card.data.library_name == "diffusers"
    assert card.data.pipeline_tag == "image-text-to-video" and card.data.base_model == WAN_BASE
    assert "rv2v" in card.data.tags and 'from_pretrained("ByteDance/Bernini-R-Diffusers"' in card.text


def test_export_in_bf16(work, tmp_path):
    out = export_pipeline(
        work / "Bernini-R", work / "Bernini-R", tmp_path / "bf16", base=work / "base", dtype=torch.bfloat16
    )
    weights = load_file(out / "transformer" / "diffusion_pytorch_model.safetensors")  # one shard under 10GB
    assert weights["proj_out.weight"].dtype == torch.bfloat16
    assert weights["scale_shift_table"].dtype == torch.float32  # a module the model keeps in float32
    loaded = BerniniPipeline.from_pretrained(out, dtype=torch.bfloat16)
    direct = BerniniPipeline.from_pretrained(
        work / "base", dtype=torch.bfloat16, high_noise_ckpt=work / "Bernini-R", low_noise_ckpt=work / "Bernini-R"
    )
    assert _same_weights(loaded.transformer_2, direct.transformer_2)


def test_diffusion_pipeline_needs_trust_remote_code(work):
    from diffusers import DiffusionPipeline

    with pytest.raises(ValueError, match="trust_remote_code=True"):
        DiffusionPipeline.from_pretrained(work / "export")
    pipe = DiffusionPipeline.from_pretrained(work / "export", trust_remote_code=True)
    assert type(pipe) is BerniniPipeline
    assert type(pipe.transformer) is type(pipe.transformer_2) is BerniniTransformer3DModel
    direct = BerniniPipeline.from_pretrained(work / "export")
    assert _outputs_equal(pipe.transformer_2, direct.transformer_2)


def test_remote_code_names_the_missing_package(work, monkeypatch):
    monkeypatch.setitem(sys.modules, "bernini_diffusers.pipeline_bernini", None)  # makes the import fail
    with pytest.raises(ImportError, match=r'pip install "bernini_diffusers>='):
        runpy.run_path(str(work / "export" / "pipeline_bernini.py"))


def test_export_refuses_to_overwrite_without_force(work, tmp_path):
    out = shutil.copytree(work / "export", tmp_path / "out")  # an earlier export: the only kind `force` replaces
    (out / "old.txt").write_text("keep me")
    with pytest.raises(ValueError, match="already exists.*force"):
        export_pipeline(work / "Bernini-R", work / "Bernini-R", out, base=work / "base")
    assert (out / "old.txt").exists()
    with pytest.raises(ValueError, match="holds 1 file.* no export wrote: 'old.txt'.*delete_extra=True"):
        export_pipeline(work / "Bernini-R", work / "Bernini-R", out, base=work / "base", force=True)
    assert (out / "old.txt").exists()
    export_pipeline(work / "Bernini-R", work / "Bernini-R", out, base=work / "base", force=True, delete_extra=True)
    assert not (out / "old.txt").exists() and (out / "model_index.json").exists()
    assert _leftovers(tmp_path, "out") == ["out"]


def test_export_failure_while_writing_leaves_nothing(work, tmp_path, monkeypatch):
    import bernini_diffusers.hub_export.export as export_module

    def fail(folder):
        assert any(Path(folder).iterdir())  # the shards are already written in the temporary folder
        raise OSError("disk full")

    monkeypatch.setattr(export_module, "add_remote_code", fail)
    with pytest.raises(OSError, match="disk full"):
        export_pipeline(work / "Bernini-R", work / "Bernini-R", tmp_path / "out", base=work / "base")
    assert _leftovers(tmp_path, "out") == []


class _Recorder:
    """Captures the HfApi calls an upload makes; the Hub is unreachable, so nothing may go further."""

    def __init__(self, monkeypatch):
        self.calls = []

        def create_repo(api, repo_id, **kwargs):
            self.calls.append(("create_repo", repo_id, kwargs))
            from huggingface_hub import RepoUrl

            return RepoUrl(f"https://huggingface.co/{repo_id}")

        def upload_folder(api, **kwargs):
            self.calls.append(("upload_folder", kwargs.pop("repo_id"), kwargs))
            return "commit"

        monkeypatch.setattr(HfApi, "create_repo", create_repo)
        monkeypatch.setattr(HfApi, "upload_folder", upload_folder)


def test_cli_export_push_and_dry_run(work, tmp_path, monkeypatch, capsys):
    recorder = _Recorder(monkeypatch)
    out = tmp_path / "cli"
    argv = [
        "export",
        "--base",
        str(work / "base"),
        "--high_noise_ckpt",
        str(work / "Bernini-R" / "bernini_renderer_high"),
        "--low_noise_ckpt",
        str(work / "Bernini-R"),
        "--out",
        str(out),
        "--max_shard_size",
        "200KB",
        "--push_to_hub",
        "me/Bernini-R-Diffusers",
        "--dry_run",
    ]
    assert cli_main(argv) == 0
    printed = capsys.readouterr().out
    assert recorder.calls == []  # a dry run uploads nothing
    assert "Would upload" in printed and "to me/Bernini-R-Diffusers" in printed
    assert "transformer/diffusion_pytorch_model-00001-of-" in printed and " KB  " in printed
    assert printed.strip().endswith(str(out))
    assert BerniniPipeline.from_pretrained(out).transformer_2 is not None

    assert cli_main(argv) == 2  # the folder exists now
    assert "already exists" in capsys.readouterr().err
    # push the existing export: no checkpoints needed
    argv = [
        "export",
        "--out",
        str(out),
        "--push_to_hub",
        "me/Bernini-R-Diffusers",
        "--private",
        "--commit_message",
        "first upload",
        "--token",
        "hf_test",
    ]
    assert cli_main(argv) == 0
    (name, repo_id, kwargs), (upload, upload_repo, upload_kwargs) = recorder.calls
    assert (name, repo_id, kwargs) == (
        "create_repo",
        "me/Bernini-R-Diffusers",
        {"private": True, "exist_ok": True, "repo_type": "model"},
    )
    assert upload == "upload_folder" and upload_repo == "me/Bernini-R-Diffusers"
    assert upload_kwargs == {
        "folder_path": out,
        "repo_type": "model",
        "commit_message": "first upload",
        "create_pr": False,
        "ignore_patterns": [".bernini_export.json"],  # the export's marker stays local
    }
    assert cli_main(["export", "--out", str(out), "--dry_run"]) == 2
    assert "--push_to_hub" in capsys.readouterr().err


def test_save_pretrained_loads_with_both_loaders_and_pushes(tiny_pipe, tmp_path, monkeypatch):
    """The upload is diffusers' (`create_repo`, its model card, `_upload_folder`), after the remote code is written."""
    import diffusers.utils.hub_utils
    from diffusers import DiffusionPipeline
    from huggingface_hub import RepoUrl

    calls = []

    def create_repo(repo_id, **kwargs):
        calls.append(("create_repo", repo_id, kwargs))
        return RepoUrl(f"https://huggingface.co/{repo_id}")

    def upload_folder(repo_id, folder_path, **kwargs):
        calls.append(("upload_folder", repo_id, sorted(p.name for p in Path(folder_path).iterdir())))
        return "commit"

    monkeypatch.setattr(huggingface_hub, "create_repo", create_repo)
    monkeypatch.setattr(diffusers.utils.hub_utils, "upload_folder", upload_folder)
    tiny_pipe.save_pretrained(tmp_path / "saved", push_to_hub=True, repo_id="me/tiny", private=False)
    assert [c[:2] for c in calls] == [("create_repo", "me/tiny"), ("upload_folder", "me/tiny")]
    assert calls[0][2]["private"] is False
    assert {"README.md", "model_index.json", "pipeline_bernini.py", "transformer"} <= set(calls[1][2])
    ours = BerniniPipeline.from_pretrained(tmp_path / "saved")
    theirs = DiffusionPipeline.from_pretrained(tmp_path / "saved", trust_remote_code=True)
    assert type(theirs) is BerniniPipeline
    assert _outputs_equal(ours.transformer, theirs.transformer) and _outputs_equal(
        ours.transformer, tiny_pipe.transformer
    )
    with pytest.raises(ValueError, match="safe_serialization"):
        tiny_pipe.save_pretrained(tmp_path / "pickled", safe_serialization=False)


# ------------------------------------------------------------------------------------------------ the Hub cache


@pytest.fixture(scope="module")
def cache(work, tmp_path_factory):
    """A Hugging Face cache holding the published repos: the Wan base, the original checkpoints, the diffusers export
    (with the repo listing huggingface_hub caches) and the 1.3B model (two revisions, without a listing)."""
    cache = tmp_path_factory.mktemp("cache")
    snapshot = save_to_hub_cache(work / "base", WAN_BASE, cache)
    for weights in snapshot.glob("transformer*/*.safetensors"):
        weights.unlink()  # listed, not cached: a load that asked for them would fail offline
    save_to_hub_cache(work / "Bernini-R", "ByteDance/Bernini-R", cache)
    export = shutil.copytree(work / "export", tmp_path_factory.mktemp("published") / "export")
    (export / "vae" / "diffusion_pytorch_model.fp16.safetensors").write_bytes(b"listed, never fetched")
    snapshot = save_to_hub_cache(export, "ByteDance/Bernini-R-Diffusers", cache)
    (snapshot / "vae" / "diffusion_pytorch_model.fp16.safetensors").unlink()
    one = tmp_path_factory.mktemp("one")
    save_tiny_pretrained(one / "v1", layout="bernini", two_experts=False)
    save_tiny_pretrained(one / "main", layout="bernini", two_experts=True)
    save_to_hub_cache(one / "v1", "ByteDance/Bernini-R-1.3B-Diffusers", cache, revision="v1", listing=False)
    save_to_hub_cache(one / "main", "ByteDance/Bernini-R-1.3B-Diffusers", cache, listing=False)
    return cache


def test_repo_ids_resolve_from_the_offline_cache(cache, work, reference):
    pipe = BerniniPipeline.from_pretrained("ByteDance/Bernini-R-Diffusers", cache_dir=cache, token="hf_unused")
    assert _same_weights(pipe.transformer, reference["transformer"])
    one = BerniniPipeline.from_pretrained("ByteDance/Bernini-R-1.3B-Diffusers", cache_dir=cache, revision="v1")
    assert one.transformer_2 is None and one.config.boundary_ratio is None
    two = BerniniPipeline.from_pretrained("ByteDance/Bernini-R-1.3B-Diffusers", cache_dir=cache, local_files_only=True)
    assert two.transformer_2 is not None  # `main` is the other snapshot
    with pytest.raises(FileNotFoundError, match="ByteDance/Missing"):
        BerniniPipeline.from_pretrained("ByteDance/Missing", cache_dir=cache)


def test_checkpoint_repos_on_a_base_repo(cache, reference):
    """Only the files the layout needs are fetched: the base's transformer weights are not in the cache at all."""
    pipe = BerniniPipeline.from_pretrained(
        WAN_BASE,
        cache_dir=cache,
        high_noise_ckpt="ByteDance/Bernini-R/bernini_renderer_high",
        low_noise_ckpt="hf://ByteDance/Bernini-R",
    )
    for expert in EXPERTS:
        assert _same_weights(getattr(pipe, expert), reference[expert])
    with pytest.raises(FileNotFoundError, match="transformer"):
        BerniniPipeline.from_pretrained(WAN_BASE, cache_dir=cache)  # without checkpoints it needs those weights
    with pytest.raises(FileNotFoundError, match="no folder 'bernini_renderer_mid'"):
        BerniniPipeline.from_pretrained(
            WAN_BASE,
            cache_dir=cache,
            high_noise_ckpt="ByteDance/Bernini-R/bernini_renderer_mid",
            low_noise_ckpt="ByteDance/Bernini-R",
        )


def test_diffusion_pipeline_from_the_offline_cache(cache, tmp_path):
    from diffusers import DiffusionPipeline

    # diffusers 0.42 reads a repo's remote code through `model_info` when the cache holds the repo listing, which
    # fails offline; a cache without the listing (as older huggingface_hub writes it) loads by repo id.
    snapshot = next((cache / "models--ByteDance--Bernini-R-Diffusers" / "snapshots").iterdir())
    unlisted = tmp_path / "cache"
    save_to_hub_cache(snapshot, "ByteDance/Bernini-R-Diffusers", unlisted, listing=False)
    with pytest.raises(ValueError, match="trust_remote_code=True"):
        DiffusionPipeline.from_pretrained("ByteDance/Bernini-R-Diffusers", cache_dir=unlisted)
    pipe = DiffusionPipeline.from_pretrained(
        "ByteDance/Bernini-R-Diffusers", cache_dir=unlisted, trust_remote_code=True
    )
    assert type(pipe) is BerniniPipeline and type(pipe.transformer) is BerniniTransformer3DModel
    pipe = DiffusionPipeline.from_pretrained(snapshot, trust_remote_code=True)  # the snapshot folder always works
    assert type(pipe.transformer_2) is BerniniTransformer3DModel


def test_export_from_repos(cache, tmp_path, monkeypatch):
    downloads = []
    snapshot_download = huggingface_hub.snapshot_download

    def recording_snapshot_download(repo_id, **kwargs):
        downloads.append(repo_id)
        return snapshot_download(repo_id, **kwargs)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", recording_snapshot_download)
    out = export_pipeline(
        "ByteDance/Bernini-R/bernini_renderer_high",
        "ByteDance/Bernini-R@main/bernini_renderer_low",
        tmp_path / "out",
        base=WAN_BASE,
        cache_dir=cache,
    )
    assert downloads.count(WAN_BASE) == 2  # its root files, then what every component needs at once
    assert BerniniPipeline.from_pretrained(out).transformer_2 is not None
    assert ModelCard.load(out / "README.md").data.base_model == WAN_BASE


# ------------------------------------------------------------------------------------------------ variants, configs


def test_variant_picks_variant_weights(work, tmp_path):
    base = shutil.copytree(work / "base", tmp_path / "base")
    other = tiny_transformer(seed=5)
    other.save_pretrained(tmp_path / "variant", variant="bf16")
    shutil.copy(tmp_path / "variant" / "diffusion_pytorch_model.bf16.safetensors", base / "transformer")
    plain = BerniniPipeline.from_pretrained(base)
    picked = BerniniPipeline.from_pretrained(base, variant="bf16")
    assert _same_weights(picked.transformer, other) and not _same_weights(plain.transformer, other)
    assert _same_weights(picked.transformer_2, plain.transformer_2)  # no variant there: the plain weights
    with pytest.raises(ValueError, match="variant=fp8"):  # diffusers' own error
        BerniniPipeline.from_pretrained(base, variant="fp8")


def test_official_config_folder_names_its_base(work, reference, tmp_path, cache):
    config = {
        "model_type": "bernini_renderer",
        "wan22_base": "../../base",
        "switch_dit_boundary": 0.9,
        "max_trained_src_id": 4,
        "interpolate_src_id": False,
        "shift": 3.0,
        "use_unipc": True,
    }
    folder = work / "configs" / "bernini_renderer_wan22"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config))
    pipe = BerniniPipeline.from_pretrained(
        folder, high_noise_ckpt=work / "Bernini-R", low_noise_ckpt=work / "Bernini-R"
    )
    assert (pipe.config.boundary_ratio, pipe.config.max_trained_src_id, pipe.config.interpolate_src_id) == (
        0.9,
        4,
        False,
    )
    assert pipe.scheduler.config.flow_shift == 3.0
    assert _same_weights(pipe.transformer, reference["transformer"])
    # the official default: the base is a repo id
    (folder / "config.json").write_text(json.dumps({**config, "wan22_base": WAN_BASE}))
    pipe = BerniniPipeline.from_pretrained(
        folder, cache_dir=cache, high_noise_ckpt=work / "Bernini-R", low_noise_ckpt=work / "Bernini-R"
    )
    assert _same_weights(pipe.transformer_2, reference["transformer_2"])
    # the 1.3B config: one expert, no switch
    one = tmp_path / "bernini_renderer_wan21_1p3b"
    one.mkdir()
    base = (work / "base").resolve()
    (one / "config.json").write_text(
        json.dumps(
            {
                "model_type": "bernini_renderer",
                "wan22_base": str(base),
                "skip_transformer_2": True,
                "switch_dit_boundary": 0,
            }
        )
    )
    pipe = BerniniPipeline.from_pretrained(one)
    assert pipe.transformer_2 is None and pipe.config.boundary_ratio is None
    (one / "config.json").write_text(json.dumps({"model_type": "bernini_renderer", "wan22_base": str(tmp_path / "x")}))
    with pytest.raises(FileNotFoundError, match="wan22_base"):
        BerniniPipeline.from_pretrained(one)


def test_unexpected_arguments_are_named(work):
    with pytest.raises(ValueError, match=r"unexpected arguments: \['proxiez'\]"):
        BerniniPipeline.from_pretrained(work / "base", proxiez={})
    pipe = BerniniPipeline.from_pretrained(work / "base", max_trained_src_id=3)  # a setting overrides the folder's
    assert pipe.config.max_trained_src_id == 3


def test_original_checkpoint_writer_puts_twins_in_other_shards(tmp_path):
    save_original_checkpoint(tmp_path, tiny_transformer(), "transformer_2", num_shards=2)
    weight_map = json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"]
    key = "proj_out.weight"
    assert weight_map[original_key(key, "transformer_2")] != weight_map[original_key(key, "transformer_2", ema=False)]
