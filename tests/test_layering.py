"""Import direction between layers (docs/architecture.md) and a CuPy-free, CUDA-free `import fp8probe`."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "fp8probe"

# Lower rank = lower layer; a module may import fp8probe modules of equal or lower rank only.
RANKS = {
    "formats": 0,
    "kernels": 1,
    "_fastpath": 1,  # the optional C extension (fp8probe/_fastpath.c): imports nothing from fp8probe
    "backends": 2,
    "ops": 3,
    "functional": 4,
    "autograd": 5,
    "nn": 6,
    "report": 7,
    "compat": 7,  # drop-in namespaces (compat/bitsandbytes): over nn/autograd/functional, beside report
    "analysis": 8,
    "cli": 9,
    "__main__": 9,
    "__init__": 10,
}
CUPY_ALLOWED = {"kernels", "backends"}


def _layer(module_path: Path) -> str:
    rel = module_path.relative_to(PKG)
    return rel.parts[0].removesuffix(".py")


def _imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
            names += [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level > 0:
            pkg = path.relative_to(PKG).parts[:-1]
            base = list(pkg[: len(pkg) - (node.level - 1)])
            mod = ".".join(["fp8probe", *base, *( [node.module] if node.module else [])])
            names.append(mod)
    return names


MODULES = sorted(p for p in PKG.rglob("*.py"))


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PKG)))
def test_imports_point_down(path: Path) -> None:
    layer = _layer(path)
    assert layer in RANKS, f"{path} is in no layer; add it to RANKS and docs/architecture.md"
    for name in _imports(path):
        top = name.split(".")[0]
        if top == "cupy" or top == "cupy_backends" or top == "cupyx":
            assert layer in CUPY_ALLOWED, f"{path.relative_to(PKG)} imports {name}: CuPy is only for kernels/ and backends/"
        if top != "fp8probe" or name == "fp8probe":
            continue
        target = name.split(".")[1]
        if target == "__version__":
            continue
        assert target in RANKS, f"{path.relative_to(PKG)} imports unknown fp8probe module {name}"
        assert RANKS[target] <= RANKS[layer], (
            f"{path.relative_to(PKG)} (layer {layer}) imports {name} (layer {target}): imports must point down"
        )


def test_import_does_not_load_cupy_or_start_cuda() -> None:
    code = (
        "import sys, fp8probe, fp8probe.functional, fp8probe.nn\n"
        "import torch\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('cupy', 'cupy_backends', 'cupyx')]\n"
        "assert not bad, bad\n"
        "assert not torch.cuda.is_initialized()\n"
        "assert 'fp8probe.analysis' not in sys.modules\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
