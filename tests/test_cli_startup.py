"""The command line answers at once and quietly: `--help` imports neither torch nor diffusers, the parser's torch-free
copies of runtime tables match the tables, and known third-party import noise is dropped unless `--debug`."""

from __future__ import annotations

import argparse
import inspect
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bernini_diffusers import acceleration, cli, constants, memory, options
from bernini_diffusers.pipeline_bernini import BerniniPipeline

SRC = str(Path(__file__).resolve().parents[1] / "src")

# Runs `main(argv)` in a fresh interpreter and reports what it imported.
_PROBE = """
import json, sys
from bernini_diffusers.cli import main
try:
    main(json.loads(sys.argv[1]))
except SystemExit:
    pass
print(json.dumps({name: name in sys.modules for name in ("torch", "diffusers", "transformers", "numpy")}),
      file=sys.stderr)
"""


def _python(code: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([SRC, os.environ.get("PYTHONPATH", "")])}
    return subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, timeout=300, check=False
    )


@pytest.mark.parametrize(
    "argv", [["--help"], ["generate", "--help"], ["demo", "--help"], ["export", "--help"], ["serve", "--help"]]
)
def test_help_imports_no_torch_and_prints_only_the_help(argv):
    run = _python(_PROBE, json.dumps(argv))
    *noise, report = run.stderr.strip().splitlines()
    assert json.loads(report) == {"torch": False, "diffusers": False, "transformers": False, "numpy": False}
    assert noise == [] and run.stdout.startswith("usage: bernini")


def _choices(parser: argparse.ArgumentParser, dest: str) -> tuple:
    (action,) = [a for a in parser._actions if a.dest == dest]
    return tuple(action.choices)


def test_the_parsers_torch_free_tables_match_the_runtime_ones():
    parser = argparse.ArgumentParser()
    options.add_model_arguments(parser)
    assert _choices(parser, "memory_profile") == tuple(memory.MEMORY_PROFILES) == constants.MEMORY_PROFILE_NAMES
    presets = acceleration.CACHE_PRESETS.items()
    calibration_free = tuple(name for name, preset in presets if not preset.needs_calibration)
    assert _choices(parser, "cache_preset") == calibration_free == constants.CACHE_PRESET_NAMES
    parameters = inspect.signature(BerniniPipeline.__call__).parameters
    official = {name: parameters[name].default for name in acceleration.TURBO if name != "num_inference_steps"}
    assert constants.OFFICIAL_GUIDANCE == official
    # The generate flags share the call's defaults (`norm_threshold` is one value per guidance link there).
    (commands,) = [a for a in cli.build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    generate = {action.dest: action.default for action in commands.choices["generate"]._actions}
    norm_threshold = [official["norm_threshold"]] * 3  # one value per guidance link
    assert {name: generate[name] for name in official} == {**official, "norm_threshold": norm_threshold}


def test_known_import_noise_is_dropped_and_real_warnings_kept():
    code = """
import logging, sys
from bernini_diffusers.options import IMPORT_NOISE, silence_import_noise
if sys.argv[1] == "quiet":
    silence_import_noise()
logging.basicConfig(format="%(name)s: %(message)s")
logging.getLogger("torchao").warning("Failed to load /x/_C_mxfp8.so: Could not load this library: /x/_C_mxfp8.so")
logging.getLogger("torch.utils._pytree").warning(
    "<enum 'KernelPreference'> is an Enum subclass and is now natively supported by torch.compile as an opaque value")
logging.getLogger("diffusers.quantizers.torchao.torchao_quantizer").warning(
    "Unable to import `torchao` Tensor objects. This may affect loading checkpoints serialized with `torchao`")
for name in IMPORT_NOISE:
    logging.getLogger(name).warning("a real warning")
"""
    quiet, loud = _python(code, "quiet"), _python(code, "loud")
    assert quiet.stderr.splitlines() == [f"{name}: a real warning" for name in options.IMPORT_NOISE]
    assert len(loud.stderr.splitlines()) == 3 + len(options.IMPORT_NOISE)


def test_the_command_line_silences_the_noise_unless_debug(monkeypatch):
    calls = []
    monkeypatch.setattr(cli, "silence_import_noise", lambda: calls.append(True))
    monkeypatch.delenv(options.DEBUG_ENV, raising=False)
    assert cli.main(["export", "--out", "x", "--dry_run"]) == 2
    with pytest.raises(ValueError, match="dry_run"):  # --debug: the noise and the traceback show
        cli.main(["--debug", "export", "--out", "x", "--dry_run"])
    assert calls == [True]
    for logger in map(logging.getLogger, options.IMPORT_NOISE):  # the real filter is idempotent
        before = list(logger.filters)
        options.silence_import_noise()
        options.silence_import_noise()
        assert len(logger.filters) == len(before) + (0 if before else 1)
        logger.filters[:] = before


@pytest.mark.parametrize("rank, shown", [(None, True), ("0", True), ("1", False)])
def test_notes_are_printed_by_the_first_rank_only(rank, shown, monkeypatch, capsys):
    if rank is None:
        monkeypatch.delenv("RANK", raising=False)
    else:
        monkeypatch.setenv("RANK", rank)
    options.note("note: something")
    assert (capsys.readouterr().err == "note: something\n") is shown
