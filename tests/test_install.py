"""What a fresh machine gets (issue 23): Hugging Face's `kernels` stays importable beside ours
(`distributed_pt_kernels`, the repository's kernels/ folder); a plain (non-editable) install leaves HF's files alone and
runs the planner and a stage from another directory on the bundled configs; the lock covers every dependency."""

from __future__ import annotations

import importlib.metadata
import re
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

from tests.conftest import TINY_SFT, env

ROOT = Path(__file__).resolve().parents[1]
HF_KERNELS = importlib.util.find_spec("kernels") is not None and any(
    d.metadata["Name"] == "kernels" for d in importlib.metadata.distributions()
)
EXAMPLE = "configs/examples/llama3.1-8b-lora-1gpu.yaml"


def _python(code: str, cwd: Path, extra_env: dict[str, str] | None = None) -> str:
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], cwd=cwd, env=dict(env(), **(extra_env or {})),
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout


@pytest.mark.skipif(not HF_KERNELS, reason="Hugging Face's `kernels` package is not installed")
@pytest.mark.parametrize("where", ["repo root", "elsewhere"])
def test_kernels_is_hugging_faces_and_ours_import_beside_it(where, tmp_path):
    # `python -c` puts the working directory first on sys.path, as `python -m distributed_pt.pipeline` does from the
    # repository root; env() also puts the root on PYTHONPATH, as pytest and the stage launcher do.
    out = _python(
        """
        import importlib.metadata, pathlib
        import kernels
        from transformers.integrations import hub_kernels  # runs `from kernels import ...`
        from transformers.models.llama import modeling_llama
        import distributed_pt_kernels.lora_matmul as ours
        hf = importlib.metadata.distribution("kernels")
        assert pathlib.Path(kernels.__file__).resolve() == pathlib.Path(hf.locate_file("kernels/__init__.py")).resolve()
        assert hasattr(kernels, "CUDAProperties") and modeling_llama.LlamaForCausalLM and hub_kernels
        print(ours.__file__)
        """,
        cwd=ROOT if where == "repo root" else tmp_path,
    )
    assert Path(out.strip()).read_bytes() == (ROOT / "kernels" / "lora_matmul.py").read_bytes()


def test_nothing_of_ours_is_importable_as_kernels():
    assert not (ROOT / "kernels" / "__init__.py").exists()  # a regular package at the root would shadow HF's
    tracked = subprocess.check_output(["git", "ls-files", "*.py", "*.md", "*.sh", "*.sbatch"], cwd=ROOT, text=True)
    for name in tracked.split():
        if ROOT / name == Path(__file__):
            continue
        text = (ROOT / name).read_text()
        assert not re.search(r"^\s*(from kernels[. ]|import kernels\b)", text, re.M), name
        assert not re.search(r"(?<![\w/.])kernels\.(lora_matmul|cross_entropy|fused_linear|_utils|_linear)", text), name


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel a plain `pip install .` installs."""
    out = tmp_path_factory.mktemp("wheel")
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(ROOT)]
    subprocess.run(cmd, check=True, capture_output=True, timeout=600)
    return next(out.glob("distributed_pt-*.whl"))


@pytest.mark.slow
def test_wheel_holds_our_kernels_configs_and_assets_and_no_kernels_folder(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    assert not [n for n in names if n.startswith("kernels/")]
    for name in [
        "distributed_pt_kernels/lora_matmul.py", "distributed_pt/configs/sft_tiny.yaml",
        "distributed_pt/configs/deepspeed/zero2.json", "distributed_pt/configs/models/llama-3.1-8b.yaml",
        "distributed_pt/configs/" + EXAMPLE.removeprefix("configs/"), "distributed_pt/assets/demo/sft_train.jsonl",
        "distributed_pt/assets/demo/tokenizer/tokenizer.json",
    ]:  # fmt: skip
        assert name in names, name
    configs = {p.relative_to(ROOT).as_posix() for p in (ROOT / "configs").rglob("*") if p.is_file()}
    assert configs == {n.removeprefix("distributed_pt/") for n in names if n.startswith("distributed_pt/configs/")}


# Run by the scratch venv's interpreter: every file of HF's distribution still has the hash pip recorded for it, and
# our distribution owns nothing under kernels/.
_INTACT = """
import base64, hashlib, importlib.metadata, importlib.util
hf = importlib.metadata.distribution("kernels")
checked = 0
for f in hf.files:
    if f.hash:
        digest = base64.urlsafe_b64encode(hashlib.sha256(f.read_binary()).digest()).rstrip(b"=").decode()
        assert digest == f.hash.value, f
        checked += 1
