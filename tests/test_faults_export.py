"""`bernini export` never destroys what it did not make, and leaves nothing half-made behind.

Every refused `--out` is refused before a source is read (the readers are replaced by ones that fail the test), with
files in the folder that must survive; `--force` replaces only an earlier export and only once the new one is
complete; a run killed mid-way (SIGTERM, SIGINT, or SIGKILL and a later export) leaves no partial folder; exported
files get the permissions a plain mkdir/open gives. The home folder and the working directory are temporary folders
(`HOME`, `chdir`), never the real ones.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import bernini_diffusers.hub_export.export as export_module
from bernini_diffusers.cli import main as cli_main
from bernini_diffusers.hub_export import export_pipeline
from bernini_diffusers.hub_export.export import MARKER, folder_files, is_export, remove_stale_partials
from bernini_diffusers.testing import save_tiny_original_checkpoints, save_tiny_pretrained

SHARD = "150KB"  # several shards per expert


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """A tiny Wan-layout base, the tiny original checkpoints, and an export of them (never written by a test)."""
    root = tmp_path_factory.mktemp("sources")
    save_tiny_pretrained(root / "base", layout="wan")
    save_tiny_original_checkpoints(root / "Bernini-R")
    export_pipeline(root / "Bernini-R", root / "Bernini-R", root / "export", base=root / "base", max_shard_size=SHARD)
    return root


def _snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` with its bytes (symlinks not followed)."""
    return {
        p.relative_to(folder).as_posix(): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and not p.is_symlink()
    }


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.endswith((".partial", ".old")))


def _user_folder(folder: Path) -> Path:
    """A folder of a user's own work, which no export may delete."""
    (folder / "data").mkdir(parents=True, exist_ok=True)
    (folder / "train.py").write_text("print('my training script')\n")
    (folder / "data" / "clip.txt").write_text("my data\n")
    return folder


def _project(tmp_path: Path, sources: Path) -> Path:
    """`project/` holding the user's files, a copy of the base and the original checkpoints."""
    project = _user_folder(tmp_path / "project")
    shutil.copytree(sources / "base", project / "base")
    shutil.copytree(sources / "Bernini-R", project / "Bernini-R")
    return project


@pytest.fixture
def nothing_read(monkeypatch):
    """Make reading a source fail the test: a refused `out` must be refused before any of it."""

    def read(*args, **kwargs):
        raise AssertionError("a source was read before `out` was checked")

    monkeypatch.setattr(export_module, "resolve_layout", read)
    monkeypatch.setattr(export_module, "plan_checkpoint", read)


def _argv(project: Path, out: str, force: bool = True) -> list[str]:
    argv = ["export", "--base", str(project / "base"), "--high_noise_ckpt", str(project / "Bernini-R")]
    argv += ["--low_noise_ckpt", str(project / "Bernini-R"), "--out", out, "--max_shard_size", SHARD]
    return argv + (["--force"] if force else [])


