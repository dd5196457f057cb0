"""The package's layers (docs/ARCHITECTURE.md): no import circle, and no module imports from a
layer above its own, counting imports inside functions too. The docs stand alone."""
import ast
import os
import re

import pytest

ROOT = os.path.join(os.path.dirname(__file__), "..")
PKG = os.path.join(ROOT, "gpudiff")

# lowest first; a module belongs to the longest prefix listed (docs/ARCHITECTURE.md draws it)
LAYERS = [
    ("0 device layer", ["gpudiff.geometry", "gpudiff.runtime", "gpudiff._C", "gpudiff._cuda_host",
                        "gpudiff.autograd.grad_mode", "gpudiff.utils.runs"]),
    ("1 tape", ["gpudiff.autograd"]),
    ("2 tensor", ["gpudiff.tensor"]),
    ("3 ops", ["gpudiff.ops"]),
    ("4 tensor functions", ["gpudiff.creation", "gpudiff.functions"]),
    ("5 training stack", ["gpudiff.nn", "gpudiff.optim", "gpudiff.utils", "gpudiff.datasets",
                          "gpudiff.transforms", "gpudiff.serialization", "gpudiff.cuda",
                          "gpudiff.backends", "gpudiff.distributed", "gpudiff.profiler",
                          "gpudiff.amp", "gpudiff.graphs", "gpudiff.cpu"]),
    ("6 applications", ["gpudiff.models", "gpudiff.train", "gpudiff.benchmark", "gpudiff.cli",
                        "gpudiff.__main__", "gpudiff"]),
]


def _modules():
    out = {}
    for d, _, files in os.walk(PKG):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(d, f)
                rel = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                out[rel[:-9] if rel.endswith(".__init__") else rel] = path
    return out


def _layer(mod):
    best, best_len = None, -1
    for k, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            if (mod == p or mod.startswith(p + ".")) and len(p) > best_len:
                best, best_len = k, len(p)
    return best


def _imports(mod, path, known):
    """(line, imported module) for every gpudiff import of ``mod``, resolved to a module."""
    is_pkg = path.endswith("__init__.py")
    tree = ast.parse(open(path, encoding="utf-8").read(), path)
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = mod.split(".")
                base = parts if is_pkg else parts[:-1]
                base = base[: len(base) - (node.level - 1)]
                base = ".".join(base + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            names = [base + "." + a.name for a in node.names
                     if (base + "." + a.name) in known or a.name in ("_C", "_cuda_host")]
            names = names or [base]
        for n in names:
            if n.split(".")[0] != "gpudiff":
                continue
            while n and n not in known and n not in ("gpudiff._C", "gpudiff._cuda_host"):
                n = n.rpartition(".")[0]
            if n and n != mod:
                yield node.lineno, n


def _edges():
    known = _modules()
    return known, {m: sorted(set(_imports(m, p, known))) for m, p in known.items()}


def test_every_module_has_a_layer():
    known, _ = _edges()
    assert [m for m in known if _layer(m) is None] == []


def test_no_module_imports_from_a_layer_above_its_own():
    known, edges = _edges()
    bad = []
    for m, targets in edges.items():
        for line, t in targets:
            if t == "gpudiff" and m.startswith("gpudiff.") and _layer(m) < 6:
                bad.append(f"{m}:{line} imports the package face 'gpudiff'")
            elif t != "gpudiff" and _layer(t) > _layer(m):
                bad.append(f"{m}:{line} ({LAYERS[_layer(m)][0]}) imports {t} "
                           f"({LAYERS[_layer(t)][0]})")
    assert bad == []


def test_no_import_circle():
    known, edges = _edges()
    graph = {m: {t for _, t in ts if t in known and t != "gpudiff"
                 and not m.startswith(t + ".")} for m, ts in edges.items()}
    index, low, stack, on, circles, counter = {}, {}, [], set(), [], [0]

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                circles.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    assert circles == []


def test_the_tape_never_imports_tensor_or_ops():
    _, edges = _edges()
    for m in ("gpudiff.autograd.graph", "gpudiff.autograd.function"):
        assert not [t for _, t in edges[m] if t.startswith(("gpudiff.tensor", "gpudiff.ops"))]


def _doc_files():
    files = [os.path.join(ROOT, "README.md")]
    for d in ("docs",):
        files += [os.path.join(ROOT, d, f) for f in sorted(os.listdir(os.path.join(ROOT, d)))
                  if f.endswith(".md")]
    return files


@pytest.mark.parametrize("path", _doc_files(), ids=os.path.basename)
def test_docs_point_only_inside_the_repository(path):
    text = open(path, encoding="utf-8").read()
    assert not re.search(r"\.\./shared|shared/(API|ARCHITECTURE)\.md", text)
    # every repository path a doc names in backticks exists
    missing = []
    for p in re.findall(r"`((?:gpudiff|csrc|tests|bench|docs)/[\w./-]+)`", text):
        if "*" in p or "<" in p or "foo" in p:
            continue
        if not os.path.exists(os.path.join(ROOT, p.rstrip("/"))):
            missing.append(p)
    assert missing == []


# the places of the training stack that may use the raw-array API (docs/ARCHITECTURE.md,
# "The raw-array API, and where it is used"); everything else there uses tensor ops
RAW_ARRAY_USERS = {
    "gpudiff/nn/functional.py", "gpudiff/nn/init.py", "gpudiff/nn/modules/module.py",
    "gpudiff/nn/parameter.py", "gpudiff/nn/utils/clip_grad.py",
    "gpudiff/nn/utils/convert_parameters.py", "gpudiff/nn/parallel/distributed.py",
    "gpudiff/optim/adadelta.py", "gpudiff/optim/adagrad.py", "gpudiff/optim/adam.py",
    "gpudiff/optim/optimizer.py", "gpudiff/optim/rmsprop.py", "gpudiff/optim/sgd.py",
}


def test_nn_and_optim_reach_arrays_only_where_the_docs_say():
    found, private = set(), set()
    for top in ("nn", "optim"):
        for d, _, files in os.walk(os.path.join(PKG, top)):
            for f in files:
                if not f.endswith(".py"):
                    continue
                path = os.path.join(d, f)
                rel = os.path.relpath(path, ROOT).replace(os.sep, "/")
                text = open(path, encoding="utf-8").read()
                if re.search(r"\.array\b|\.xp\b", text):
                    found.add(rel)
                if "_make(" in text:
                    private.add(rel)   # the engine's constructor: Tensor.from_array instead
    assert found <= RAW_ARRAY_USERS, sorted(found - RAW_ARRAY_USERS)
    assert private == set()
    doc = open(os.path.join(ROOT, "docs", "ARCHITECTURE.md"), encoding="utf-8").read()
    for rel in RAW_ARRAY_USERS:
        short = rel.split("gpudiff/", 1)[1]
        assert short in doc or short.rsplit("/", 1)[0] + "/" in doc, rel
