"""The code blocks of README.md and docs/*.md marked runnable run as written on the tiny model.

A block is marked by an HTML comment on the line before its fence:

- `<!-- runnable -->`: runs exactly as written;
- `<!-- runnable-tiny -->`: written for the real model; runs with the model swapped for the built-in tiny one
  (`BerniniPipeline.from_pretrained(...)` returns `tiny_pipeline()`, `--model`/`--config NAME` becomes `--model tiny`),
  everything else as written.

Each block runs in a fresh folder holding the small media the documents name (`inputs/park.mp4`, ...), so a block
that reads a file the folder lacks fails here as it would for a reader.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
MARKER = re.compile(r"^<!-- (runnable|runnable-tiny) -->\s*$")

# Swaps the real model for the tiny one and leaves the rest of the block alone.
TINY_PRELUDE = """
from bernini_diffusers import BerniniPipeline
from bernini_diffusers.tiny import tiny_pipeline
BerniniPipeline.from_pretrained = classmethod(lambda cls, *args, **kwargs: tiny_pipeline())
"""


def _blocks() -> list:
    found = []
    for doc in DOCUMENTS:
        lines = doc.read_text().splitlines()
        for i, line in enumerate(lines):
            match = MARKER.match(line)
            if not match or i + 1 >= len(lines):
                continue
            fence = lines[i + 1]
            assert fence.startswith("```"), f"{doc.name}:{i + 1}: a runnable marker must stand right above a fence"
            language = fence[3:].strip()
            end = next(j for j in range(i + 2, len(lines)) if lines[j].startswith("```"))
            code = "\n".join(lines[i + 2 : end]) + "\n"
            name = f"{doc.relative_to(ROOT)}:{i + 2}"
            found.append(pytest.param(language, match.group(1) == "runnable-tiny", code, id=name))
    return found


BLOCKS = _blocks()


def test_documents_mark_runnable_blocks():
    # The README's own examples are among them, so a renamed marker cannot silently skip every block.
    assert any(p.id.startswith("README.md") for p in BLOCKS)
    assert len(BLOCKS) >= 4


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    from bernini_diffusers.testing import make_test_image, make_test_video

    for name, seed in (("park", 1), ("car", 2), ("street_30s", 3)):
        make_test_video(tmp_path / "inputs" / f"{name}.mp4", num_frames=13, width=48, height=32, fps=16, seed=seed)
    for name, seed in (("house", 4), ("dog", 5), ("mug", 6)):
        make_test_image(tmp_path / "inputs" / f"{name}.png", width=40, height=32, seed=seed)
    cases = [{"task_type": "t2v", "prompt": "a red kite"}, {"task_type": "v2v", "prompt": "a blue car",
                                                             "video": "inputs/car.mp4"}]
    (tmp_path / "cases.jsonl").write_text("".join(json.dumps(c) + "\n" for c in cases))
    return tmp_path


def _environment() -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    src = str(ROOT / "src")
    env["PYTHONPATH"] = os.pathsep.join([src, env["PYTHONPATH"]]) if env.get("PYTHONPATH") else src
    return env


def _shell_commands(code: str, tiny: bool) -> list[list[str]]:
    commands = []
    for line in code.replace("\\\n", " ").splitlines():
        words = shlex.split(line, comments=True)
        if not words:
            continue
        if tiny:
            for i, word in enumerate(words[:-1]):
                if word in ("--model", "--config"):
                    words[i], words[i + 1] = "--model", "tiny"
        assert words[0] == "bernini", f"only `bernini` commands run here, not {words[0]!r}"
        commands.append(words[1:])
    return commands


# Runs a block's commands in one process (one import of torch, not one per command); `--help` exits through argparse.
SHELL_RUNNER = """
import sys
from bernini_diffusers.cli import main
for argv in ARGV:
    try:
        code = main(argv)
    except SystemExit as exit:
        code = exit.code
    if code:
        sys.exit(f"bernini {' '.join(argv)} exited with {code}")
"""


@pytest.mark.parametrize("language, tiny, code", BLOCKS)
def test_block_runs(language: str, tiny: bool, code: str, workdir: Path):
    env = _environment()
    if language == "python":
        source = (TINY_PRELUDE if tiny else "") + code
        result = subprocess.run([sys.executable, "-c", source], cwd=workdir, env=env, capture_output=True,
                                text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
    elif language == "bash":
        source = f"ARGV = {_shell_commands(code, tiny)!r}\n" + SHELL_RUNNER
        result = subprocess.run([sys.executable, "-c", source], cwd=workdir, env=env, capture_output=True, text=True,
                                timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
    else:
        pytest.fail(f"no runner for {language!r} blocks")
    # Every output a block names was written, whole.
    for output in re.findall(r"outputs/[\w./-]+\.(?:mp4|png)", code):
        assert (workdir / output).stat().st_size > 0, output
