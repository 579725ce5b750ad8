"""The code's shape, read from its source: no import cycle between the project's modules, no project module
imported inside a function (where a cycle hides), no function longer than MAX_LINES lines."""

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("data", "model", "orchestration", "evaluation", "serving", "jobs")
MAX_LINES = 60  # a function's lines, its docstring and decorators included
# imported inside the function that checks the optional dependency is installed first
OPTIONAL = {("jobs.export", "serving.onnx_export")}


def modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            parts = path.relative_to(REPO).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def project_imports(tree: ast.AST, known: dict) -> list[tuple[ast.AST, str, bool]]:
    """(node, the project module it imports, inside a function?) for every import of a project module."""

    def resolve(name: str) -> str | None:
        while name and name not in known:
            name = name.rpartition(".")[0]
        return name or None

    out = []

    def visit(node, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import):
                names = [a.name for a in child.names]
            elif isinstance(child, ast.ImportFrom) and child.level == 0 and child.module:
                names = [f"{child.module}.{a.name}" for a in child.names] + [child.module]
            else:
                names = []
            for target in {resolve(n) for n in names if n.split(".")[0] in PACKAGES} - {None}:
                out.append((child, target, in_function))
            visit(child, in_function or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef))

    visit(tree, False)
    return out


def test_no_import_cycle_and_no_project_import_inside_a_function():
    known = modules()
    graph: dict[str, set[str]] = {m: set() for m in known}
    inside = []
    for name, path in known.items():
        for node, target, in_function in project_imports(ast.parse(path.read_text()), known):
            if target == name or target == name.rpartition(".")[0]:
                continue  # a package's own __init__
            graph[name].add(target)
            if in_function and (name, target) not in OPTIONAL:
                inside.append(f"{path.relative_to(REPO)}:{node.lineno} imports {target}")
    assert not inside, "project modules imported inside functions:\n" + "\n".join(inside)
    assert not cycles(graph), f"import cycles: {cycles(graph)}"


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            v, children = work[-1]
            w = next(children, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                component = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    component.append(w)
                    if w == v:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_function_is_longer_than_max_lines():
    long = []
    for path in modules().values():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                first = min([node.lineno] + [d.lineno for d in node.decorator_list])
                if node.end_lineno - first + 1 > MAX_LINES:
                    long.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name} ({node.end_lineno - first + 1})")
    assert not long, f"functions over {MAX_LINES} lines:\n" + "\n".join(long)


ROOMS = ("run", "cluster", "records", "judging", "training", "services")  # orchestration/__init__.py


def test_each_room_of_orchestration_imports_only_the_rooms_before_it():
    known = modules()
    wrong = []
    for name, path in known.items():
        parts = name.split(".")
        if parts[0] != "orchestration" or len(parts) < 3:
            continue
        mine = ROOMS.index(parts[1])
        for node, target, _ in project_imports(ast.parse(path.read_text()), known):
            room = target.split(".")[1] if target.startswith("orchestration.") else None
            if room in ROOMS and ROOMS.index(room) > mine:
                wrong.append(f"{path.relative_to(REPO)}:{node.lineno} ({parts[1]}) imports {target} ({room})")
    assert not wrong, "imports against orchestration's room order:\n" + "\n".join(wrong)
    assert sorted(p.name for p in (REPO / "orchestration").iterdir() if p.suffix == ".py") == ["__init__.py"]


def test_the_run_room_imports_neither_ray_nor_mlflow():
    """orchestration/run/__init__.py's promise, checked in a fresh interpreter (imports are transitive)."""
    import subprocess
    import sys

    names = sorted(p.stem for p in (REPO / "orchestration" / "run").glob("*.py") if p.stem != "__init__")
    code = "import sys\n" + "".join(f"import orchestration.run.{n}\n" for n in names)
    code += "print(sorted({m.split('.')[0] for m in sys.modules} & {'ray', 'mlflow'}))"
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stdout + r.stderr[-2000:]