# case -> (how `out` is named, given the project folder and tmp_path; the folder that must survive; the reason)
REFUSED = {
    "empty": (lambda project, tmp: "", lambda project, tmp: project, r"`--out`='' is empty"),
    "dot": (lambda project, tmp: ".", lambda project, tmp: project, r"`--out`='\.' .* is the working directory"),
    "working_directory": (
        lambda project, tmp: str(project), lambda project, tmp: project, r"is the working directory"
    ),
    "parent_of_working_directory": (
        lambda project, tmp: str(project), lambda project, tmp: project, r"holds the working directory"
    ),
    "dot_dot": (
        lambda project, tmp: "..", lambda project, tmp: project, r"`--out`='\.\.' .* holds the working directory"
    ),
    "home": (lambda project, tmp: str(tmp / "home"), lambda project, tmp: tmp / "home", r"is the home folder"),
    "tilde": (lambda project, tmp: "~", lambda project, tmp: tmp / "home", r"is the home folder"),
    "parent_of_home": (lambda project, tmp: str(tmp), lambda project, tmp: tmp, r"holds the home folder"),
    "base": (
        lambda project, tmp: str(project / "base"),
        lambda project, tmp: project,
        r"is `--base`=.*overwrite its own source",
    ),
    "inside_base": (
        lambda project, tmp: str(project / "base" / "transformer"),
        lambda project, tmp: project,
        r"lies inside `--base`=",
    ),
    "checkpoint_folder": (
        lambda project, tmp: str(project / "Bernini-R"),
        lambda project, tmp: project,
        r"is `--high_noise_ckpt`=",
    ),
    "holds_the_sources": (
        lambda project, tmp: str(project), lambda project, tmp: project, r"holds `--base`="
    ),
    "new_folder_inside_a_checkpoint": (
        lambda project, tmp: str(project / "Bernini-R" / "bernini_renderer_high" / "export"),
        lambda project, tmp: project,
        r"lies inside `--high_noise_ckpt`=",
    ),
    "under_a_file": (
        lambda project, tmp: str(project / "train.py" / "export"),
        lambda project, tmp: project,
        r"cannot be written: '.*train\.py' is a file, not a folder",
    ),
    "symlink_to_base": (
        lambda project, tmp: str(tmp / "link"), lambda project, tmp: project, r"`--out`=.*link.*is `--base`="
    ),
}
# the working directory of the cases that need one of their own (the others run in tmp/elsewhere); HOME is tmp/home
CWD = {
    "dot": lambda project: project,
    "working_directory": lambda project: project,
    "parent_of_working_directory": lambda project: project / "data",
    "dot_dot": lambda project: project / "data",
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_refused_out_leaves_every_file(case, sources, tmp_path, monkeypatch, capsys, nothing_read):
    name, survivor, reason = REFUSED[case]
    project = _project(tmp_path, sources)
    home = _user_folder(tmp_path / "home")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (tmp_path / "link").symlink_to(project / "base", target_is_directory=True)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(CWD[case](project) if case in CWD else elsewhere)
    folder = survivor(project, tmp_path)
    before = _snapshot(folder)

    assert cli_main(_argv(project, name(project, tmp_path))) == 2
    err = capsys.readouterr().err
    assert err.startswith("bernini: error: `--out`=") and len(err.strip().splitlines()) == 1
    assert re.search(reason, err), err
    assert _snapshot(folder) == before
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith((".partial", ".old"))]


@pytest.mark.parametrize("case", ["dot", "base", "holds_the_sources", "home"])
def test_the_python_api_refuses_the_same_naming_the_argument(case, sources, tmp_path, monkeypatch, nothing_read):
    name, survivor, reason = REFUSED[case]
    project = _project(tmp_path, sources)
    home = _user_folder(tmp_path / "home")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(CWD[case](project) if case in CWD else home / "data")
    folder = survivor(project, tmp_path)
    before = _snapshot(folder)
    with pytest.raises(ValueError, match=reason.replace("--", "")) as raised:
        ckpt = project / "Bernini-R"
        export_pipeline(ckpt, ckpt, name(project, tmp_path), project / "base", force=True)
    assert str(raised.value).startswith("`out`=") and "--" not in str(raised.value)
    assert _snapshot(folder) == before


def test_the_root_is_refused_before_anything_is_read(tmp_path, monkeypatch, capsys, nothing_read):
    monkeypatch.chdir(tmp_path)
    argv = ["export", "--base", str(tmp_path / "no_base"), "--high_noise_ckpt", "a", "--low_noise_ckpt", "b"]
    assert cli_main([*argv, "--out", "/", "--force"]) == 2
    assert capsys.readouterr().err.strip() == (
        "bernini: error: `--out`='/' is the root of the file system; an export writes a folder of its own: name a new "
        "one inside it."
    )
    with pytest.raises(ValueError, match=r"^`out`='/' is the root of the file system"):
        export_pipeline("a", "b", "/", tmp_path / "no_base", force=True)


# ------------------------------------------------------------------------------------------------ --force


