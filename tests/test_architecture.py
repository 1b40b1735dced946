"""The layout ARCHITECTURE.md promises, checked: every op found by its name in every folder, layers that import
only downwards, `import biasfast` staying light, no tracker numbers in place of reasons."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

from biasfast._core import dispatch

ROOT = Path(__file__).resolve().parents[1]

# Lower ranks may be imported by higher ones; packages of equal rank are independent of each other.
LAYERS = {"_core": 0, "_C": 0, "kernels": 1, "ops": 2, "data": 3, "diffusion": 3, "neighbors": 3, "metrics": 4,
          "hierarchy": 5, "debias": 5, "apps": 6, "__main__": 7}


def op_files(op: str) -> dict[str, list[Path]]:
    """Where each of an op's pieces may live; each piece needs one existing path."""
    return {
        "CPU kernel": [ROOT / f"csrc/cpu/{op}.cpp", ROOT / f"csrc/cpu/{op}/{op}.cpp"],
        "CUDA kernel": [ROOT / f"csrc/cuda/{op}.cu", ROOT / f"kernels/{op}.py"],
        "wrapper, fake and autograd": [ROOT / f"biasfast/ops/{op}.py"],
        "test": [ROOT / f"tests/ops/test_{op}.py"],
        "benchmark": [ROOT / f"benchmarks/ops/bench_{op}.py"],
    }


@pytest.mark.parametrize("op", dispatch.op_names())
def test_every_piece_of_an_op_is_found_by_its_name(op):
    missing = [piece for piece, paths in op_files(op).items() if not any(p.exists() for p in paths)]
    assert not missing, f"biasfast::{op}: no {', '.join(missing)} under its name"
    schemas = (ROOT / "csrc/biasfast.cpp").read_text()
    assert re.search(rf'm\.def\(\s*"{op}[.(]', schemas), f"biasfast::{op}: schema not in csrc/biasfast.cpp"
    reference = (ROOT / "biasfast/ops/reference.py").read_text()
    assert re.search(rf"^def {op}\(", reference, re.M), f"biasfast::{op}: no reference.{op} oracle"


def test_the_op_list_is_read_from_the_dispatcher():
    assert {"knn", "knn_hamming", "row_hash", "sampler_step", "snr_loss", "sqdist", "tree_bp"} <= set(
        dispatch.op_names())


