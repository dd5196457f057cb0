"""docs/API.md names every public name: each function, class and dtype of the public
namespaces, and every public attribute of Tensor, appears in it as a backticked identifier.

A name counts as documented when it is an identifier inside an inline code span of the page
(so `add(input, other, *, alpha=1)` documents ``add``). Public means: no leading
underscore, a function / class / dtype defined by gpudiff (re-imported stdlib and numpy
objects and submodules are left out; the numpy dtypes gpudiff exports are kept).
"""
import importlib
import inspect
import os
import re
import types

import numpy as np
import pytest

ROOT = os.path.join(os.path.dirname(__file__), "..")
DOC = os.path.join(ROOT, "docs", "API.md")

NAMESPACES = [
    "gpudiff", "gpudiff.nn", "gpudiff.nn.functional", "gpudiff.nn.init", "gpudiff.nn.utils",
    "gpudiff.optim", "gpudiff.optim.lr_scheduler", "gpudiff.utils.data", "gpudiff.autograd",
    "gpudiff.cuda", "gpudiff.backends.cuda", "gpudiff.datasets", "gpudiff.transforms",
    "gpudiff.profiler", "gpudiff.backends.cudnn", "gpudiff.backends.mps",
    "gpudiff.amp", "gpudiff.cuda.amp",
]
# documented too when they exist (work in progress may add or remove them)
OPTIONAL_NAMESPACES = ["gpudiff.distributed", "gpudiff.nn.parallel"]


def _documented():
    text = open(DOC, encoding="utf-8").read()
    text = re.sub(r"```.*?```", " ", text, flags=re.S)  # inline code spans only
    names = set()
    for span in re.findall(r"`([^`\n]+)`", text):
        names.update(re.findall(r"[A-Za-z_][A-Za-z0-9_]*", span))
    return text, names


def _is_public_object(obj):
    if isinstance(obj, types.ModuleType):
        return False
    if isinstance(obj, np.dtype) or obj is np.dtype:
        return True
    if not (inspect.isclass(obj) or callable(obj)):
        return False
    module = getattr(obj, "__module__", None) or ""
    return module == "gpudiff" or module.startswith("gpudiff.")


def _public_names(modname):
    mod = importlib.import_module(modname)
    return sorted(n for n in dir(mod)
                  if not n.startswith("_") and _is_public_object(getattr(mod, n)))


def _namespaces():
    out = list(NAMESPACES)
    for name in OPTIONAL_NAMESPACES:
        try:
            importlib.import_module(name)
        except ImportError:
            continue
        out.append(name)
    return out


def test_api_doc_exists_and_stands_alone():
    text = open(DOC, encoding="utf-8").read()
    assert not re.search(r"\.\./shared|shared/(API|ARCHITECTURE)\.md", text)
    for heading in ("Known differences from PyTorch", "gpudiff.Tensor", "gpudiff.autograd",
                    "gpudiff.nn.functional", "gpudiff.optim", "gpudiff.utils.data",
                    "gpudiff.cuda", "gpudiff.backends.cuda", "gpudiff train", "gpudiff bench"):
        assert heading in text, heading


@pytest.mark.parametrize("modname", _namespaces())
def test_every_public_name_is_documented(modname):
    _, documented = _documented()
    missing = [n for n in _public_names(modname) if n not in documented]
    assert missing == [], f"{modname}: not in docs/API.md: {missing}"


def test_every_tensor_attribute_is_documented():
    import gpudiff
    _, documented = _documented()
    names = sorted(n for n in dir(gpudiff.Tensor) if not n.startswith("_"))
    missing = [n for n in names if n not in documented]
    assert missing == [], f"Tensor: not in docs/API.md: {missing}"


def test_every_method_function_is_documented():
    import gpudiff
    _, documented = _documented()
    missing = [n for n in gpudiff.functions.METHODS if n not in documented]
    assert missing == [], f"METHODS: not in docs/API.md: {missing}"


def test_cli_options_are_documented():
    import argparse

    from gpudiff import cli
    text, _ = _documented()
    if not hasattr(cli, "build_parser"):
        pytest.skip("gpudiff.cli has no build_parser()")
    parser = cli.build_parser()
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    missing = []
    for sub in subs[0].choices.values():
        for a in sub._actions:
            for opt in a.option_strings:
                if opt.startswith("--") and opt != "--help" and f"`{opt}" not in text:
                    missing.append(opt)
    assert missing == []
