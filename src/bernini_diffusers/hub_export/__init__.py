"""Checkpoint conversion, export to a self-contained diffusers folder, and upload to the Hub.

`convert` holds the key table and the shard-by-shard conversion, `export` the folder export and the upload,
`remote_code` the modules that let `DiffusionPipeline` load an export, `cli` the `bernini export` command. Names load
lazily so that building the `bernini` parser imports nothing heavy.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "export_pipeline": "export",
    "push_folder": "export",
    "add_remote_code": "remote_code",
    "KEY_PREFIXES": "convert",
    "plan_conversion": "convert",
    "write_expert_shards": "convert",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
