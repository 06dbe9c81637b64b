"""The package's layer rules, read from every module's `import` statements (no module is run).

Layers, lowest first; a module may import from its own layer and the ones before it:

    config      rn50.config(_sections, _validation), .errors, .search_space, .records: typed
                                                config, recipes, sweeps, the run's permanent
                                                errors, the records coming back from Ray
    io          rn50.io.*                       storage (local/S3), MLflow tracking, backups
    data        rn50.data.*                     datasets, transforms, loaders, ImageNet shards
    core        rn50.core.*                     model, schedule, loop, checkpoint state + store
    serve       rn50.serve.*                    evaluation, inference, demo, exports
    distributed rn50.distributed.*              Ray Train / Tune: the only layer importing ray
    aliases     rn50.demo, rn50.train, ...      the commands: `python -m rn50.X`, `rn50-X`

Also: `ray` at module level only in the distributed layer; no import cycle among the modules of
rn50/, ray_jobs/ and benchmarks/ (function-level imports included); benchmarks never import tests.
"""
from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
LAYERS = ["config", "io", "data", "core", "serve", "distributed", "aliases"]
ALIASES = {"rn50.demo", "rn50.export", "rn50.checkpoint", "rn50.mlflow_backup", "rn50.train",
           "rn50.tune", "rn50.evaluate", "rn50.prepare_imagenet"}


def module_name(path: Path) -> str:
    """Dotted module name of a file under the repository root."""
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def layer_of(module: str) -> str | None:
    """The layer an rn50 module belongs to (None for modules outside rn50)."""
    if module in ALIASES:
        return "aliases"
    if module in ("rn50", "rn50.config", "rn50.config_sections", "rn50.config_validation",
                  "rn50.errors", "rn50.search_space", "rn50.records"):
        return "config"
    parts = module.split(".")
    if parts[0] == "rn50" and len(parts) > 1 and parts[1] in LAYERS:
        return parts[1]
    return None


def imports_of(path: Path, runtime_only: bool = False) -> list[tuple[str, bool, int]]:
    """(imported module, at module level?, line) for every import in a file; `runtime_only`
    leaves out those under `if TYPE_CHECKING:` (for annotations: never run, so no cycle)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    top_level = {id(node) for node in tree.body}
    typing_only = set()
    if runtime_only:
        typing_only = {id(inner) for node in ast.walk(tree) if isinstance(node, ast.If)
                       and "TYPE_CHECKING" in ast.unparse(node.test)
                       for statement in node.body for inner in ast.walk(statement)}
    found = []
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        found += [(name, id(node) in top_level, node.lineno) for name in names]
    return found


def project_files() -> list[Path]:
    """Every Python file of the library, the entrypoints and the benchmarks."""
    return sorted([*REPO.glob("rn50/**/*.py"), *REPO.glob("ray_jobs/*.py"),
                   *REPO.glob("benchmarks/*.py")])


def known_modules() -> set[str]:
    """Module names that exist in the project (so `from rn50.x import name` resolves to rn50.x)."""
    return {module_name(path) for path in project_files()}


def project_edges() -> dict[str, set[str]]:
    """module -> project modules it imports (anywhere in the file)."""
    known = known_modules()
    return {module_name(path): {name for name, _, _ in imports_of(path, runtime_only=True)
                                if name in known}
            - {module_name(path)} for path in project_files()}


def layer_violations() -> list[str]:
    """Imports from a higher layer, and module-level `ray` imports outside the distributed layer."""
    known, problems = known_modules(), []
    for path in REPO.glob("rn50/**/*.py"):
        module = module_name(path)
        own = layer_of(module)
        assert own is not None, f"{module} belongs to no layer: put it in one of {LAYERS}"
        for name, top_level, line in imports_of(path):
            target = layer_of(name) if name in known else None
            if target and LAYERS.index(target) > LAYERS.index(own):
                problems.append(f"{path.relative_to(REPO)}:{line} ({own}) imports {name} "
                                f"({target})")
            if (name == "ray" or name.startswith("ray.")) and top_level and own != "distributed":
                problems.append(f"{path.relative_to(REPO)}:{line} ({own}) imports {name} at module "
                                "level; only rn50.distributed may")
    return problems


def find_cycle(edges: dict[str, set[str]]) -> list[str]:
    """One import cycle as a list of modules, or [] when the graph has none."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str]:
        state[node] = 1
        stack.append(node)
        for target in sorted(edges.get(node, ())):
            if state.get(target) == 1:
                return stack[stack.index(target):] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        stack.pop()
        state[node] = 2
        return []

    for node in sorted(edges):
        if node not in state and (cycle := visit(node)):
            return cycle
    return []


def test_no_module_imports_from_a_higher_layer_and_only_distributed_imports_ray():
    problems = layer_violations()
    assert not problems, "layer rules broken:\n" + "\n".join(problems)


def test_no_import_cycles_in_library_entrypoints_and_benchmarks():
    cycle = find_cycle(project_edges())
    assert not cycle, "import cycle: " + " -> ".join(cycle)


def test_benchmarks_do_not_import_tests():
    offenders = [f"{path.name}:{line} imports {name}" for path in REPO.glob("benchmarks/*.py")
                 for name, _, line in imports_of(path)
                 if name == "tests" or name.startswith("tests.")]
    assert not offenders, offenders


def test_the_checks_see_a_violation_and_a_cycle():
    """Negative controls: the walkers really find an upward import and a cycle when one exists."""
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) == []
    # An annotation-only import is read (layers) but makes no runtime edge (cycles).
    checks = REPO / "rn50" / "config_validation.py"
    assert "rn50.config" in {name for name, _, _ in imports_of(checks)}
    assert "rn50.config" not in {name for name, _, _ in imports_of(checks, runtime_only=True)}
    assert layer_of("rn50.core.model") == "core"
    assert layer_of("rn50.distributed.driver") == "distributed"
    assert LAYERS.index(layer_of("rn50.serve.artifacts")) > \
        LAYERS.index(layer_of("rn50.core.engine"))