def test_force_over_a_folder_that_is_not_an_export_is_refused(sources, tmp_path, monkeypatch, capsys, nothing_read):
    project = _project(tmp_path, sources)
    out = _user_folder(tmp_path / "mine")
    (out / "model_index.json").write_text("{}")  # a pipeline folder of the user's, say: still not an export of ours
    before = _snapshot(out)
    monkeypatch.chdir(tmp_path)
    assert cli_main(_argv(project, str(out))) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"bernini: error: `--out`={str(out)!r} already exists and is not an earlier export")
    assert "`--force` replaces only an earlier export" in err
    assert _snapshot(out) == before and _leftovers(tmp_path) == []
    assert cli_main(_argv(project, str(out), force=False)) == 2  # and without --force the same reason
    assert "is not an earlier export" in capsys.readouterr().err
    (out / MARKER).write_text('{"package": "something_else"}')  # a marker of another package is no marker
    assert cli_main(_argv(project, str(out))) == 2
    assert "is not an earlier export" in capsys.readouterr().err
    assert (out / "train.py").read_text() == "print('my training script')\n"


def test_force_replaces_an_earlier_export_only_once_the_new_one_is_complete(sources, tmp_path, monkeypatch, capsys):
    project = _project(tmp_path, sources)
    out = shutil.copytree(sources / "export", tmp_path / "Bernini-R-Diffusers")
    (out / "notes.txt").write_text("the earlier export")
    before = _snapshot(out)
    seen = []
    verify = export_module.verify_written

    def verify_and_look(plan, folder, dtype=None):
        verify(plan, folder, dtype)
        seen.append(_snapshot(out) == before)  # the new one is written and checked: the old one is still whole

    monkeypatch.setattr(export_module, "verify_written", verify_and_look)
    monkeypatch.chdir(tmp_path)
    assert cli_main(_argv(project, str(out), force=False)) == 2
    assert "already exists; pass `--force` to replace this earlier export" in capsys.readouterr().err
    assert _snapshot(out) == before

    # notes.txt is no file of an export: --force alone names it and deletes nothing
    assert cli_main(_argv(project, str(out))) == 2
    assert capsys.readouterr().err.strip() == (
        f"bernini: error: `--out`={str(out)!r} is an earlier export that holds 1 file(s) no export wrote: "
        "'notes.txt'. `--force` would delete them; move them out, or add `--delete_extra` to delete them too."
    )
    assert _snapshot(out) == before and seen == []

    assert cli_main([*_argv(project, str(out)), "--delete_extra"]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    assert seen == [True, True]
    assert not (out / "notes.txt").exists() and is_export(out)
    again, earlier = _snapshot(out), _snapshot(sources / "export")
    assert again.pop("README.md") != earlier.pop("README.md")  # the card names the folder and the sources
    assert again == earlier  # the same export again, byte for byte
    assert _leftovers(tmp_path) == []
    assert MARKER not in dict(folder_files(out))  # local bookkeeping, never uploaded


def test_force_lists_the_files_no_export_wrote_and_deletes_them_only_when_told(sources, tmp_path, monkeypatch, capsys):
    project = _project(tmp_path, sources)
    out = shutil.copytree(sources / "export", tmp_path / "Bernini-R-Diffusers")
    written = json.loads((out / MARKER).read_text())["files"]  # the marker lists what the export wrote
    assert sorted(written) == sorted(path for path, _ in folder_files(out))
    (out / "vae" / "my_finetune.safetensors").write_bytes(b"a user's weights")
    for i in range(12):
        (out / f"clip{i:02}.mp4").write_bytes(b"a user's video")
    before = _snapshot(out)
    monkeypatch.chdir(tmp_path)
    assert cli_main(_argv(project, str(out))) == 2
    err = capsys.readouterr().err
    assert "holds 13 file(s) no export wrote: 'clip00.mp4', " in err and "'clip09.mp4' and 3 more." in err, err
    assert "my_finetune" not in err and len(err.strip().splitlines()) == 1  # ten named, the rest counted
    assert _snapshot(out) == before and _leftovers(tmp_path) == []
    with pytest.raises(ValueError, match=r"holds 13 file\(s\) no export wrote.*`delete_extra=True`"):
        export_pipeline(project / "Bernini-R", project / "Bernini-R", out, project / "base", force=True)
    assert cli_main([*_argv(project, str(out), force=False), "--delete_extra"]) == 2  # only with --force
    assert "add `--force`" in capsys.readouterr().err
    assert _snapshot(out) == before

    # a marker without the list (an export of an earlier version, or one made by hand): the layout decides
    (out / MARKER).write_text(json.dumps({"package": "bernini_diffusers"}))
    (out / "vae" / "my_finetune.safetensors").unlink()
    assert cli_main(_argv(project, str(out))) == 2
    assert "holds 12 file(s) no export wrote: 'clip00.mp4'" in capsys.readouterr().err

    assert cli_main([*_argv(project, str(out)), "--delete_extra"]) == 0
    capsys.readouterr()
    assert not list(out.glob("clip*")) and is_export(out) and _leftovers(tmp_path) == []
    assert cli_main(_argv(project, str(out))) == 0  # an export over its own kind needs no more than --force


def test_the_model_card_names_no_local_folder(sources, tmp_path, monkeypatch, capsys):
    card = (sources / "export" / "README.md").read_text()
    assert str(sources) not in card and "`Bernini-R`" in card
    monkeypatch.chdir(tmp_path)
    project = _project(tmp_path, sources)
    assert cli_main(_argv(project, str(tmp_path / "out"), force=False)) == 0
    card = (tmp_path / "out" / "README.md").read_text()
    assert str(tmp_path) not in card and "/tmp" not in card and os.sep + "Bernini-R" not in card
    assert "- high-noise expert (`transformer`): `Bernini-R`" in card, card


def _truncated_checkpoint(project: Path) -> Path:
    ckpt = project / "Bernini-R" / "bernini_renderer_low"
    shard = sorted(ckpt.glob("*.safetensors"))[1]
    shard.write_bytes(shard.read_bytes()[:-64])
    return ckpt


def test_a_failure_under_force_leaves_the_old_export(sources, tmp_path, monkeypatch, capsys):
    project = _project(tmp_path, sources)
    out = shutil.copytree(sources / "export", tmp_path / "Bernini-R-Diffusers")
    before = _snapshot(out)
    monkeypatch.chdir(tmp_path)
    _truncated_checkpoint(project)
    assert cli_main(_argv(project, str(out))) == 2
    assert "truncated" in capsys.readouterr().err
    assert _snapshot(out) == before and _leftovers(tmp_path) == []

    # a failure after the shards are written (a full disk, say)
    shutil.rmtree(project / "Bernini-R")
    shutil.copytree(sources / "Bernini-R", project / "Bernini-R")

    def fail(folder):
        assert list(Path(folder).glob("transformer*/*.safetensors"))
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(export_module, "add_remote_code", fail)
    assert cli_main(_argv(project, str(out))) == 1  # an environment failure: one line, no traceback
    err = capsys.readouterr().err
    assert "No space left on device" in err and "Traceback" not in err
    assert _snapshot(out) == before and _leftovers(tmp_path) == []


# ------------------------------------------------------------------------------------------------ interrupted runs


def _finished_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()  # reaped: the pid names no process
    return process.pid


def _owned(parent: Path, name: str, pid: int, kind: str = "partial", host: str | None = None) -> Path:
    folder = parent / f".{name}.{pid}@{host or export_module._host()}.0123abcd.{kind}"
    (folder / "transformer").mkdir(parents=True)
    (folder / "transformer" / "shard.safetensors").write_bytes(b"half a shard")
    return folder


def test_stale_partials_of_dead_runs_are_removed_by_the_next_export(sources, tmp_path):
    parent = tmp_path / "exports"
    parent.mkdir()
    dead = _finished_pid()
    stale = _owned(parent, "Bernini-R-Diffusers", dead)
    live = _owned(parent, "Bernini-R-Diffusers", os.getpid())  # this process: alive
    other_host = _owned(parent, "Bernini-R-Diffusers", dead, host="another-host")
    # an earlier export set aside by a run killed before it renamed its replacement in: it goes back into place
    set_aside = shutil.copytree(sources / "export", parent / f".restored.{dead}@{export_module._host()}.0123abcd.old")
    # one whose replacement is in place: it goes
    shutil.copytree(sources / "export", parent / "replaced")
    old = shutil.copytree(sources / "export", parent / f".replaced.{dead}@{export_module._host()}.0123abcd.old")
    mine = _user_folder(parent / ".my.partial")  # not named as an export names its folders: left alone
    mine_before = _snapshot(mine)

    export_pipeline(sources / "Bernini-R", sources / "Bernini-R", parent / "new", sources / "base")
    assert not stale.exists() and not old.exists() and not set_aside.exists()
    assert live.exists() and other_host.exists() and _snapshot(mine) == mine_before
    assert is_export(parent / "restored") and is_export(parent / "replaced") and is_export(parent / "new")
    assert sorted(p.name for p in parent.iterdir()) == sorted(
        [live.name, other_host.name, ".my.partial", "new", "replaced", "restored"]
    )
    assert remove_stale_partials(parent) == []  # nothing stale is left


CHILD = """
    import signal, sys, time
    signal.signal(signal.SIGINT, signal.default_int_handler)  # a child of a background job inherits SIGINT ignored
    import bernini_diffusers.hub_export.export as export

    write = export.write_expert_shards

    def write_then_wait(*args, **kwargs):
        written = write(*args, **kwargs)
        print("written", flush=True)  # the shards are in the partial folder: the parent signals now
        time.sleep(120)
        return written

    export.write_expert_shards = write_then_wait
    from bernini_diffusers.cli import main

    sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize(
    "signum", [signal.SIGTERM, pytest.param(signal.SIGINT, marks=pytest.mark.slow)], ids=["SIGTERM", "SIGINT"]
)
def test_a_signal_mid_export_removes_the_partial_at_once(signum, sources, tmp_path):
    script = tmp_path / "child.py"
    script.write_text(textwrap.dedent(CHILD))
    out = tmp_path / "exports" / "Bernini-R-Diffusers"  # its parent does not exist yet: the export makes it
    argv = _argv(sources, str(out), force=False)
    child = subprocess.Popen(
        [sys.executable, str(script), *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path
    )
    try:
        assert child.stdout.readline() == "written\n", child.stderr.read()
        (partial,) = (tmp_path / "exports").glob(".Bernini-R-Diffusers.*.partial")
        assert f".{child.pid}@" in partial.name and (partial / MARKER).is_file()
        child.send_signal(signum)
        returncode = child.wait(timeout=60)
    finally:
        child.kill()
    assert returncode == -signum  # the default action of the signal, once the partial is gone
    if signum == signal.SIGINT:
        assert "KeyboardInterrupt" in child.stderr.read()
    assert not (tmp_path / "exports").exists()  # neither the partial nor the parent the export made


def test_an_interrupted_export_leaves_what_others_wrote_in_the_folder_it_made(sources, tmp_path):
    """`exports/a` is interrupted after `exports/b` completed beside it: the cleanup of `a` removes only its partial
    folder; `exports/` (which `a` created) stays, with `b` and a user's file in it."""
    script = tmp_path / "child.py"
    script.write_text(textwrap.dedent(CHILD))
    exports = tmp_path / "deep" / "exports"  # neither exists yet: the export of `a` makes both
    child = subprocess.Popen(
        [sys.executable, str(script), *_argv(sources, str(exports / "a"), force=False)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
    )
    try:
        assert child.stdout.readline() == "written\n", child.stderr.read()
        b = export_pipeline(sources / "Bernini-R", sources / "Bernini-R", exports / "b", sources / "base")
        (exports / "notes.txt").write_text("mine\n")
        before = {path: data for path, data in _snapshot(exports).items() if not path.startswith(".a.")}
        child.send_signal(signal.SIGTERM)
        returncode = child.wait(timeout=60)
    finally:
        child.kill()
    assert returncode == -signal.SIGTERM
    assert sorted(p.name for p in exports.iterdir()) == ["b", "notes.txt"]  # no `a`, no partial of it
    assert _snapshot(exports) == before and is_export(b)


# ------------------------------------------------------------------------------------------------ permissions


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_exported_folders_get_the_permissions_of_a_plain_mkdir(umask, sources, tmp_path):
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    previous = os.umask(umask)
    try:
        out = export_pipeline(sources / "Bernini-R", sources / "Bernini-R", tmp_path / "out", sources / "base")
    finally:
        os.umask(previous)
    modes = {p.relative_to(tmp_path).as_posix(): p.stat().st_mode & 0o777 for p in [out, *out.rglob("*")]}
    assert {m for p, m in modes.items() if (tmp_path / p).is_dir()} == {0o777 & ~umask}
    assert {m for p, m in modes.items() if (tmp_path / p).is_file()} == {0o666 & ~umask}
    assert {s: signal.getsignal(s) for s in handlers} == handlers  # the export's handlers are gone again
