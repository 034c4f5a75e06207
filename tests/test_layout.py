"""The house's layout holds: modules import downward only (no two import each other at run time), no module is
over 700 lines, and there is one lock and one atomic-write implementation."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("softbio_hf", "train", "softbio_demo", "bench")
MAX_LINES = 700


def project_files() -> list[Path]:
    files = [ROOT / "app.py"]
    for package in PACKAGES:
        files += sorted((ROOT / package).glob("*.py")) if (ROOT / package).is_dir() else []
    return files


def module_name(path: Path) -> str:
    relative = path.relative_to(ROOT).with_suffix("")
    return ".".join(relative.parts)


def is_type_checking_block(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def runtime_imports(path: Path, known: set[str]) -> set[str]:
    """Project modules that `path` imports when it runs (top level or inside functions), not those imported only
    for type hints under `if TYPE_CHECKING:`."""
    tree = ast.parse(path.read_text())
    package = module_name(path).rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if is_type_checking_block(node):
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return {name for name in found if name in known} - {module_name(path)}


def import_graph() -> dict[str, set[str]]:
    files = project_files()
    known = {module_name(f) for f in files}
    return {module_name(f): runtime_imports(f, known) for f in files}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []
    counter = [0]

    def connect(node: str) -> None:
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for target in graph.get(node, ()):
            if target not in index:
                connect(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in graph:
        if node not in index:
            connect(node)
    return found


def test_no_two_modules_import_each_other_at_run_time():
    assert cycles(import_graph()) == []


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_type_hint_imports_do_not_count_but_function_imports_do(tmp_path):
    source = tmp_path / "softbio_hf"
    source.mkdir()
    (source / "m.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .a import A\ndef f():\n    from .b import g\n"
    )
    global ROOT
    saved, ROOT = ROOT, tmp_path
    try:
        assert runtime_imports(source / "m.py", {"softbio_hf.a", "softbio_hf.b"}) == {"softbio_hf.b"}
    finally:
        ROOT = saved


def test_the_data_module_imports_nothing_from_training():
    assert not {"train.train", "train.loop", "train.checkpoints", "train.build"} & import_graph()["train.data"]


def test_no_module_is_over_700_lines():
    long = {str(f.relative_to(ROOT)): n for f in project_files() if (n := len(f.read_text().splitlines())) > MAX_LINES}
    assert long == {}


def test_one_lock_and_one_atomic_write():
    """fcntl locks and os.replace live in softbio_hf/safe_files.py alone: every command goes through it."""
    offenders = []
    for path in project_files():
        if path.name == "safe_files.py":
            continue
        text = path.read_text()
        offenders += [f"{path.name}: {word}" for word in ("fcntl", "os.replace(", "mkdtemp(") if word in text]
    assert offenders == []
