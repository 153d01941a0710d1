"""The package's layers (README, Layout): each imports only the layers below it, and no module imports
itself back through others. Imports inside functions count: a lazy import is still a dependency."""

import ast
from pathlib import Path

import recengine

ROOT = Path(recengine.__file__).parent
# Lower first. `errors` is the ground every layer stands on; the package's own __init__ is the public face.
LAYERS = ["recengine.errors", "recengine.core", "recengine.parts", "recengine.learning", "recengine.features",
          "recengine.running", "recengine.interfaces", "recengine"]


def modules() -> dict[str, Path]:
    found = {}
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The modules of recengine that `name` imports, anywhere in it (a submodule named in a from-import
    is the module imported, not its package)."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name in known)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            subs = [f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in known]
            found.update(subs if len(subs) == len(node.names) else [base, *subs])
    return {m for m in found if m in known and m != name}


def layer(module: str) -> int:
    return max(i for i, prefix in enumerate(LAYERS) if module == prefix or module.startswith(prefix + "."))


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports(name, path, known) for name, path in known.items()}


def test_each_layer_imports_only_the_layers_below_it():
    upward = sorted(f"{a} ({LAYERS[layer(a)]}) imports {b} ({LAYERS[layer(b)]})"
                    for a, targets in graph().items() for b in targets if layer(b) > layer(a))
    assert not upward, "\n".join(upward)


def test_no_module_imports_itself_back_through_others():
    edges, cycles = graph(), []
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(path[path.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for start in sorted(edges):
        if start not in state:
            visit(start, [start])
    assert not cycles, "\n".join(cycles)


def test_old_module_paths_still_import_the_moved_modules():
    import importlib

    from recengine.parts import FeatureExtractor, learned_state  # the protocol, where plugins have always read it

    assert importlib.import_module("recengine.pit") is importlib.import_module("recengine.core.pit")
    assert importlib.import_module("recengine.testing").check_extractor is importlib.import_module("recengine.parts.contract").check_extractor
    assert importlib.import_module("recengine.plugins").check_number and FeatureExtractor and callable(learned_state)
