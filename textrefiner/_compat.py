"""Import the stock OpenAI `clip` package, whatever else is on the path.

Two things get in the way of a plain `import clip`:

* `clip/clip.py` does `from pkg_resources import packaging`, and setuptools >= 81 no longer ships
  `pkg_resources`. While `clip` is imported we lend it a stand-in module that offers exactly that
  attribute (the real `packaging` project), then take the stand-in away again. (The stand-in is
  used even where setuptools still has `pkg_resources`: that import is slow and warns.)
* CoOp-style repositories keep a forked `clip/` folder at their top level, which shadows the
  installed package (MaPLe's fork even changes `build_model`'s signature). When the `clip` that
  Python would import is not the one installed by the `openai-clip` distribution, we load the
  installed one under a private module name instead, so both can live in one process.
"""
import importlib
import importlib.metadata
import importlib.util
import sys
import types
from contextlib import contextmanager
from pathlib import Path

from .errors import UserError

_PRIVATE_NAME = "textrefiner._stock_clip"
_stock_clip = None


@contextmanager
def _pkg_resources_stand_in():
    if sys.modules.get("pkg_resources") is not None:
        yield
        return
    import packaging.version

    blocked = "pkg_resources" in sys.modules  # a None entry: the import was blocked on purpose
    stand_in = types.ModuleType("pkg_resources")
    stand_in.packaging = packaging
    sys.modules["pkg_resources"] = stand_in
    try:
        yield
    finally:
        if sys.modules.get("pkg_resources") is stand_in:
            if blocked:
                sys.modules["pkg_resources"] = None
            else:
                del sys.modules["pkg_resources"]


def _installed_clip_dir() -> Path:
    try:
        dist = importlib.metadata.distribution("openai-clip")
    except importlib.metadata.PackageNotFoundError:
        raise UserError("The OpenAI CLIP package is not installed: run `pip install openai-clip` "
                        "(one of textrefiner's dependencies).") from None
    return Path(dist.locate_file("clip/__init__.py")).resolve().parent


def _load_package_from(directory: Path, name: str):
    spec = importlib.util.spec_from_file_location(
        name, directory / "__init__.py", submodule_search_locations=[str(directory)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def import_clip():
    """Return the stock `clip` package (with its `clip.model` and `clip.clip` submodules loaded)."""
    global _stock_clip
    if _stock_clip is not None:
        return _stock_clip
    installed = _installed_clip_dir()
    found = importlib.util.find_spec("clip")
    on_path = Path(found.origin).resolve().parent if found and found.origin else None
    with _pkg_resources_stand_in():
        if on_path == installed:
            module = importlib.import_module("clip")
        else:
            module = _load_package_from(installed, _PRIVATE_NAME)
        importlib.import_module(module.__name__ + ".model")
        importlib.import_module(module.__name__ + ".clip")
    _stock_clip = module
    return module
