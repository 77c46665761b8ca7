"""The packages' import graph runs one way: the models at the bottom, then the toy world and the metrics, then
training and evaluation (which never import each other), then the applications; and no module imports, however
indirectly, a module that imports it back. Imports inside functions count: a lazy import that hides a cycle is
still a cycle."""
from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# bottom up; a package may import its own layer's other packages and any layer below
LAYERS = [{"configs"}, {"tokenizer"}, {"mllm"}, {"shapes", "metrics"}, {"train", "eval"}, {"demo", "serve"},
          {"unitok_cli"}]
LAYER = {pkg: i for i, layer in enumerate(LAYERS) for pkg in layer}
NEVER = {("train", "eval"), ("eval", "train")}  # side by side, not one on the other


def modules() -> dict[str, Path]:
    out = {"unitok_cli": REPO / "unitok_cli.py"}
    for pkg in LAYER:
        for path in (REPO / pkg).rglob("*.py") if (REPO / pkg).is_dir() else ():
            parts = path.relative_to(REPO).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The project modules ``name`` imports, at module level or inside functions."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            # a submodule's `from . import sibling` passes through its own package: not an edge back to it
            if target and target != name and not name.startswith(target + "."):
                found.add(target)
    return found


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports(name, path, known) for name, path in known.items()}


def test_every_import_of_a_project_module_names_one_that_exists():
    """A moved module leaves no import behind, a lazy one inside a function included (they fail only when run)."""
    known = modules()
    missing = []
    for name, path in known.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                targets = [base]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            missing += [f"{name}:{node.lineno} imports {t}" for t in targets
                        if t.split(".")[0] in LAYER and t not in known]
    assert not missing, missing


def test_no_import_runs_up_a_layer_or_across_train_and_eval():
    wrong = sorted(f"{a} -> {b}" for a, targets in graph().items() for b in targets
                   if LAYER[b.split(".")[0]] > LAYER[a.split(".")[0]]
                   or (a.split(".")[0], b.split(".")[0]) in NEVER)
    assert not wrong, wrong


def test_the_module_graph_has_no_cycles():
    g = graph()
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in g[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in g:
        if v not in index:
            visit(v)
    assert not cycles, cycles


def test_the_checker_sees_a_cycle_and_an_upward_import(tmp_path, monkeypatch):
    """The two tests above can fail: a lazy import inside a function is an edge, and a cycle through it is found."""
    (tmp_path / "tokenizer").mkdir()
    (tmp_path / "tokenizer" / "__init__.py").write_text("")
    (tmp_path / "tokenizer" / "a.py").write_text("def f():\n    from mllm import b\n")
    (tmp_path / "mllm").mkdir()
    (tmp_path / "mllm" / "__init__.py").write_text("")
    (tmp_path / "mllm" / "b.py").write_text("from tokenizer.a import f\n")
    (tmp_path / "unitok_cli.py").write_text("")
    monkeypatch.setattr(__import__(__name__), "REPO", tmp_path)
    g = graph()
    assert g["tokenizer.a"] == {"mllm.b"} and g["mllm.b"] == {"tokenizer.a"}
    try:
        test_no_import_runs_up_a_layer_or_across_train_and_eval()
    except AssertionError as err:
        assert "tokenizer.a -> mllm.b" in str(err)
    else:
        raise AssertionError("the upward import went unseen")
    try:
        test_the_module_graph_has_no_cycles()
    except AssertionError as err:
        assert "mllm.b" in str(err) and "tokenizer.a" in str(err)
    else:
        raise AssertionError("the cycle went unseen")