assert not [f for f in importlib.metadata.distribution("distributed_pt").files if f.parts[0] == "kernels"]
ours = importlib.util.find_spec("distributed_pt_kernels.lora_matmul").origin
print(checked, importlib.util.find_spec("kernels").origin, ours)
"""


@pytest.mark.slow
@pytest.mark.skipif(not HF_KERNELS, reason="Hugging Face's `kernels` package is not installed")
def test_plain_install_into_a_venv_leaves_hugging_faces_kernels_intact(wheel, tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    py = venv / "bin" / "python"
    purelib = "import sysconfig; print(sysconfig.get_path('purelib'))"
    site = Path(subprocess.check_output([py, "-c", purelib], text=True).strip())
    # HF's package as pip installed it in this environment (its files, and its dist-info with RECORD), offline
    hf = importlib.metadata.distribution("kernels")
    for f in hf.files:
        src = Path(hf.locate_file(f))
        if src.is_file():  # the package, its dist-info and its console script (../../../bin/kernels)
            (site / f).parent.mkdir(parents=True, exist_ok=True)
            (site / f).write_bytes(src.read_bytes())
    subprocess.run([py, "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)], check=True, timeout=300)
    proc = subprocess.run([py, "-c", _INTACT], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-4000:]
    checked, hf_origin, ours = proc.stdout.split()
    assert int(checked) >= 5
    assert Path(hf_origin) == site / "kernels" / "__init__.py"
    assert Path(ours) == site / "distributed_pt_kernels" / "lora_matmul.py"


@pytest.mark.slow
def test_plain_install_plans_and_trains_from_another_directory(wheel, tmp_path):
    target = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(target)  # what `pip install .` puts in site-packages, first on sys.path
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    e = dict(env(), PYTHONPATH=str(target))
    where = _python("import distributed_pt, distributed_pt_kernels; print(distributed_pt.__file__)", cwd, e)
    assert Path(where.strip()).is_relative_to(target)

    plan = subprocess.run(
        [sys.executable, "-m", "distributed_pt.plan", EXAMPLE, "--gpus-per-node", "1"],
        cwd=cwd, env=e, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert plan.returncode == 0, plan.stderr[-4000:]
    assert "llama-3.1-8b" in plan.stdout or "GiB" in plan.stdout

    out = tmp_path / "out"
    overrides = [*TINY_SFT, f"output_dir={out}", "train.max_steps=3", "train.eval_every=0", "checkpoint.save_every=0"]
    train = subprocess.run(
        [sys.executable, "-m", "distributed_pt.train", "configs/sft_tiny.yaml", *overrides],
        cwd=cwd, env=e, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert train.returncode == 0, train.stderr[-4000:]
    assert (out / "final" / "config.json").is_file() and (out / "summary.json").is_file()
    assert not (target / "outputs").exists() and not (cwd / "outputs").exists()


def test_lock_pins_every_dependency_but_torch():
    """constraints.txt pins what `pip install -e ".[test]"` brings (and the bench extra's own packages), torch and
    what only torch needs aside."""
    from packaging.requirements import Requirement

    def norm(name: str) -> str:
        return re.sub(r"[-_.]+", "-", name).lower()

    lock = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, version = line.split("==")
            lock[norm(name)] = version
    assert "torch" not in lock  # users bring their own torch (the CPU build, or a cluster's CUDA build)

    def requirements(dist: str, extras: tuple[str, ...] = ()) -> list[str]:
        out = []
        for text in importlib.metadata.requires(dist) or []:
            req = Requirement(text)
            if req.marker is None or any(req.marker.evaluate({"extra": e}) for e in ("", *extras)):
                out.append(norm(req.name))
        return out

    missing = {r for r in requirements("distributed_pt", ("bench",)) if r != "torch" and r not in lock}
    seen: set[str] = set()
    todo = [r for r in requirements("distributed_pt", ("test",)) if r != "torch"]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        if name not in lock:
            missing.add(name)
        try:
            todo += [r for r in requirements(name) if r != "torch"]
        except importlib.metadata.PackageNotFoundError:
            missing.add(name)
    assert not missing, f"not in constraints.txt: {sorted(missing)}"
