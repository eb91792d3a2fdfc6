"""No import circles: among the package's modules (textrefiner, and the Dassl layer in trainers/)
and among the benchmark scripts, the imports form no cycle, counting those inside functions. A
deferred import that closes a circle works only as long as nobody moves it; it is a sign that an
idea has two homes."""
import ast
import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def module_files(folder: str, package: str = "") -> dict:
    """Dotted module name -> file: the modules of the package installed as `package` from
    `folder`, or (no package) a folder of scripts, each a top-level module."""
    files = {}
    top = os.path.join(REPO, folder)
    for where, _, names in os.walk(top):
        for name in names:
            if name.endswith(".py"):
                path = os.path.join(where, name)
                dotted = os.path.relpath(path, top)[:-3].replace(os.sep, ".")
                dotted = f"{package}.{dotted}" if package else dotted
                files[dotted.removesuffix(".__init__").removesuffix("__init__")] = path
    return files


def imports(path: str, module: str, known: set) -> set:
    """The known modules that `module` imports anywhere in its file."""
    is_package = path.endswith("__init__.py")
    found = set()
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            source = node.module or ""
            if node.level:
                parts = module.split(".")[:len(module.split(".")) - (not is_package)]
                parts = parts[:len(parts) - (node.level - 1)]
                source = ".".join(parts + ([node.module] if node.module else []))
            found.add(source)
            found.update(f"{source}.{alias.name}" for alias in node.names)
    return {name for name in found if name in known and name != module}


def cycles(graph: dict) -> list:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    order, low, stack, on_stack, found = {}, {}, [], set(), []

    def connect(node):
        order[node] = low[node] = len(order)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph[node]:
            if nxt not in order:
                connect(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], order[nxt])
        if low[node] == order[node]:
            component = []
            while not component or component[-1] != node:
                component.append(stack.pop())
                on_stack.discard(component[-1])
            if len(component) > 1:
                found.append(sorted(component))

    for node in graph:
        if node not in order:
            connect(node)
    return found


def import_graph(folder: str, package: str = "") -> dict:
    files = module_files(folder, package)
    return {name: imports(path, name, set(files)) for name, path in files.items()}


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_the_graph_sees_relative_and_absolute_imports():
    graph = import_graph("textrefiner", "textrefiner")
    assert "textrefiner.safe_load" in graph["textrefiner.data.base"]
    assert "textrefiner.errors" in graph["textrefiner.safe_load"]  # `from .errors import`
    assert "textrefiner_trainers.coop" in import_graph("trainers", "textrefiner_trainers")[
        "textrefiner_trainers"]
    assert "common" in import_graph("benchmarks")["run"]


def test_no_import_circles_in_the_package():
    assert cycles(import_graph("textrefiner", "textrefiner")) == []
    assert cycles(import_graph("trainers", "textrefiner_trainers")) == []


def test_no_import_circles_among_the_benchmarks():
    assert cycles(import_graph("benchmarks")) == []
