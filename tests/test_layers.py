"""The house rule of docs/design.md ("Layers of the package"): imports only go down, nothing runtime imports the rim,
and no import sits inside a function except the optional dependencies'. Read from the source, so a new upward or
in-function import fails here."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "bernini_diffusers"

# Each module's floor; a module may import modules of its own floor or below, never above.
FLOORS = {
    "constants": 0,
    "tasks": 1, "media": 1, "text": 1, "guidance": 1, "attention": 1, "cases": 1, "scheduling": 1,
    "prompt_enhancer": 1, "acceleration": 1, "memory": 1, "windows": 1, "redaction": 1,
    "transformer_bernini": 2, "parallel": 2,
    "hub_export.convert": 3, "hub_export.remote_code": 3, "loading": 3, "sharded_load": 3, "formats": 3, "memory_plan": 3, "low_ram": 3,
    "pipeline_bernini": 4, "pipeline_output": 4, "pipeline_inputs": 4, "pipeline_features": 4, "pipeline_denoising": 4, "pipeline_loading": 4,
    "conditions": 4,
    "hub_export.export": 5, "hub_export": 5,
    "tiny": 6, "options": 7, "testing": 7, "hub_export.cli": 7, "demo": 8, "cli": 9,
    "serve.store": 7, "serve.calls": 7, "serve.worker": 7, "serve.app": 7, "serve.cli": 8, "serve": 8,
    "__init__": 10,
}  # fmt: skip
RIM = {"tiny", "options", "testing", "hub_export.cli", "demo", "cli", "serve.store", "serve.calls", "serve.worker",
       "serve.app", "serve.cli", "serve"}  # fmt: skip
RUNTIME = {name for name, floor in FLOORS.items() if floor <= 5}
# Imported inside the function that needs them: optional parts, or what the lazy package namespace exposes.
OPTIONAL = {"gradio", "openai", "xfuser", "yunchang", "torchao", "peft", "flash_attn", "flash_attn_interface",
            "sageattention", "fastapi", "starlette", "anyio", "uvicorn", "multipart", "imageio_ffmpeg"}  # fmt: skip
# The command line's deferred imports: the modules that build the `bernini` parser import torch, diffusers and the
# package's runtime floors inside the functions that run a command, after parse_args (tests/test_cli_startup.py).
COMMAND_LINE = {"cli", "options", "demo", "hub_export.cli", "serve.cli"}


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        name = ".".join(parts[:-1]) if parts[-1] == "__init__" and len(parts) > 1 else ".".join(parts)
        found[name] = path
    return found


def _imports(name: str, path: Path) -> list[tuple[str, bool, int]]:
    """(imported package module or top-level package, inside a function, line) for every import of `path`."""
    tree = ast.parse(path.read_text())
    package = name.split(".")[:-1] if not path.name == "__init__.py" else name.split(".")
    functions = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
    inside = {id(node) for f in functions for node in ast.walk(f) if node is not f}
    type_checking = {
        id(node)
        for block in ast.walk(tree)
        if isinstance(block, ast.If) and "TYPE_CHECKING" in ast.unparse(block.test)
        for node in ast.walk(block)
    }
    found = []
    for node in ast.walk(tree):
        if id(node) in type_checking:
            continue
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1] if node.level > 1 else package
                stem = ".".join([*base, node.module] if node.module else base)
                targets = [f"{stem}.{a.name}".strip(".") if not node.module else stem for a in node.names]
            else:
                targets = [node.module]
        else:
            continue
        for target in targets:
            target = target.removeprefix("bernini_diffusers.").removeprefix("bernini_diffusers")
            found.append((target or "__init__", id(node) in inside, node.lineno))
    return found


def _floor_of(target: str) -> str | None:
    while target and target not in FLOORS:
        target = target.rpartition(".")[0]
    return target or None


def test_every_module_has_a_floor():
    assert set(_modules()) - set(FLOORS) == set(), "a new module needs its floor in FLOORS (docs/design.md)"


def test_imports_only_go_down_and_runtime_never_imports_the_rim():
    problems = []
    for name, path in _modules().items():
        for target, _, line in _imports(name, path):
            own = _floor_of(target) if target in FLOORS or "." in target or target in _modules() else None
            if own is None or name == "__init__":
                continue
            if FLOORS[own] > FLOORS[name]:
                problems.append(f"{path.name}:{line} imports {own} (floor {FLOORS[own]} above {FLOORS[name]})")
            if name in RUNTIME and own in RIM:
                problems.append(f"{path.name}:{line}: runtime module {name} imports the rim module {own}")
    assert problems == []


def test_no_import_inside_a_function_but_optional_parts():
    problems = []
    for name, path in _modules().items():
        if name == "__init__" or path.name == "__init__.py":
            continue  # the package's lazy namespace (PEP 562 __getattr__)
        for target, inside, line in _imports(name, path):
            if inside and target.split(".")[0] not in OPTIONAL and name not in COMMAND_LINE:
                problems.append(f"{path.relative_to(PACKAGE)}:{line} imports {target} inside a function")
    assert problems == []