def _module_name(path: Path, root: Path) -> str:
    relative = path.relative_to(root).with_suffix("")
    parts = list(relative.parts)
    if parts[0] == "kernels":
        parts = ["biasfast"] + parts
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(tree: ast.AST, module: str, is_package: bool) -> list[tuple[int, str, list[str]]]:
    """(line, imported module, imported names) of every import statement, lazy ones inside functions included."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = module.split(".") if is_package else module.split(".")[:-1]
                package = package[: len(package) - node.level + 1]
                base = ".".join(package + ([base] if base else []))
            found.append((node.lineno, base, [alias.name for alias in node.names]))
    return found


def layer_violations(root: Path) -> list[str]:
    """Every import in biasfast/ and kernels/ under `root` that reaches up a layer, sideways into a package of the
    same rank, or through the package root to a sibling."""
    subpackages = {p.name for p in (root / "biasfast").iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    subpackages |= {"kernels", "_C"}
    violations = []
    files = sorted((root / "biasfast").rglob("*.py")) + sorted((root / "kernels").rglob("*.py"))
    for path in files:
        module = _module_name(path, root)
        parts = module.split(".")
        if len(parts) < 2:
            continue  # the package root is the facade: it may name everything (lazily)
        own = parts[1] if parts[1] in LAYERS else "__main__"
        tree = ast.parse(path.read_text(), str(path))
        for line, imported, names in _imports(tree, module, path.name == "__init__.py"):
            where = f"{path.relative_to(root)}:{line}"
            if imported == "biasfast":
                reached = [n for n in names if n not in subpackages] or (["biasfast"] if not names else [])
                if reached:
                    violations.append(f"{where} reaches {', '.join(reached)} through the package root")
                targets = [n for n in names if n in subpackages]
            elif imported.startswith("biasfast."):
                targets = [imported.split(".")[1]]
            else:
                continue
            for target in targets:
                if target == own or target not in LAYERS or (own, target) == ("_core", "_C"):
                    continue
                if LAYERS[target] > LAYERS[own]:
                    violations.append(f"{where}: {own} (layer {LAYERS[own]}) imports {target} (layer {LAYERS[target]})")
                elif LAYERS[target] == LAYERS[own]:
                    violations.append(f"{where}: {own} imports {target}, a package of its own layer")
    return violations


def test_layers_only_import_downwards():
    assert layer_violations(ROOT) == []


@pytest.mark.parametrize("planted,expected", [
    ("from biasfast.apps.run import RunConfig", "ops (layer 2) imports apps (layer 6)"),
    ("import biasfast", "reaches biasfast through the package root"),
    ("from biasfast import knn", "reaches knn through the package root"),
    ("def later():\n    from biasfast.metrics import bias_score", "ops (layer 2) imports metrics (layer 4)"),
    ("from biasfast.neighbors.knn import knn", "ops (layer 2) imports neighbors (layer 3)"),
])
def test_the_layering_check_fails_on_a_planted_violation(tmp_path, planted, expected):
    for folder in ("biasfast/ops", "biasfast/apps", "kernels"):
        (tmp_path / folder).mkdir(parents=True)
        (tmp_path / folder / "__init__.py").write_text("")
    (tmp_path / "biasfast/__init__.py").write_text("")
    (tmp_path / "biasfast/ops/planted.py").write_text(planted + "\n")
    violations = layer_violations(tmp_path)
    assert len(violations) == 1 and expected in violations[0], violations


def test_import_biasfast_stays_light():
    code = ("import sys, biasfast; heavy = [m for m in sys.modules if m.startswith(('biasfast.apps', 'matplotlib', "
            "'biasfast.hierarchy', 'biasfast.debias', 'biasfast.metrics', 'sklearn', 'biasfast.kernels', "
            "'triton'))]; print(heavy)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_public_names_and_old_module_paths_resolve():
    code = """
import biasfast
from biasfast.models import build_model
from biasfast.training import Trainer
from biasfast.schedules import NoiseSchedule
import biasfast.sampling, biasfast.nn, biasfast.reference, biasfast.distributed
from biasfast.diffusion import models, sampling
assert biasfast.sampling is sampling and biasfast.models is models and biasfast.NoiseSchedule is NoiseSchedule
for name in biasfast.__all__:
    getattr(biasfast, name)
biasfast.sampling.step, biasfast.nn.SNRWeightedLoss, biasfast.metrics.BiasTracker, biasfast.distributed.knn
biasfast.metrics.denoiser_agreement, biasfast.hierarchy.FilteredHierarchicalModel, biasfast.debias, biasfast.data
print("ok")
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.stdout.strip() == "ok", result.stderr


TRACKER_REFERENCE = re.compile(r"\bissues? (#?\d+|item \d+)\b|\(issue[ :)]|issue: ", re.I)


def test_no_tracker_numbers_in_code_tests_or_docs():
    paths = [p for folder in ("biasfast", "kernels", "csrc", "tests", "benchmarks", "tools") for p in
             (ROOT / folder).rglob("*") if p.suffix in (".py", ".cpp", ".h", ".cu", ".cuh", ".md")]
    paths += [ROOT / "README.md", ROOT / "ARCHITECTURE.md"]
    hits = [f"{p.relative_to(ROOT)}:{n}" for p in paths if p.exists() and p != Path(__file__)
            for n, line in enumerate(p.read_text().splitlines(), 1) if TRACKER_REFERENCE.search(line)]
    assert hits == []


def test_readme_is_self_contained():
    readme = (ROOT / "README.md").read_text()
    assert "../shared" not in readme
    for arxiv in ("2310.08442", "2603.03469"):
        assert arxiv in readme
