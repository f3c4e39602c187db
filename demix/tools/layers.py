"""The house drawn from the imports: every module's layer, and the arrows that break the order.

`python -m demix.tools.layers` reads the imports of demix/, components/, deploy/ and pipeline.py
(with the ast module: nothing is imported), prints the layers from the top down with the modules
in each, and exits 1 when an import points to a higher layer or the modules import in a cycle.
An import anywhere in a module counts (inside a function too: a deferred import is still an
arrow); one under `if TYPE_CHECKING:` does not, since it names a type for annotations and never
runs. A module belongs to the layer of the longest prefix in LAYERS that names it; imports
within one layer may point either way, but never in a cycle.

Two rules about who reaches what, checked too: the whole run config (`RunConfig`) is taken only
by the stage layer and what composes it (a module below names the config sections it reads;
the name anywhere in it, an annotation under TYPE_CHECKING included, counts, and so does a
parameter `config` with no annotation); and the recipes
compose stages only (a recipe imports the stage, config and ground layers, nothing between).
"""

from __future__ import annotations

import ast
import sys
from dataclasses import dataclass
from pathlib import Path

# The intended order, from the ground up: a module may import its own layer and those below.
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("ground", ("demix", "demix.errors", "demix.lazy", "demix.logs", "demix.tools")),
    (
        "storage",
        ("demix.storage", "demix.gcs", "demix.safetensors_io", "demix.base_hub"),
    ),
    ("checkpoint", ("demix.checkpoint",)),
    ("config", ("demix.merge.registry", "demix.config")),
    (
        "model",
        (
            "demix.model",
            "demix.base_model",
            "demix.distributed",
            "demix.device_memory",
            "demix.memory_plans",
        ),
    ),
    ("mixtures", ("demix.mixtures",)),
    ("data", ("demix.data",)),
    ("statistics", ("demix.statistics", "demix.ranking", "demix.verdict")),
    ("evaluate", ("demix.evaluate",)),
    ("fidelity", ("demix.fidelity", "demix.recovery", "demix.improvement", "demix.decision")),
    ("merge", ("demix.merge",)),
    ("train", ("demix.train",)),
    ("search", ("demix.search",)),
    ("proxies", ("demix.proxies",)),
    ("report", ("demix.report", "demix.export", "demix.run_inputs")),
    ("stages", ("demix.stages",)),
    ("recipes", ("demix.recipes",)),
    ("cli", ("demix.cli", "demix.cli_outputs", "demix.cli_parser")),
    ("components", ("components",)),
    ("deploy", ("deploy",)),
    ("pipeline", ("pipeline",)),
)


# The layer from which modules may take the whole run config (and the config layer, its home).
RUN_CONFIG_FLOOR = "stages"
RUN_CONFIG = "RunConfig"
TOOLS = "demix.tools"
# What a recipe may import: it composes the stages and reads the config, nothing between.
RECIPE_REACH = ("ground", "config", "stages", "recipes")


@dataclass(frozen=True)
class Arrow:
    """One import: `source` imports `target` (both module names)."""

    source: str
    target: str


def layer_of(module: str) -> int:
    """The index in LAYERS of the longest prefix naming `module`.

    Raises LookupError for a module no layer names.
    """
    best, length = -1, -1
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > length:
                best, length = index, len(prefix)
    if best < 0:
        raise LookupError(f"module {module} is in no layer of demix.tools.layers.LAYERS")
    return best


def module_files(root: Path) -> dict[str, Path]:
    """Module name -> file for demix/, components/, deploy/ and pipeline.py under `root`."""
    files = [*root.glob("demix/**/*.py"), *root.glob("components/*.py"), *root.glob("deploy/*.py")]
    if (root / "pipeline.py").exists():
        files.append(root / "pipeline.py")
    modules = {}
    for path in sorted(files):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def _type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imported(module: str, path: Path) -> set[str]:
    """The names `module` imports (modules, and module.name for `from module import name`)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                source = ".".join(parts + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            names.add(source)
            names.update(f"{source}.{alias.name}" for alias in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text(), filename=str(path)))
    return names


def arrows(root: Path) -> list[Arrow]:
    """Every import between the modules under `root` (a module importing itself excluded)."""
    modules = module_files(root)
    found = []
    for module, path in modules.items():
        for target in sorted(_imported(module, path)):
            if target in modules and target != module:
                found.append(Arrow(module, target))
    return found


def upward(found: list[Arrow]) -> list[Arrow]:
    """The arrows that point to a higher layer than their source's."""
    return [a for a in found if layer_of(a.target) > layer_of(a.source)]


