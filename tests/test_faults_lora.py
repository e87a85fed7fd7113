"""Faults of LoRA loading and of feature combinations, refused at load (before any weight changes) or before the
model loads on the command line: non-finite, empty, unmatched and pickle LoRA files, a turbo pair that is half
good, a missing `--turbo_lora` path, and compile with memory profiles or step caches.

Each test asserts the message, the exception or exit status, and what is left: no adapter loaded, no output file.
"""

from __future__ import annotations

import importlib.util
import re

import pytest
import torch
from safetensors.torch import save_file
from test_acceleration import lightning_lora

from bernini_diffusers import cli
from bernini_diffusers.acceleration import names_a_local_file
from bernini_diffusers.pipeline_bernini import BerniniPipeline
from bernini_diffusers.testing import get_tiny_components

needs_peft = pytest.mark.skipif(importlib.util.find_spec("peft") is None, reason="the LoRA loader needs peft")

TINY = ["--model", "tiny", "--num_frames", "5", "--height", "32", "--width", "32", "--num_inference_steps", "2",
        "--device", "cpu", "--prompt", "p"]  # fmt: skip
LOADED = "--model tiny has random weights"


@pytest.fixture(scope="module")
def components():
    return get_tiny_components()


@pytest.fixture
def pipe(components):
    pipe = BerniniPipeline(**components)
    yield pipe
    for name in ("transformer", "transformer_2"):  # the components are shared: leave them as they came
        model = getattr(pipe, name)
        if getattr(model, "peft_config", None):
            model.delete_adapters(list(model.peft_config))


def adapters(pipe) -> dict[str, list[str]]:
    return {name: sorted(getattr(getattr(pipe, name), "peft_config", None) or {}) for name in NAMES}


NAMES = ("transformer", "transformer_2")
NONE = {"transformer": [], "transformer_2": []}


@pytest.fixture
def files(tmp_path):
    good = lightning_lora(1)
    nan = lightning_lora(1)
    nan["diffusion_model.blocks.0.self_attn.q.lora_up.weight"][0, 0] = float("nan")
    inf_alpha = lightning_lora(1)
    inf_alpha["diffusion_model.blocks.1.self_attn.o.alpha"] = torch.tensor(float("inf"))
    made = {
        "good": good, "nan": nan, "alpha": inf_alpha, "empty": {},
        "other": {"foo.lora_down.weight": torch.randn(4, 8), "foo.lora_up.weight": torch.randn(8, 4)},
    }  # fmt: skip
    paths = {}
    for name, state in made.items():
        save_file(state, tmp_path / f"{name}.safetensors")
        paths[name] = tmp_path / f"{name}.safetensors"
    for suffix in (".bin", ".pt", ".pth", ".ckpt"):
        torch.save(good, tmp_path / f"pickle{suffix}")
        paths[suffix] = tmp_path / f"pickle{suffix}"
    return paths


@needs_peft
@pytest.mark.parametrize(
    "name, message",
    [
        ("nan", r"nan.safetensors': tensor 'diffusion_model.blocks.0.self_attn.q.lora_up.weight' holds non-finite"),
        ("alpha", r"alpha.safetensors': alpha 'diffusion_model.blocks.1.self_attn.o.alpha' holds non-finite"),
        ("empty", r"empty.safetensors' is empty: it holds no tensors"),
        ("other", r"other.safetensors' matches no module of `transformer`"),
    ],
)
def test_bad_lora_file_is_refused_and_nothing_stays_loaded(pipe, files, name, message):
    with pytest.raises(ValueError, match=message):
        pipe.load_lora_weights(str(files[name]))
    assert adapters(pipe) == NONE


@needs_peft
def test_bad_lora_state_dict_is_refused(pipe):
    state = lightning_lora(1)
    state["diffusion_model.blocks.1.cross_attn.k.lora_down.weight"][1, 2] = float("inf")
    with pytest.raises(ValueError, match=r"a state dict\): tensor 'diffusion_model.blocks.1.cross_attn.k.lora_down"):
        pipe.load_lora_weights(state)
    with pytest.raises(ValueError, match="is empty"):
        pipe.load_lora_weights({})
    assert adapters(pipe) == NONE


@needs_peft
@pytest.mark.parametrize("suffix", [".bin", ".pt", ".pth", ".ckpt"])
def test_pickle_lora_is_refused_with_the_conversion(pipe, files, suffix, monkeypatch):
    def no_unpickling(*args, **kwargs):
        raise AssertionError("a pickle LoRA must not be unpickled")

    monkeypatch.setattr(torch, "load", no_unpickling)
    with pytest.raises(ValueError, match=rf"pickle{suffix}' is a pickle file; LoRAs load from safetensors only") as err:
        pipe.load_lora_weights(str(files[suffix]))
    snippet = str(err.value).splitlines()[1:]
    assert snippet[0].strip() == "import torch, safetensors.torch"
    assert f"torch.load('pickle{suffix}', weights_only=True)" in snippet[1] and "'pickle.safetensors'" in snippet[1]
    with pytest.raises(ValueError, match=r"`weight_name`='pickle.bin' is a pickle file"):
        pipe.load_lora_weights(str(files[suffix].parent), weight_name="pickle.bin")
    with pytest.raises(ValueError, match="`use_safetensors`=False"):
        pipe.load_lora_weights(str(files["good"]), use_safetensors=False)
    assert adapters(pipe) == NONE


