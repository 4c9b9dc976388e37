"""The package's layers import in one direction, and no module imports itself back.

Every import statement of every module counts: at the top, inside a function, under
``if TYPE_CHECKING:``, relative or absolute. ``from a.b import c`` is an edge to the module
``a.b.c`` when there is one, else to ``a.b`` (its ``__init__.py``). The packages a module
sits in, which Python imports before it, are not edges: every module would otherwise import
the package's face (``avalanche_cliphinge/__init__.py``), which names the public classes.

A module may import the modules of its own layer (no cycle) and of the layers before it in
``LAYERS``, never one after. A module that no layer names fails too: place it.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple

PACKAGE = Path(__file__).resolve().parents[1] / "avalanche_cliphinge"

#: The layers, first to last; a name ending in ``.*`` is a package and everything in it. The
#: longest name that matches a module places it (``plugins.contract`` before ``plugins.*``).
LAYERS: List[Tuple[str, Sequence[str]]] = [
    # errors, the config and its validation, one seeding rule, atomic writes, torch/Avalanche
    # fixes, how inductor builds a graph's CPU kernels, torchrun's processes
    (
        "infrastructure",
        ("errors", "config", "config_checks", "seeding", "atomic", "kill_points", "compat")
        + ("kernel_batches", "distributed.*"),
    ),
    # class statistics, hard pairs, the hinge, logit fusion: functions on tensors
    ("maths", ("gaussian_stats", "gaussian_storage", "gaussian", "losses", "hard_pairs", "fusion")),
    # backbone, prompts, heads, LoRA, CLIP's input (streams), the model, its factory and file
    ("model", ("model.*", "streams", "dataset_transforms")),
    # stream builders and image folders, minibatches, the feature cache
    ("data", ("benchmarks.*", "folders", "loaders", "feature_cache")),
    # what the strategy, plugins, runners and metrics share; how a step is captured
    ("step state", ("step_state", "step.*", "plugins.contract", "capture")),
    # the method's plugins, Avalanche's plugins on the strategy, metrics and loggers
    ("plugins and metrics", ("plugins.*", "avalanche_plugins", "metrics", "wandb_logger")),
    ("runners", ("runner_checks", "captured_shapes", "compiled_step")),
    ("strategy", ("strategy_inputs", "strategy_tasks", "strategy")),
    # the CLIP baselines a comparison needs, as Avalanche strategies beside the method
    ("baselines", ("baselines.*",)),
    # the run command, its output folder and reports; the package's face ("")
    ("application", ("app.*", "", "__main__")),
]


class Edge(NamedTuple):
    """``source`` imports ``target`` (dotted module names) at ``where``."""

    source: str
    target: str
    where: str  # path:line of the import statement


def module_names(package: Path) -> Dict[str, Path]:
    """``{dotted module name: file}`` of every module under ``package``."""
    names = {}
    for path in sorted(package.rglob("*.py")):
        parts = list(path.relative_to(package.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        names[".".join(parts)] = path
    return names


def _imported(node: ast.AST, module: str, is_package: bool) -> Iterator[Tuple[str, List[str]]]:
    """``(base, names)`` of an import statement: ``import a.b`` is ``("a.b", [])``,
    ``from ..a import b, c`` (in ``module``) is ``("<parent>.a", ["b", "c"])``."""
    if isinstance(node, ast.Import):
        for alias in node.names:
            yield alias.name, []
    elif isinstance(node, ast.ImportFrom):
        base = module if is_package else module.rpartition(".")[0]
        for _ in range(node.level - 1 if node.level else 0):
            base = base.rpartition(".")[0]
        if node.level:
            base = f"{base}.{node.module}" if node.module else base
        else:
            base = node.module or ""
        yield base, [alias.name for alias in node.names]


def import_edges(package: Path) -> Tuple[List[Edge], Dict[str, Path]]:
    """Every import of one of ``package``'s modules by another, wherever it stands."""
    modules = module_names(package)
    edges = []
    for module, path in modules.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            for base, names in _imported(node, module, path.name == "__init__.py"):
                where = f"{path.relative_to(package.parent)}:{getattr(node, 'lineno', 0)}"
                targets = [f"{base}.{name}" for name in names if f"{base}.{name}" in modules]
                if len(targets) < len(names) or not names:
                    # a name defined in ``base`` (or ``import base``): the module ``base``,
                    # or the longest module that prefixes it
                    found = base
                    while found and found not in modules:
                        found = found.rpartition(".")[0]
                    targets.append(found)
                for target in targets:
                    if target and target != module:
                        edges.append(Edge(module, target, where))
    return edges, modules


def imports_by_name(package: Path) -> List[str]:
    """``path:line`` of each call of ``importlib.import_module`` or ``__import__`` outside
    the package's face (whose lazy table imports modules of every layer, from the top): an
    import this test cannot read."""
    found = []
    for module, path in module_names(package).items():
        if module == package.name:
            continue
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Call):
                called = node.func
                name = called.attr if isinstance(called, ast.Attribute) else ""
                name = called.id if isinstance(called, ast.Name) else name
                if name in ("import_module", "__import__"):
                    found.append(f"{path.relative_to(package.parent)}:{node.lineno}")
    return found


