"""The Gradio demo (being built). Gradio is imported inside the functions that need it."""

from __future__ import annotations

import argparse


def add_demo_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("demo", help="serve the Gradio demo")
    parser.set_defaults(func=lambda args: (_ for _ in ()).throw(ValueError("`bernini demo` is not built yet.")))
    return parser
