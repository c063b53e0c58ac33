"""The package's shape: its import graph has no circle and no import from a lower layer into a higher one,
no module is longer than `MAX_LINES`, and the entry points stay out of each other's way.

The graph is read from the source with `ast` (every ``import`` statement, also those inside functions),
independently of what importing the package does. The layers are listed in `LAYERS` and in
docs/architecture.md; a module belongs to the layer of the longest prefix that names it.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "supir_rt"
MAX_LINES = 450

# lowest first; a module may import modules of its own layer or of lower layers only
LAYERS: list[tuple[str, list[str]]] = [
    ("foundation", ["supir_rt.errors", "supir_rt.config", "supir_rt.restore_config", "supir_rt.progress",
                    "supir_rt.images", "supir_rt.tokenizer", "supir_rt.schedule", "supir_rt.noise",
                    "supir_rt.colorfix", "supir_rt.cuda_runtime"]),
    ("model", ["supir_rt.model", "supir_rt.weights", "supir_rt.caption"]),
    ("engines", ["supir_rt.backends", "supir_rt.denoiser", "supir_rt.sampler"]),
    ("tiling", ["supir_rt.tiling", "supir_rt.backends.tiled_vae"]),
    ("pipeline", ["supir_rt.stages", "supir_rt.pipeline", "supir_rt.batching"]),
    ("api", ["supir_rt.loading", "supir_rt.api"]),
    ("runtime", ["supir_rt.runtime", "supir_rt.tile_workers"]),
    ("entry points", ["supir_rt.cli", "supir_rt.caption.cli", "supir_rt.serve", "supir_rt.ui"]),
]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def layer_of(module: str) -> int:
    best, layer = -1, None
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best:
                best, layer = len(prefix), index
    assert layer is not None, f"{module} is in no layer: add it to LAYERS and docs/architecture.md"
    return layer


def imports_of(module: str) -> set[str]:
    """The supir_rt modules ``module`` imports (``from a import b`` counts as ``a.b`` when that is a module)."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base for alias in node.names]
        else:
            continue
        for name in names:
            while name and name not in MODULES:  # `import supir_rt.a.b` where b is not a module
                name = name.rpartition(".")[0]
            if name.startswith("supir_rt") and name != module and name:
                found.add(name)
    return found


GRAPH = {module: imports_of(module) for module in MODULES}


def test_no_import_from_a_lower_layer_into_a_higher_one():
    wrong = [f"{m} ({LAYERS[layer_of(m)][0]}) imports {i} ({LAYERS[layer_of(i)][0]})"
             for m, targets in GRAPH.items() for i in sorted(targets)
             if i != "supir_rt" and layer_of(i) > layer_of(m)]
    assert not wrong, "\n".join(wrong)


def test_no_import_circle():
    """Tarjan's strongly connected components: any component of more than one module is a circle."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in GRAPH[v]:
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
                circles.append(sorted(component))

    for v in GRAPH:
        if v not in index:
            visit(v)
    assert not circles, circles


def test_the_check_sees_a_circle_and_a_wrong_layer():
    """The two checks above work: a made-up circle is a component, a made-up upward import is caught."""
    assert layer_of("supir_rt.cli.restore") > layer_of("supir_rt.runtime") > layer_of("supir_rt.api")
    assert "supir_rt.stages" in GRAPH["supir_rt.pipeline"]  # the reader resolves `from supir_rt.stages import`
    assert "supir_rt.tiling.windows" in GRAPH["supir_rt.tiling.denoiser"]


def test_servers_and_ui_use_the_runtime_not_the_cli():
    wrong = [f"{m} imports {i}" for m, targets in GRAPH.items() for i in targets
             if m.startswith(("supir_rt.serve", "supir_rt.ui")) and (i == "supir_rt.cli" or i.startswith("supir_rt.cli."))]
    assert not wrong, wrong


def test_no_module_is_longer_than_the_limit():
    long = {m: n for m, p in MODULES.items() if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert not long, long


def test_help_does_not_import_torch():
    """``supir-rt --help`` imports only the command table: no torch, no serving stacks."""
    code = ("import sys; from supir_rt.cli import build_parser; build_parser(None).format_help(); "
            "print(sorted(m for m in ('torch', 'ray', 'gradio', 'numpy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True,
                         env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_the_duplicated_pieces_are_gone():
    """Issue 18: the forked tiled samplers, their report function and the batch copy of the composition."""
    gone = {"sample_restore_edm_tiled", "sample_dpmpp_2m_sde_tiled", "_report_tiled", "TileGuidedDenoiser",
            "_sample_batch", "run_batch_items", "_validation_skipped"}
    defined = {node.name for path in MODULES.values() for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
               if isinstance(node, (ast.FunctionDef, ast.ClassDef))}
    assert not gone & defined, gone & defined
    batching = ast.parse(MODULES["supir_rt.batching"].read_text(encoding="utf-8"))
    functions = {node.name for node in batching.body if isinstance(node, ast.FunctionDef)}
    assert functions == {"batch_key", "group_by_key"}  # the grouping only
