"""The code's shape: imports run downward only (STYLE.md: stages → rl, losses → engine → checkpoint, logging →
models → data → config, dist, kernels; lazy imports count too), losses import nothing distributed, files stay small.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Higher may import lower or equal; `pipeline`/`train` sit on top.
LAYERS = {
    "config": 0, "dist": 0, "kernels": 0, "paths": 0, "typed_config": 0,
    "data": 1,
    "models": 2,
    "checkpoint": 3, "logging": 3,
    "engine": 4,
    "losses": 5, "rl": 5,
    "stages": 6,
    "pipeline": 7, "train": 7, "plan": 7,
}  # fmt: skip


def _layer(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] == "distributed_pt_kernels":
        return "kernels"
    if parts[0] == "distributed_pt" and len(parts) > 1:
        return parts[1]
    return None


def _imports(path: Path) -> list[tuple[int, str]]:
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            out += [(node.lineno, node.module)]
            # `from distributed_pt import dist, checkpoint`
            out += [(node.lineno, f"{node.module}.{a.name}") for a in node.names if node.module == "distributed_pt"]
    return out


def test_no_import_runs_up_the_layers():
    upward = []
    for path in sorted((ROOT / "distributed_pt").rglob("*.py")):
        rel = path.relative_to(ROOT).with_suffix("")
        here = _layer(".".join(rel.parts))
        if here is None or here not in LAYERS:
            continue
        for line, module in _imports(path):
            there = _layer(module)
            if there in LAYERS and LAYERS[there] > LAYERS[here]:
                upward.append(f"{rel}.py:{line} ({here}) imports {module} ({there})")
    assert not upward, "\n".join(upward)


def test_losses_are_pure_functions_of_tensors():
    bad = []
    for path in sorted((ROOT / "distributed_pt" / "losses").glob("*.py")):
        for line, module in _imports(path):
            if module.startswith(("torch.distributed", "deepspeed")) or module in ("distributed_pt.dist",):
                bad.append(f"{path.name}:{line} imports {module}")
            elif module.startswith("distributed_pt") and not module.startswith("distributed_pt.losses"):
                bad.append(f"{path.name}:{line} imports {module}")
    assert not bad, "\n".join(bad)


def test_files_stay_small():
    """Stage recipes under 300 lines, every source file under 500 (STYLE.md, issue 13)."""
    sizes = {
        p: len(p.read_text().splitlines())
        for d in ("distributed_pt", "kernels", "benchmarks")
        for p in (ROOT / d).rglob("*.py")
    }
    big = [f"{p.relative_to(ROOT)}: {n}" for p, n in sizes.items() if n > (300 if p.parent.name == "stages" else 500)]
    assert not big, big


def test_stage_engine_and_rl_functions_are_typed():
    """Every public function of stages/, engine/ and rl/ annotates its arguments and its return."""
    untyped = []
    for d in ("stages", "engine", "rl"):
        for path in sorted((ROOT / "distributed_pt" / d).glob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if not isinstance(node, ast.FunctionDef) or node.name.startswith("_") and node.name != "__init__":
                    continue
                args = [a for a in node.args.args + node.args.kwonlyargs if a.arg not in ("self", "cls")]
                if any(a.annotation is None for a in args) or node.returns is None:
                    untyped.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}")
    assert not untyped, untyped
