"""The attention-backend alias table: name resolution, auto selection, and applying it to a diffusers model."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bernini_diffusers import attention
from bernini_diffusers.attention import (
    ATTENTION_BACKENDS,
    ENV_VAR,
    available_backends,
    resolve_attention_backend,
    set_attention_backend,
)

SRC = Path(__file__).resolve().parents[1] / "src"


@pytest.fixture(autouse=True)
def _clean_state(monkeypatch):
    """No env var from the caller's shell, a fresh log-once set, and diffusers' global backend restored."""
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    monkeypatch.delenv(ENV_VAR, raising=False)
    monkeypatch.setattr(attention, "_LOGGED", set())
    active = _AttentionBackendRegistry._active_backend
    yield
    _AttentionBackendRegistry.set_active_backend(active)


def _fake_machine(monkeypatch, capability, modules):
    """Pretend the GPU has ``capability`` (None: no CUDA) and only ``modules`` import."""
    monkeypatch.setattr(attention, "_cuda_capability", lambda: capability)
    monkeypatch.setattr(attention, "_module_importable", lambda name: name in modules)


def test_aliases_match_diffusers_backend_names():
    from diffusers.models.attention_dispatch import AttentionBackendName

    assert attention._DIFFUSERS_NAMES == {
        "sdpa": AttentionBackendName.NATIVE.value,
        "fa2": AttentionBackendName.FLASH.value,
        "fa3": AttentionBackendName._FLASH_3.value,
        "sage": AttentionBackendName.SAGE.value,
    }
    assert ATTENTION_BACKENDS == ("auto", "sdpa", "fa2", "fa3", "sage")


def test_unknown_name_raises_with_allowed_list():
    with pytest.raises(ValueError) as exc:
        resolve_attention_backend("xformers")
    msg = str(exc.value)
    assert "'xformers'" in msg and "name=" in msg
    assert all(n in msg for n in ATTENTION_BACKENDS)


def test_env_var_picks_backend_and_unknown_env_value_names_it(monkeypatch):
    monkeypatch.setenv(ENV_VAR, " SDPA ")
    assert resolve_attention_backend() == "sdpa"
    _fake_machine(monkeypatch, (8, 0), {"flash_attn"})
    monkeypatch.setenv(ENV_VAR, "fa2")
    assert resolve_attention_backend() == "fa2"
    monkeypatch.setenv(ENV_VAR, "bogus")
    with pytest.raises(ValueError, match=ENV_VAR) as exc:
        resolve_attention_backend()
    assert "'bogus'" in str(exc.value) and "fa3" in str(exc.value)


def test_argument_beats_env_var(monkeypatch):
    monkeypatch.setenv(ENV_VAR, "bogus")
    assert resolve_attention_backend("sdpa") == "sdpa"
    monkeypatch.setenv(ENV_VAR, "fa2")
    assert resolve_attention_backend("auto") == "sdpa"  # env's fa2 would raise on this CPU machine


def test_empty_env_var_means_auto(monkeypatch):
    monkeypatch.setenv(ENV_VAR, "")
    _fake_machine(monkeypatch, (8, 6), {"flash_attn"})
    assert resolve_attention_backend() == "fa2"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only answer")
def test_auto_on_cpu_is_sdpa():
    assert resolve_attention_backend() == "sdpa"
    assert resolve_attention_backend("auto") == "sdpa"
    assert available_backends() == {"sdpa": True, "fa2": False, "fa3": False, "sage": False}


@pytest.mark.parametrize(
    ("capability", "modules", "expected"),
    [
        ((9, 0), {"flash_attn_interface", "flash_attn"}, "fa3"),
        ((9, 0), {"flash_attn_interface"}, "fa3"),
        ((8, 0), {"flash_attn"}, "fa2"),
        ((8, 0), {"flash_attn_interface", "flash_attn"}, "fa2"),  # FA3 is Hopper-only
        ((9, 0), {"flash_attn"}, "fa2"),
        ((9, 0), set(), "sdpa"),
        (None, {"flash_attn_interface", "flash_attn"}, "sdpa"),
    ],
)
def test_auto_logic(monkeypatch, capability, modules, expected):
    _fake_machine(monkeypatch, capability, modules)
    assert resolve_attention_backend("auto") == expected
    assert available_backends()[expected] is True


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only errors")
@pytest.mark.parametrize(
    ("name", "install"),
    [
        ("fa2", "pip install flash-attn --no-build-isolation"),
        ("fa2", 'pip install "bernini_diffusers[fa]"'),
        ("fa3", "cd flash-attention/hopper && python setup.py install"),
    ],
)
def test_unusable_backend_raises_with_install_line(name, install):
    with pytest.raises((ImportError, RuntimeError)) as exc:
        resolve_attention_backend(name)
    assert install in str(exc.value) and "CUDA" in str(exc.value)


def test_missing_package_is_import_error_and_wrong_gpu_is_runtime_error(monkeypatch):
    _fake_machine(monkeypatch, (9, 0), set())
    with pytest.raises(ImportError, match="no-build-isolation"):
        resolve_attention_backend("fa2")
    with pytest.raises(ImportError, match="hopper"):
        resolve_attention_backend("fa3")
    _fake_machine(monkeypatch, (8, 9), {"flash_attn_interface"})
    with pytest.raises(RuntimeError, match="Hopper") as exc:
        resolve_attention_backend("fa3")
    assert "8.9" in str(exc.value)


def test_import_does_not_import_flash_attn(tmp_path):
    # Installed-looking stand-ins that fail loudly if anything imports them at package import time.
    for name in ("flash_attn", "flash_attn_interface"):
        (tmp_path / f"{name}.py").write_text("raise RuntimeError('imported at import time')\n")
    code = (
        "import sys, importlib.util\n"
        "assert importlib.util.find_spec('flash_attn') is not None\n"
        "import bernini_diffusers, bernini_diffusers.attention\n"
        "bad = [m for m in ('flash_attn', 'flash_attn_interface') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    env = {"PYTHONPATH": f"{tmp_path}:{SRC}", "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def _tiny_wan():
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    return WanTransformer3DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, text_dim=8,
        freq_dim=8, ffn_dim=16, num_layers=1, rope_max_seq_len=32,
    ).eval()


def _forward(model):
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(1, 4, 1, 4, 4, generator=g)
    text = torch.randn(1, 5, 8, generator=g)
    with torch.no_grad():
        return model(hidden_states=hidden, timestep=torch.tensor([500]), encoder_hidden_states=text).sample


def test_set_attention_backend_on_wan_model(caplog):
    from diffusers.models.attention_dispatch import AttentionBackendName

    model = _tiny_wan()
    reference = _forward(model)
    processors = [m.processor for m in model.modules() if hasattr(getattr(m, "processor", None), "_attention_backend")]
    assert processors and all(p._attention_backend is None for p in processors)

    with caplog.at_level(logging.INFO, logger="bernini_diffusers"):
        assert set_attention_backend(model, "sdpa") == "sdpa"
        assert set_attention_backend(model, "sdpa") == "sdpa"
    assert all(p._attention_backend == AttentionBackendName.NATIVE for p in processors)
    assert torch.equal(_forward(model), reference)

    choices = [r.getMessage() for r in caplog.records if r.getMessage().startswith("attention backend:")]
    assert choices == ["attention backend: sdpa (argument)"]


def test_backend_is_the_models_own():
    from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry

    _AttentionBackendRegistry.set_active_backend(AttentionBackendName._NATIVE_MATH)
    model, other = _tiny_wan(), _tiny_wan()
    assert set_attention_backend(model, "sdpa") == "sdpa"
    # diffusers' process-wide backend, which `other` follows, is the one set before.
    assert _AttentionBackendRegistry._active_backend == AttentionBackendName._NATIVE_MATH
    assert all(m.processor._attention_backend is None for m in other.modules() if hasattr(m, "processor"))
    assert all(
        m.processor._attention_backend == AttentionBackendName.NATIVE for m in model.modules() if hasattr(m, "processor")
    )


def test_experimental_warning_is_muted_only_during_the_call():
    modeling_logger = logging.getLogger("diffusers.models.modeling_utils")
    before = modeling_logger.level
    seen = []

    class Recorder(logging.Handler):
        def emit(self, record):
            seen.append(record.getMessage())

    handler = Recorder(level=logging.DEBUG)
    modeling_logger.addHandler(handler)
    try:
        set_attention_backend(_tiny_wan(), "sdpa")
    finally:
        modeling_logger.removeHandler(handler)
    assert not any("experimental" in m for m in seen)
    assert modeling_logger.level == before


def test_auto_choice_logged_once(monkeypatch, caplog):
    _fake_machine(monkeypatch, (8, 0), set())
    with caplog.at_level(logging.INFO, logger="bernini_diffusers"):
        for _ in range(3):
            assert resolve_attention_backend() == "sdpa"
        _fake_machine(monkeypatch, (8, 0), {"flash_attn"})
        assert resolve_attention_backend() == "fa2"
    assert [r.getMessage() for r in caplog.records] == [
        "attention backend: sdpa (auto: no flash-attn installed)",
        "attention backend: fa2 (auto: flash-attn installed)",
    ]
