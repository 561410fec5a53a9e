"""The package's shape, read from its source: no import circle, the layers the data flow asks for,
short functions and a declared public API per module.

Every import counts here, also those inside functions and under ``TYPE_CHECKING``: a lazy import
still couples two modules, and a circle through one only waits for the wrong import order.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "lora_sam3d"
MAX_FUNCTION_LINES = 60


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(path: Path) -> set[str]:
    """The package's modules that ``path`` imports anywhere in its body (the most specific name)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{a.name}" for a in node.names]
            names = [n if n in MODULES else node.module for n in names]
        found |= {n for n in names if n.split(".")[0] == "lora_sam3d" and n in MODULES}
    return found - {_module_name(path)}


GRAPH = {name: _imports(path) for name, path in MODULES.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_the_checker_finds_a_circle() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_circle() -> None:
    assert GRAPH["lora_sam3d.models.reconstructor"], "the graph reads the package's imports"
    assert _cycles(GRAPH) == []


@pytest.mark.parametrize(
    ("lower", "upper"),
    [
        ("lora_sam3d.data", ("lora_sam3d.models", "lora_sam3d.models.latent", "lora_sam3d.training.module")),
        (
            "lora_sam3d.models",
            ("lora_sam3d.data", "lora_sam3d.training.module", "lora_sam3d.models.adapters.bank"),
        ),
        ("lora_sam3d.models.latent", ("lora_sam3d.data", "lora_sam3d.models")),
        ("lora_sam3d.inputs", ("lora_sam3d.data", "lora_sam3d.models", "lora_sam3d.models.latent")),
        ("lora_sam3d.geometry", ("lora_sam3d.data", "lora_sam3d.models", "lora_sam3d.models.latent")),
    ],
)
def test_layers(lower: str, upper: tuple[str, ...]) -> None:
    """The data and the model meet only in `lora_sam3d.inputs` (and the geometry both use)."""
    below = [m for m in GRAPH if m == lower or m.startswith(f"{lower}.")]
    assert below
    wrong = {m: sorted(i for i in GRAPH[m] if i.startswith(upper)) for m in below}
    assert not {m: i for m, i in wrong.items() if i}


def test_functions_are_short() -> None:
    long = []
    for name, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = node.end_lineno - node.lineno + 1  # type: ignore[operator]
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{name}.{node.name}: {lines} lines")
    assert not long


def test_every_public_module_declares_its_api() -> None:
    """``__all__`` names what a module offers; each name it lists exists there."""
    missing, unknown = [], []
    for name, path in MODULES.items():
        if any(part.startswith("_") for part in name.split(".")[1:]) or name.endswith("assets"):
            continue
        tree = ast.parse(path.read_text())
        declared = [
            n for n in tree.body
            if isinstance(n, ast.Assign) and any(getattr(t, "id", None) == "__all__" for t in n.targets)
        ]  # fmt: skip
        if not declared:
            missing.append(name)
            continue
        defined = {
            t.id for n in tree.body if isinstance(n, ast.Assign | ast.AnnAssign)
            for t in (n.targets if isinstance(n, ast.Assign) else [n.target]) if isinstance(t, ast.Name)
        } | {n.name for n in tree.body if isinstance(n, ast.FunctionDef | ast.ClassDef)} | {
            (a.asname or a.name).split(".")[0] for n in tree.body if isinstance(n, ast.Import | ast.ImportFrom)
            for a in n.names
        }  # fmt: skip
        listed = ast.literal_eval(declared[0].value)
        lazy = {
            "lora_sam3d.data": {"PhantomSpec", "TSDataModule"},
            "lora_sam3d": {
                "reconstruct",
                "load_model",
                "Session",
                "Reconstructor",
                "LoRAMeshDecoderModule",
                "TSDataModule",
                "TS_SAM3D_Dataset",
            },
            "lora_sam3d.training": {"LoRAMeshDecoderModule", "TSDataModule"},
        }.get(name, set())
        unknown += [f"{name}.{n}" for n in listed if n not in defined | lazy]
    assert not missing
    assert not unknown


MAX_TOP_LEVEL = 16  # the roles, the leaves and viewer/ (the napari plugin)
MAX_FILE_LINES = 500
PLAIN = ("lora_sam3d.models", "lora_sam3d.lora", "lora_sam3d.sparse")


def test_the_package_reads_by_role() -> None:
    """At most 16 entries at the top of the package, and no module over 500 lines."""
    top = [p.name for p in PACKAGE.iterdir() if p.name != "__pycache__" and not p.name.startswith(".")]
    assert len(top) <= MAX_TOP_LEVEL, sorted(top)
    long = {
        name: n
        for name, path in MODULES.items()
        if (n := len(path.read_text().splitlines())) > MAX_FILE_LINES
    }
    assert not long


def test_plain_pytorch_stays_plain() -> None:
    """Nothing under models/, lora/ or sparse/ imports Lightning (or a module that does)."""

    def lightning(path: Path) -> bool:
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            names += [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            if any(n.split(".")[0] in ("lightning", "pytorch_lightning") for n in names):
                return True
        return False

    plain = [m for m in MODULES if m.startswith(PLAIN)]
    assert plain
    reached = set(plain)
    frontier = list(plain)
    while frontier:  # every package module a plain module reaches, directly or not
        for m in GRAPH[frontier.pop()]:
            if m not in reached:
                reached.add(m)
                frontier.append(m)
    assert not sorted(m for m in reached if lightning(MODULES[m]))


def test_the_earlier_flat_names_live_in_one_module() -> None:
    """The flat model keys of earlier versions (``active_margin``, ``reads_context``, ...) name nothing
    in the code but their table in `lora_sam3d.settings.old_keys`."""
    from lora_sam3d.settings.old_keys import MODEL_KEYS

    tree_names = {part for path in MODEL_KEYS.values() for part in path.split(".")}
    old = {k for k in MODEL_KEYS if k not in tree_names}
    assert {"active_margin", "reads_context", "base_checkpoint"} <= old
    found = []
    for name, path in MODULES.items():
        if name == "lora_sam3d.settings.old_keys":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            ident = (
                node.attr if isinstance(node, ast.Attribute)
                else node.id if isinstance(node, ast.Name)
                else node.arg if isinstance(node, ast.keyword | ast.arg)
                else None
            )  # fmt: skip
            if ident in old:
                found.append(f"{name}: {ident}")
    assert not found