@needs_peft
def test_pickle_lora_converted_by_the_snippet_loads(pipe, files, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError) as err:
        pipe.load_lora_weights("pickle.bin")
    exec("\n".join(line.strip() for line in str(err.value).splitlines()[1:]), {})  # the two lines, as printed
    pipe.load_lora_weights("pickle.safetensors")
    assert adapters(pipe) == {"transformer": ["default_0"], "transformer_2": []}


@needs_peft
@pytest.mark.parametrize(
    "bad, error, message",
    [
        ("missing", FileNotFoundError, r"`low`: no such LoRA file or folder: '.*missing.safetensors'"),
        ("nan", ValueError, r"nan.safetensors': tensor .* holds non-finite"),
        (".bin", ValueError, r"`low`=.*pickle.bin' is a pickle file"),
        ("other", ValueError, r"other.safetensors' matches no module of `transformer_2`"),  # found only once loading
    ],
)
def test_turbo_lora_is_all_or_nothing(pipe, files, tmp_path, bad, error, message):
    low = files.get(bad, tmp_path / "missing.safetensors")
    with pytest.raises(error, match=message):
        pipe.load_turbo_lora(str(files["good"]), str(low))
    assert adapters(pipe) == NONE  # the good high-noise file is not left loaded
    pipe.load_turbo_lora(str(files["good"]), str(files["good"]))  # and the name is free again
    assert adapters(pipe) == {"transformer": ["turbo"], "transformer_2": ["turbo"]}


def test_which_lora_names_are_local_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for path in ("lora.safetensors", "x.bin", "loras/high.safetensors", "a/b/c", "./x", "../x", "~/x", "/abs/x"):
        assert names_a_local_file(path), path
    for repo in ("lightx2v/Wan2.2-Lightning", "owner/repo", "repo"):
        assert not names_a_local_file(repo), repo
    (tmp_path / "repo").mkdir()
    assert names_a_local_file("repo")  # an existing folder wins over a repo id


# --- the command line: refused before the model loads -------------------------------------------------------------


def run_cli(args, tmp_path, capsys):
    out = tmp_path / "o.mp4"
    code = cli.main(["generate", *TINY, "--output", str(out), *args])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("bernini: error:")]
    assert len(lines) == 1 and "Traceback" not in err and LOADED not in err, err
    assert not out.exists()
    return code, lines[0]


@pytest.mark.parametrize(
    "pair, message",
    [
        (("missing.safetensors", "good.safetensors"), "--turbo_lora: no such LoRA file or folder: 'missing.safe"),
        (("loras/high.safetensors", "good.safetensors"), "no such LoRA file or folder: 'loras/high.safetensors'"),
        (("good.safetensors", "nan.safetensors"), "LoRA file 'nan.safetensors': tensor"),
        (("pickle.pt", "good.safetensors"), "--turbo_lora='pickle.pt' is a pickle file"),
        (("good.safetensors", "empty.safetensors"), "'empty.safetensors' is empty"),
    ],
)
def test_cli_turbo_lora_fails_before_loading(files, tmp_path, capsys, monkeypatch, pair, message):
    monkeypatch.chdir(tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    code, line = run_cli(["--turbo_lora", *pair], tmp_path, capsys)
    assert code == 2 and message in line, line
    assert "ConnectError" not in line and sorted(p.name for p in tmp_path.iterdir()) == before


@pytest.mark.parametrize("profile", ["fp8"])
def test_cli_compile_with_fp8_is_refused_before_loading(tmp_path, capsys, profile):
    code, line = run_cli(["--memory_profile", profile, "--compile"], tmp_path, capsys)
    assert code == 2 and f"--compile and --memory_profile='{profile}' do not go together" in line, line


def test_compile_after_group_offload_or_fp8_is_refused():
    for profile in ("group_offload", "fp8"):
        pipe = BerniniPipeline(**get_tiny_components())
        pipe.enable_memory_profile(profile, "cpu")
        with pytest.raises(ValueError, match=f"`compile` and the memory profile '{profile}' do not go together"):
            pipe.compile(backend="eager")
        assert getattr(pipe, "_compile_settings", None) is None


def test_profile_or_cache_after_compile_is_refused():
    pipe = BerniniPipeline(**get_tiny_components())
    pipe.compile(backend="eager")
    for profile in ("fp8", "group_offload", "fp8+group_offload"):
        with pytest.raises(ValueError, match=re.escape(f"`memory_profile`='{profile}' and `compile` do not")):
            pipe.enable_memory_profile(profile, "cpu")
    with pytest.raises(ValueError, match=r"cache preset 'fbc-safe' and `compile` \(fullgraph=True\) do not go"):
        pipe.enable_cache_preset("fbc-safe")
    assert getattr(pipe, "_memory_profile", None) is None
    assert not pipe.transformer.is_cache_enabled and not pipe.transformer_2.is_cache_enabled
