"""`bernini export` (being built)."""

from __future__ import annotations

import argparse


def add_export_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("export", help="convert original checkpoints into a diffusers folder")
    parser.set_defaults(func=lambda args: (_ for _ in ()).throw(ValueError("`bernini export` is not built yet.")))
    return parser
