"""The package's layering, read from its own source (ast): imports flow one way,
``cli -> pipeline -> methods -> engine``, with no cycle and no borrowed private names.

Layers (a module's layer is its first package under ``lowmoe``):

* ``engine``  -- reading, compute, budgets, writing; knows nothing of methods, CLI or tasks
* ``methods`` -- scoring, merging, EEP; uses the engine
* ``toy``     -- generated tasks, the byte tokenizer, synthetic checkpoints; uses the engine
* the API     -- ``pipeline``, ``score``, ``evaluate``, ``inspect`` and the package itself
* ``cli``     -- the click shell over the API
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "lowmoe"
LEAVES = {"lowmoe.errors", "lowmoe.version"}  # shared by every layer, import nothing of lowmoe
RANK = {"engine": 0, "methods": 1, "toy": 1, "api": 2, "cli": 3}
MAY_IMPORT = {  # layer -> layers it may import (besides itself and the leaves)
    "engine": set(),
    "methods": {"engine"},
    "toy": {"engine"},
    "api": {"engine", "methods", "toy"},
    "cli": {"engine", "methods", "toy", "api"},
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer(mod: str) -> str:
    parts = mod.split(".")
    if mod in LEAVES:
        return "leaf"
    if mod == "lowmoe.__main__":  # ``python -m lowmoe``: the CLI's entry point
        return "cli"
    return parts[1] if len(parts) > 1 and parts[1] in RANK else "api"


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PKG.rglob("*.py"))}


def resolve(mod: str, is_pkg: bool, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = mod.split(".") if is_pkg else mod.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports(mods: dict[str, Path]):
    """(importer, imported module, imported names, at module level?) for every lowmoe import."""
    out = []
    for mod, path in mods.items():
        tree = ast.parse(path.read_text(), str(path))
        top = set(map(id, tree.body))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                target = resolve(mod, path.name == "__init__.py", node)
                if not target.startswith("lowmoe"):
                    continue
                names = [a.name for a in node.names]
                if node.module is None or node.level and not node.module:
                    # ``from . import x``: x may be a submodule
                    for n in names:
                        sub = f"{target}.{n}"
                        out.append((mod, sub if sub in mods else target, [] if sub in mods else [n], id(node) in top, node.lineno))
                else:
                    out.append((mod, target, names, id(node) in top, node.lineno))
            elif isinstance(node, ast.Import):
                for a in node.names:
                    if a.name.startswith("lowmoe"):
                        out.append((mod, a.name, [], id(node) in top, node.lineno))
    return out


MODS = modules()
IMPORTS = imports(MODS)


def test_the_checker_sees_the_package():
    assert {"lowmoe.engine.checkpoint", "lowmoe.methods.eep.runner", "lowmoe.pipeline", "lowmoe.cli.commands"} <= set(MODS)
    assert any(src == "lowmoe.pipeline" and dst.startswith("lowmoe.engine") for src, dst, *_ in IMPORTS)


@pytest.mark.parametrize("src_layer", sorted(RANK))
def test_imports_flow_one_way(src_layer):
    bad = [f"{src}:{line} imports {dst}" for src, dst, _, _, line in IMPORTS
           if layer(src) == src_layer and layer(dst) not in {src_layer, "leaf"} | MAY_IMPORT[src_layer]]
    assert not bad, f"{src_layer} may import only {sorted(MAY_IMPORT[src_layer])}: " + "; ".join(bad)


def test_leaves_import_nothing_of_lowmoe():
    bad = [f"{src} imports {dst}" for src, dst, *_ in IMPORTS if src in LEAVES and dst not in LEAVES]
    assert not bad


def test_no_import_cycle():
    graph: dict[str, set[str]] = {m: set() for m in MODS}
    for src, dst, *_ in IMPORTS:
        target = dst if dst in MODS else dst.rsplit(".", 1)[0]
        if target in MODS and target != src:
            graph[src].add(target)
    index, low, stack, on, cycles, counter = {}, {}, [], set(), [], [0]

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
                cycles.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


def test_no_private_names_across_packages():
    bad = []
    for src, dst, names, _, line in IMPORTS:
        src_pkg = src.rsplit(".", 1)[0] if not MODS[src].name == "__init__.py" else src
        dst_pkg = dst.rsplit(".", 1)[0] if dst in MODS and MODS[dst].name != "__init__.py" else dst
        private = [n for n in names if n.startswith("_") and not n.startswith("__")]
        if private and src_pkg != dst_pkg:
            bad.append(f"{src}:{line} imports {private} from {dst}")
    assert not bad


def test_lowmoe_imports_are_at_module_level():
    """No function-level import of another lowmoe module: the graph above is the whole story."""
    bad = [f"{src}:{line} imports {dst} inside a function" for src, dst, _, top, line in IMPORTS if not top]
    assert not bad


def test_engine_knows_no_method_name():
    """The engine looks methods up nowhere: no method name appears in its source."""
    names = ["frequency", "easy-ep", "reap", "merge-freq", "c-prune", "dern", "eep"]
    bad = [f"{m}: {n!r}" for m, p in MODS.items() if layer(m) == "engine"
           for n in names if f'"{n}"' in p.read_text()]
    assert not bad


def test_transformers_internals_in_one_module():
    """Private attributes of transformers' objects (``config._attn_implementation``, a module's
    ``forward`` replaced, a function's ``__code__``) are touched only in ``engine/hf.py``."""
    markers = ("._attn_implementation", "._experts_implementation", ".__code__", ".forward = ")
    bad = [f"{m}: {k}" for m, p in MODS.items() if m != "lowmoe.engine.hf" for k in markers if k in p.read_text()]
    assert not bad
