"""Attention backends of bernini_diffusers: a thin alias table over diffusers' attention dispatcher.

Short names map onto diffusers' ``AttentionBackendName`` values: ``sdpa`` -> ``native`` (torch's
scaled_dot_product_attention), ``fa2`` -> ``flash`` (flash-attn 2), ``fa3`` -> ``_flash_3`` (FlashAttention 3,
Hopper only), and the opt-in ``sage`` -> ``sage`` (SageAttention: 8-bit quantised QK^T, so it is lossy; CUDA only,
when ``sageattention`` imports). ``auto`` picks the fastest exact one usable here and never picks ``sage``. The choice
comes from the argument, else the ``BERNINI_ATTENTION_BACKEND`` environment variable, else ``auto``.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import logging
import os
from collections.abc import Iterator

import torch
from diffusers.models.attention_dispatch import _AttentionBackendRegistry

from .constants import ATTENTION_BACKENDS

ENV_VAR = "BERNINI_ATTENTION_BACKEND"

# Plain strings rather than AttentionBackendName members, so importing this module does not pull in
# diffusers' dispatcher; ModelMixin.set_attention_backend accepts the string values.
_DIFFUSERS_NAMES: dict[str, str] = {"sdpa": "native", "fa2": "flash", "fa3": "_flash_3", "sage": "sage"}
# Backends whose result differs from exact attention beyond kernel rounding: only ever used when named.
LOSSY_BACKENDS = ("sage",)
# The kernels that run on CUDA GPUs only, and only with 16-bit (bf16 or fp16) tensors.
CUDA_KERNELS = ("fa2", "fa3", "sage")

_FA2_INSTALL = 'pip install flash-attn --no-build-isolation (or pip install "bernini_diffusers[fa]")'
_SAGE_INSTALL = 'pip install "sageattention>=2.1.1" (it builds CUDA kernels; a CUDA GPU is required)'
_FA3_INSTALL = (
    "build flash_attn_interface from the flash-attention repo's hopper/ directory: git clone "
    "https://github.com/Dao-AILab/flash-attention && cd flash-attention/hopper && python setup.py install"
)

logger = logging.getLogger(__name__)
# (resolved name, how it was chosen) pairs already logged; the choice is reported once per process.
_LOGGED: set[tuple[str, str]] = set()


def _cuda_capability() -> tuple[int, int] | None:
    """The current CUDA device's compute capability, or None without a usable CUDA GPU."""
    if not torch.cuda.is_available():
        return None
    return tuple(torch.cuda.get_device_capability())  # type: ignore[return-value]


def _module_importable(name: str) -> bool:
    """Whether ``name`` is installed and actually imports (a broken CUDA build fails only on import)."""
    if importlib.util.find_spec(name) is None:
        return False
    try:
        importlib.import_module(name)
    except Exception:  # noqa: BLE001 - any failure (ImportError, OSError from a bad .so) means unusable
        return False
    return True


def _unusable(name: str) -> Exception | None:
    """Why the concrete backend ``name`` cannot run here, as the exception to raise; None if it can."""
    if name == "sdpa":
        return None
    cap = _cuda_capability()
    if name == "sage":
        # Checked before the import: sageattention's kernels need CUDA, and on a CPU machine it may not import at all.
        if cap is None:
            return RuntimeError(
                f"attention backend 'sage' (SageAttention, lossy) needs a CUDA GPU and none is available; {_SAGE_INSTALL}"
            )
        if not _module_importable("sageattention"):
            return ImportError(f"attention backend 'sage' needs sageattention, which does not import; {_SAGE_INSTALL}")
        return None
    if name == "fa2":
        if cap is None:
            return RuntimeError(f"attention backend 'fa2' needs a CUDA GPU and none is available; {_FA2_INSTALL}")
        if not _module_importable("flash_attn"):
            return ImportError(f"attention backend 'fa2' needs flash-attn, which does not import; {_FA2_INSTALL}")
        return None
    if cap is None:
        return RuntimeError(f"attention backend 'fa3' needs a Hopper CUDA GPU and none is available; {_FA3_INSTALL}")
    if cap[0] != 9:
        return RuntimeError(
            f"attention backend 'fa3' needs a Hopper GPU (compute capability 9.x), this one is "
            f"{cap[0]}.{cap[1]}; use 'fa2' or 'sdpa'. To install FA3 on Hopper, {_FA3_INSTALL}"
        )
    if not _module_importable("flash_attn_interface"):
        return ImportError(f"attention backend 'fa3' needs flash_attn_interface, which does not import; {_FA3_INSTALL}")
    return None


