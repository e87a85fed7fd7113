"""The small modules that let `DiffusionPipeline.from_pretrained(..., trust_remote_code=True)` load a Bernini-R folder.

diffusers 0.42 resolves custom classes from the repository itself: a `model_index.json` whose `_class_name` is
`[module, class]` loads the pipeline class from `<module>.py` at the root, and a component entry `[module, class]`
whose `<component>/<module>.py` exists loads that component's class from it, in both cases only with
`trust_remote_code=True`. Our modules define nothing: they import the classes of the installed `bernini_diffusers`,
so the code that runs is the package's, and a missing package fails with its pip line. `BerniniPipeline.from_pretrained`
never runs them: it reads the index with its own class and the Bernini experts (`loading.pipeline_index`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .. import __version__
from .convert import EXPERTS

PIPELINE_MODULE = "pipeline_bernini"
TRANSFORMER_MODULE = "bernini_transformer"
PIPELINE_CLASS = "BerniniPipeline"
TRANSFORMER_CLASS = "BerniniTransformer3DModel"

_MODULE_TEMPLATE = '''"""{what} for `DiffusionPipeline.from_pretrained(..., trust_remote_code=True)`.

It imports `{name}` from the installed `bernini_diffusers` package and defines nothing itself;
`BerniniPipeline.from_pretrained` loads this folder without it.
"""

try:
    from bernini_diffusers.{module} import {name}
except ImportError as err:
    raise ImportError(
        "This model needs the `bernini_diffusers` package, which is not installed here: "
        'pip install "bernini_diffusers>={version}"'
    ) from err

__all__ = ["{name}"]
'''


def module_source(name: str) -> str:
    """The source of the module that exposes `name` (the pipeline or the transformer class)."""
    module, what = {
        PIPELINE_CLASS: ("pipeline_bernini", "The Bernini-R pipeline class"),
        TRANSFORMER_CLASS: ("transformer_bernini", "The Bernini-R expert class"),
    }[name]
    return _MODULE_TEMPLATE.format(what=what, name=name, module=module, version=__version__)


def add_remote_code(folder: str | os.PathLike) -> list[Path]:
    """Point `model_index.json` of a saved Bernini-R folder at the remote-code modules and write them.

    `_class_name` becomes `["pipeline_bernini", "BerniniPipeline"]`, each expert entry
    `["bernini_transformer", "BerniniTransformer3DModel"]`. Returns the files written.
    """
    folder = Path(folder)
    index_path = folder / "model_index.json"
    index = json.loads(index_path.read_text())
    index["_class_name"] = [PIPELINE_MODULE, PIPELINE_CLASS]
    written = [folder / f"{PIPELINE_MODULE}.py"]
    written[0].write_text(module_source(PIPELINE_CLASS))
    for expert in EXPERTS:
        entry = index.get(expert)
        if isinstance(entry, list) and entry[0] is not None and (folder / expert).is_dir():
            index[expert] = [TRANSFORMER_MODULE, TRANSFORMER_CLASS]
            path = folder / expert / f"{TRANSFORMER_MODULE}.py"
            path.write_text(module_source(TRANSFORMER_CLASS))
            written.append(path)
    # The modules exist before the index names them, and the index is replaced whole: a folder interrupted here
    # still loads, with either index.
    partial = index_path.with_name(f".{index_path.name}.partial")
    try:
        partial.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        os.replace(partial, index_path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    return [index_path, *written]
