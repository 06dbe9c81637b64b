"""The package's layer rules, read from every module's `import` statements (no module is run).

Layers, lowest first; a module may import from its own layer and the ones before it:

    config      rn50.config(_sections, _validation), .errors, .search_space, .records: typed
                                                config, recipes, sweeps, the run's permanent
                                                errors, the records coming back from Ray
    io          rn50.io.*                       storage (local/S3), MLflow tracking, backups
    data        rn50.data.*                     datasets, transforms, loaders, ImageNet shards
    core        rn50.core.*                     model, schedule, loop, what a checkpoint holds
    serve       rn50.serve.*                    evaluation, inference, demo, exports
    distributed rn50.distributed.*              Ray Train / Tune: the only layer importing ray
    aliases     rn50.demo, rn50.train, ...      the commands: `python -m rn50.X`, `rn50-X`

Also: `ray` at module level only in the distributed layer; no import cycle among the modules of
rn50/, ray_jobs/ and benchmarks/ (function-level imports included); benchmarks never import tests.

One home each (read from the source text of rn50/, ray_jobs/ and benchmarks/; tests look at the
files from outside and may name them):

    MLflow clients      only rn50/io/tracking.py builds an `MlflowClient` (the `Tracker`)
    checkpoint files    only the store, rn50/io/checkpoints.py, names a checkpoint's files/folders
    storage URIs        only the resolver, rn50/io/storage.py + s3.py, puts an s3:// or file://
                        URI together from pieces (`"s3://" + x`, f"s3://{x}", "s3://%s" % x)
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
LAYERS = ["config", "io", "data", "core", "serve", "distributed", "aliases"]
ALIASES = {"rn50.demo", "rn50.export", "rn50.checkpoint", "rn50.mlflow_backup", "rn50.train",
           "rn50.tune", "rn50.evaluate", "rn50.prepare_imagenet"}
TRACKING = "rn50/io/tracking.py"
STORE = "rn50/io/checkpoints.py"
RESOLVER = ("rn50/io/storage.py", "rn50/io/s3.py")
CHECKPOINT_NAMES = re.compile(r"state\.pt\b|manifest\.json|checkpoint_manager_snapshot|"
                              r"\b(STATE_FILE|MANIFEST_FILE|BEST_DIR|CHECKPOINT_DIR_NAME)\b")
# Files that name another `manifest.json`: the prepared data set's, not a checkpoint's.
DATA_MANIFEST = {"rn50/data/imagenet_shards.py", "rn50/prepare_imagenet.py"}
URI_HEAD = re.compile(r"(s3|file)://$")


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


def mlflow_clients(text: str) -> list[int]:
    """Lines of `text` that build an MlflowClient."""
    return [number for number, line in enumerate(text.splitlines(), 1)
            if "MlflowClient(" in line]


def checkpoint_file_names(text: str, data_manifest: bool = False) -> list[int]:
    """Lines of `text` that name a checkpoint's files or folders (or the store's constants for
    them); `data_manifest`: the file names a data set's manifest.json, which is not one."""
    found = []
    for number, line in enumerate(text.splitlines(), 1):
        names = {m.group(0) for m in CHECKPOINT_NAMES.finditer(line)}
        if names - ({"manifest.json"} if data_manifest else set()):
            found.append(number)
    return found


def uri_concatenations(text: str) -> list[int]:
    """Lines of `text` where an s3:// or file:// URI is put together by hand: a string ending
    in the scheme followed by a formatted value, `+`, `%` or `.format`."""
    found = []
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.JoinedStr):
            parts = node.values
            found += [node.lineno for head, tail in zip(parts, parts[1:])
                      if isinstance(head, ast.Constant) and URI_HEAD.search(str(head.value))
                      and isinstance(tail, ast.FormattedValue)]
        elif isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Mod)):
            head = node.left
            if isinstance(head, ast.Constant) and re.search(r"(s3|file)://(%s)?$",
                                                            str(head.value)):
                found.append(node.lineno)
        elif isinstance(node, ast.Attribute) and node.attr == "format" and \
                isinstance(node.value, ast.Constant) and "://{" in str(node.value.value):
            found.append(node.lineno)
    return found


def one_home_violations() -> list[str]:
    """Every MLflow client, checkpoint file name and hand-made storage URI outside its home."""
    problems = []
    for path in project_files():
        name, text = str(path.relative_to(REPO)), path.read_text()
        if name != TRACKING:
            problems += [f"{name}:{n} builds an MlflowClient: use rn50.io.tracking.Tracker"
                         for n in mlflow_clients(text)]
        if name != STORE:
            problems += [f"{name}:{n} names a checkpoint file: ask rn50.io.checkpoints"
                         for n in checkpoint_file_names(text, name in DATA_MANIFEST)]
        if name not in RESOLVER:
            problems += [f"{name}:{n} builds a storage URI by hand: use rn50.io.storage (join, "
                         "from_ray_path) or rn50.io.s3.s3_uri" for n in uri_concatenations(text)]
    return problems


def test_mlflow_checkpoint_files_and_storage_uris_each_have_one_home():
    problems = one_home_violations()
    assert not problems, "one-home rules broken:\n" + "\n".join(problems)


def test_the_one_home_checks_see_a_violation():
    """Negative controls: each walker finds what it looks for, and not its look-alikes."""
    assert mlflow_clients("import x\nclient = MlflowClient(uri)\n") == [2]
    assert checkpoint_file_names("a = 1\npath / 'state.pt'\nx = ckpt.BEST_DIR\n") == [2, 3]
    assert checkpoint_file_names("root + '/manifest.json'", data_manifest=True) == []
    assert checkpoint_file_names("root + '/manifest.json'") == [1]
    hand_made = ['u = "s3://" + bucket', 'u = f"s3://{bucket}/runs"', 'u = "s3://%s" % bucket',
                 'u = "s3://{}/x".format(bucket)', 'u = f"file://{path}"']
    assert [uri_concatenations(line) for line in hand_made] == [[1]] * len(hand_made)
    assert uri_concatenations('m = f"use s3://BUCKET/PREFIX, not {given}"\n'
                              'u = storage.join(root, name)\nh = f"http://127.0.0.1:{port}"') == []


def test_no_module_imports_from_a_higher_layer_and_only_distributed_imports_ray():
    problems = layer_violations()
    assert not problems, "layer rules broken:\n" + "\n".join(problems)


def test_no_import_cycles_in_library_entrypoints_and_benchmarks():
    cycle = find_cycle(project_edges())
    assert not cycle, "import cycle: " + " -> ".join(cycle)


# The one exception: the chaos benchmark drives the rehearsal cluster the integration tests build
# (fake_cluster, fake_imds) with the same seeded controller as tests/integration/test_chaos.py,
# so the suite's short chaos run and the benchmark's long one are one piece of code, not two.
BENCHMARKS_ON_THE_REHEARSAL = {"chaos.py": ("tests.integration.",)}


def test_benchmarks_do_not_import_tests():
    offenders = [f"{path.name}:{line} imports {name}" for path in REPO.glob("benchmarks/*.py")
                 for name, _, line in imports_of(path)
                 if (name == "tests" or name.startswith("tests."))
                 and not name.startswith(BENCHMARKS_ON_THE_REHEARSAL.get(path.name, ("-",)))]
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