def available_backends() -> dict[str, bool]:
    """Which concrete backends (sdpa, fa2, fa3, sage) are usable in this process."""
    return {name: _unusable(name) is None for name in _DIFFUSERS_NAMES}


def _auto() -> tuple[str, str]:
    """The best usable backend and a short reason for the log line."""
    if _unusable("fa3") is None:
        return "fa3", "auto: Hopper GPU with flash_attn_interface"
    if _unusable("fa2") is None:
        return "fa2", "auto: flash-attn installed"
    if _cuda_capability() is None:
        return "sdpa", "auto: no CUDA GPU"
    return "sdpa", "auto: no flash-attn installed"


def resolve_attention_backend(name: str | None = None, dtype: torch.dtype | None = None) -> str:
    """The concrete backend name ("sdpa", "fa2", "fa3" or "sage") for ``name``, the env var, or "auto".

    ``dtype`` is the model's: flash kernels take only fp16/bf16, so ``auto`` keeps float32 models on sdpa.

    Raises ValueError for an unknown name, and ImportError or RuntimeError (with the install line) when an
    explicitly requested backend cannot run here.
    """
    env = os.environ.get(ENV_VAR, "").strip()
    if name is not None:
        raw, source = name, "name"
    elif env:
        raw, source = env, ENV_VAR
    else:
        raw, source = "auto", "default"
    choice = raw.strip().lower()
    if choice not in ATTENTION_BACKENDS:
        raise ValueError(f"unknown attention backend {source}={raw!r}; expected one of {', '.join(ATTENTION_BACKENDS)}")
    if choice == "auto" and dtype is not None and dtype not in (torch.float16, torch.bfloat16):
        choice, why = "sdpa", f"auto: {str(dtype).replace('torch.', '')} weights"
    elif choice == "auto":
        choice, why = _auto()
    else:
        if (err := _unusable(choice)) is not None:
            raise err
        why = "argument" if source == "name" else source
    if (choice, why) not in _LOGGED:
        _LOGGED.add((choice, why))
        logger.info("attention backend: %s (%s)", choice, why)
    return choice


@contextlib.contextmanager
def _quiet_diffusers_modeling() -> Iterator[None]:
    # ModelMixin.set_attention_backend warns "experimental feature" on every call; that is noise for a
    # backend choice this package makes on the user's behalf, so mute that one logger for the call only.
    modeling_logger = logging.getLogger("diffusers.models.modeling_utils")
    previous = modeling_logger.level
    modeling_logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        modeling_logger.setLevel(previous)


def set_attention_backend(model: torch.nn.Module, name: str | None = None) -> str:
    """Resolve ``name`` (see resolve_attention_backend) and apply it to a diffusers model; returns the concrete name.

    The choice is the model's own: every attention processor of ``model`` gets it, and the process-wide backend that
    other diffusers models fall back to is left as it was (``ModelMixin.set_attention_backend`` alone would make the
    choice process-wide).
    """
    choice = resolve_attention_backend(name, getattr(model, "dtype", None))
    process_wide = _AttentionBackendRegistry._active_backend
    try:
        with _quiet_diffusers_modeling():
            model.set_attention_backend(_DIFFUSERS_NAMES[choice])
    finally:
        _AttentionBackendRegistry.set_active_backend(process_wide)
    return choice