def layer_of(module: str, root: str) -> Optional[int]:
    """Index in ``LAYERS`` of ``module`` (a dotted name under ``root``), or ``None``."""
    name = module[len(root) + 1 :] if module != root else ""
    best: Optional[Tuple[int, int]] = None  # (length of the matching entry, layer)
    for index, (_, entries) in enumerate(LAYERS):
        for entry in entries:
            if entry.endswith(".*"):
                prefix = entry[:-2]
                hit = name == prefix or name.startswith(prefix + ".")
            else:
                hit = name == entry
            if hit and (best is None or len(entry) > best[0]):
                best = (len(entry), index)
    return None if best is None else best[1]


def cycles(edges: Sequence[Edge]) -> List[Tuple[List[str], List[str]]]:
    """The import cycles: ``(modules, a cycle through them [a, b, ..., a])`` for each set of
    modules that import each other (a strongly connected component, Tarjan's algorithm)."""
    graph: Dict[str, List[str]] = {}
    for edge in edges:
        graph.setdefault(edge.source, []).append(edge.target)
        graph.setdefault(edge.target, [])
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: set = set()
    components: List[List[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return [
        (component, _cycle_through(component[0], graph, set(component))) for component in components
    ]


def _cycle_through(start: str, graph: Dict[str, List[str]], members: set) -> List[str]:
    """A shortest way from ``start`` back to itself among ``members`` (breadth first)."""
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        reached = []
        for node in frontier:
            for nxt in sorted(set(graph[node]) & members):
                if nxt == start:
                    return paths[node] + [start]
                if nxt not in paths:
                    paths[nxt] = paths[node] + [nxt]
                    reached.append(nxt)
        frontier = reached
    raise AssertionError(f"{start} is on no cycle")


def problems(package: Path) -> List[str]:
    """What breaks the layering of ``package``: unplaced modules, cycles, upward edges."""
    edges, modules = import_edges(package)
    root = package.name
    messages = []
    for module in modules:
        if layer_of(module, root) is None:
            messages.append(f"{module} is in no layer: add it to LAYERS in tests/test_layers.py")
    for where in imports_by_name(package):
        messages.append(f"an import by name at {where}: write an import statement")
    for members, cycle in cycles(edges):
        ties = []
        for a, b in zip(cycle, cycle[1:]):
            where = next(e.where for e in edges if (e.source, e.target) == (a, b))
            ties.append(f"{a} -> {b} ({where})")
        messages.append(
            f"import cycle of {len(members)} modules ({', '.join(members)}); one way round: "
            + ", ".join(ties)
        )
    for edge in edges:
        low, high = layer_of(edge.source, root), layer_of(edge.target, root)
        if low is not None and high is not None and high > low:
            messages.append(
                f"upward import {edge.source} ({LAYERS[low][0]}) -> {edge.target} "
                f"({LAYERS[high][0]}) at {edge.where}"
            )
    return messages


def test_layers_import_one_way_and_no_module_imports_itself_back():
    found = problems(PACKAGE)
    assert not found, "\n".join(found)


def test_the_check_sees_hidden_imports(tmp_path):
    """An import inside a function, one under ``TYPE_CHECKING``, a relative and an absolute
    one each make an edge; a cycle, an upward edge, an unplaced module and an import by name
    are each named."""
    package = tmp_path / "avalanche_cliphinge"
    (package / "plugins").mkdir(parents=True)
    files = {
        "__init__.py": "",
        "config.py": "def f():\n    from .losses import hinge_loss\n",
        "losses.py": "import avalanche_cliphinge.config\nhinge_loss = None\n",
        "metrics.py": (
            "from typing import TYPE_CHECKING\n"
            "if TYPE_CHECKING:\n"
            "    from .plugins.second_stage import SecondStagePlugin\n"
        ),
        "plugins/__init__.py": "",
        "plugins/second_stage.py": "from .. import metrics\n",
        "extra.py": "import importlib\nimportlib.import_module('avalanche_cliphinge.app')\n",
    }
    for name, text in files.items():
        (package / name).write_text(text)
    name = "avalanche_cliphinge"
    assert problems(package) == [
        f"{name}.extra is in no layer: add it to LAYERS in tests/test_layers.py",
        f"an import by name at {name}/extra.py:2: write an import statement",
        f"import cycle of 2 modules ({name}.config, {name}.losses); one way round: "
        f"{name}.config -> {name}.losses ({name}/config.py:2), "
        f"{name}.losses -> {name}.config ({name}/losses.py:1)",
        f"import cycle of 2 modules ({name}.metrics, {name}.plugins.second_stage); one way "
        f"round: {name}.metrics -> {name}.plugins.second_stage ({name}/metrics.py:3), "
        f"{name}.plugins.second_stage -> {name}.metrics ({name}/plugins/second_stage.py:1)",
        f"upward import {name}.config (infrastructure) -> {name}.losses (maths) at "
        f"{name}/config.py:2",
    ]


#: the most lines a module may have: the library's and the application's (``app/``)
LIBRARY_LINES, APPLICATION_LINES = 400, 500


def test_no_module_is_over_its_size_limit():
    names = module_names(PACKAGE)
    assert len(names) > 50
    over = []
    for name, path in names.items():
        limit = APPLICATION_LINES if name.startswith("avalanche_cliphinge.app.") else LIBRARY_LINES
        lines = len(path.read_text().splitlines())
        if lines > limit:
            over.append(f"{name}: {lines} lines (limit {limit}): split it by job")
    assert not over, "\n".join(over)
