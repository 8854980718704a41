"""The shape of the code base: every import arrow between the top-level
folders points down (engine -> scheduler, workers -> leaf types), and the
installed distribution is the one package ``specserve``.

Leaf types (``specserve.config``, ``specserve.sampling_params``,
``specserve.step``) and the wire contract (``specserve.v1``) import nothing
of the project; the scheduler and the workers import only those; nothing
below the engine imports it.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LEAVES = {"specserve.config", "specserve.sampling_params", "specserve.step"}
# Layer of each source folder -> the specserve modules it may import.
ALLOWED = {
    "leaf": lambda name: False,
    "v1": lambda name: name.startswith("specserve.v1"),
    "scheduler": lambda name: name in LEAVES or name.startswith("specserve.scheduler"),
    "workers": lambda name: name in LEAVES or name.startswith("specserve.workers"),
}


def _layer(path: Path) -> str:
    rel = path.relative_to(ROOT).as_posix()
    if rel.startswith("proto/specserve/v1/"):
        return "v1"
    if rel.startswith("proto/specserve/"):
        return "root" if path.name == "__init__.py" else "leaf"
    return rel.split("/", 1)[0]


def _imports(path: Path) -> list[tuple[str, bool]]:
    """(module, only for type checking) for each specserve import in ``path``."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    typing_only = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            typing_only.update(id(n) for n in ast.walk(node))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        else:
            continue
        found.extend((n, id(node) in typing_only) for n in names
                     if n == "specserve" or n.startswith("specserve."))
    return found


SOURCES = sorted(p for d in ("engine", "scheduler", "workers", "proto/specserve")
                 for p in (ROOT / d).rglob("*.py") if not p.name.endswith("_pb2.py")
                 and not p.name.endswith("_pb2_grpc.py"))


def test_the_sources_are_found():
    layers = {_layer(p) for p in SOURCES}
    assert layers == {"engine", "scheduler", "workers", "leaf", "root", "v1"}


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_import_points_down(path: Path):
    layer = _layer(path)
    if layer in ("root", "engine"):  # the top, and the root package's lazy public names
        return
    bad = [name for name, typing_only in _imports(path)
           if not typing_only and not ALLOWED[layer](name)]
    assert not bad, f"{path.relative_to(ROOT)} ({layer}) imports {bad}"


def test_no_old_top_level_names_are_imported():
    for path in SOURCES + sorted((ROOT / "tests").rglob("*.py")) + sorted(
            (ROOT / "benchmarks").rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            mods = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                    [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0
                    and node.module else [])
            for mod in mods:
                top = mod.split(".")[0]
                assert top not in ("engine", "scheduler", "workers"), \
                    f"{path.relative_to(ROOT)} imports {mod}: use specserve.{mod}"


def test_the_wheel_holds_only_the_specserve_package(tmp_path: Path):
    """``pip install .`` puts one package and its console script in site-packages."""
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp_path),
                    str(ROOT)], check=True, capture_output=True)
    (wheel,) = tmp_path.glob("specserve-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert tops == {"specserve", next(t for t in tops if t.endswith(".dist-info"))}, tops
    for must in ("specserve/engine/llm.py", "specserve/scheduler/scheduler.py",
                 "specserve/workers/model_runner.py", "specserve/v1/generation.proto",
                 "specserve/step.py", "specserve/engine/default_models/target/config.json",
                 "specserve/engine/default_models/draft/model.safetensors"):
        assert must in names, must
    # Every source module is in it (a subpackage left out of pyproject.toml is not).
    for layer in ("engine", "scheduler", "workers"):
        for source in (ROOT / layer).rglob("*.py"):
            rel = source.relative_to(ROOT).as_posix()
            assert f"specserve/{rel}" in names, f"{rel} is not in the wheel"
    entry = next(n for n in names if n.endswith("entry_points.txt"))
    assert "specserve = specserve.engine.cli:main" in zipfile.ZipFile(wheel).read(entry).decode()


@pytest.mark.parametrize("path", [p for p in SOURCES if _layer(p) == "scheduler"],
                         ids=lambda p: p.relative_to(ROOT).as_posix())
def test_the_scheduler_needs_no_torch_or_numpy(path: Path):
    """The scheduler is plain Python: its tests run in a bare interpreter (CI)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        mods = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                [node.module] if isinstance(node, ast.ImportFrom) and node.module else [])
        assert not any(m.split(".")[0] in ("torch", "numpy") for m in mods), \
            f"{path.relative_to(ROOT)} imports {mods}"