def cycles(found: list[Arrow]) -> list[list[str]]:
    """The import cycles: each strongly connected set of two or more modules, sorted."""
    graph: dict[str, list[str]] = {}
    for arrow in found:
        graph.setdefault(arrow.source, []).append(arrow.target)
        graph.setdefault(arrow.target, [])
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def connect(node: str) -> None:
        # Tarjan's algorithm; the graph is a few hundred modules, recursion stays shallow
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph[node]:
            if target not in index:
                connect(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            members = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                members.append(member)
                if member == node:
                    break
            if len(members) > 1:
                components.append(sorted(members))

    for node in sorted(graph):
        if node not in index:
            connect(node)
    return sorted(components)


def _package(module: str, packages: set[str]) -> str:
    """A module under its package's name (`demix.merge.plan` -> `demix.merge/`), unless LAYERS
    names it alone (`demix.merge.registry`); a top-level module stays as it is."""
    named = [p for _, prefixes in LAYERS for p in prefixes if p.count(".") >= 2]
    for prefix in named:
        if module == prefix or module.startswith(prefix + "."):
            return prefix
    parts = module.split(".")
    depth = 2 if parts[0] == "demix" else 1
    head = ".".join(parts[:depth])
    return f"{head}/" if head in packages else module


def _layer_named(name: str) -> int:
    return next(i for i, (layer, _) in enumerate(LAYERS) if layer == name)


def _takes_run_config(node: ast.AST) -> bool:
    """Whether `node` names RunConfig, or is a parameter `config` with no annotation (a duck-
    typed whole config)."""
    if isinstance(node, ast.arg):
        return node.arg == "config" and node.annotation is None
    return (
        (isinstance(node, ast.Name) and node.id == RUN_CONFIG)
        or (isinstance(node, ast.Attribute) and node.attr == RUN_CONFIG)
        or (isinstance(node, ast.alias) and node.name.rpartition(".")[2] == RUN_CONFIG)
        or (isinstance(node, ast.Constant) and node.value == RUN_CONFIG)
    )


def run_config_takers(root: Path) -> list[str]:
    """The modules below RUN_CONFIG_FLOOR that take the whole run config: that name RunConfig,
    or have a parameter `config` with no annotation (the config layer, RunConfig's home, and
    the tools, which name it to find it, aside)."""
    floor, home = _layer_named(RUN_CONFIG_FLOOR), _layer_named("config")
    takers = []
    for module, path in module_files(root).items():
        if layer_of(module) in (home,) or layer_of(module) >= floor or module.startswith(TOOLS):
            continue
        tree = ast.parse(path.read_text(), filename=str(path))
        if any(_takes_run_config(node) for node in ast.walk(tree)):
            takers.append(module)
    return takers


def recipe_reaches(found: list[Arrow]) -> list[Arrow]:
    """The arrows from a recipe to a layer outside RECIPE_REACH."""
    allowed = {_layer_named(name) for name in RECIPE_REACH}
    return [
        a
        for a in found
        if layer_of(a.source) == _layer_named("recipes") and layer_of(a.target) not in allowed
    ]


def render(root: Path, packages: bool = False) -> tuple[str, bool]:
    """The layers from the top down with their modules (with `packages`, a package as one
    name), then the violations; and whether there are none."""
    modules = module_files(root)
    packs = {m for m, path in modules.items() if path.name == "__init__.py"}
    found = arrows(root)
    lines = []
    for number in range(len(LAYERS) - 1, -1, -1):
        members = sorted(
            {_package(m, packs) if packages else m for m in modules if layer_of(m) == number}
        )
        lines.append(f"{number:2d} {LAYERS[number][0]:<11} {' '.join(members)}")
    bad_arrows = upward(found)
    bad_cycles = cycles(found)
    for arrow in bad_arrows:
        lines.append(
            f"UPWARD {arrow.source} ({LAYERS[layer_of(arrow.source)][0]}) -> "
            f"{arrow.target} ({LAYERS[layer_of(arrow.target)][0]})"
        )
    for members in bad_cycles:
        lines.append(f"CYCLE {' <-> '.join(members)}")
    takers = run_config_takers(root)
    for module in takers:
        lines.append(
            f"RUNCONFIG {module} ({LAYERS[layer_of(module)][0]}) takes the whole run config: "
            f"only {RUN_CONFIG_FLOOR} and above may; give it the sections it reads"
        )
    reaches = recipe_reaches(found)
    for arrow in reaches:
        lines.append(
            f"REACH {arrow.source} (recipes) -> {arrow.target} "
            f"({LAYERS[layer_of(arrow.target)][0]}): recipes compose stages only"
        )
    clean = not (bad_arrows or bad_cycles or takers or reaches)
    if clean:
        lines.append(
            f"ok: {len(found)} imports, all pointing down or within a layer, no cycle; "
            f"the run config taken from {RUN_CONFIG_FLOOR} up, recipes composing stages only"
        )
    return "\n".join(lines), clean


def main(argv: list[str] | None = None) -> int:
    """Print the layers of the repository (this checkout, or the folder given; `--packages`:
    a package as one name); 1 on a violation."""
    args = sys.argv[1:] if argv is None else argv
    packages = "--packages" in args
    args = [a for a in args if a != "--packages"]
    root = Path(args[0]) if args else Path(__file__).resolve().parents[2]
    text, clean = render(root, packages)
    print(text)
    return 0 if clean else 1


if __name__ == "__main__":
    raise SystemExit(main())
