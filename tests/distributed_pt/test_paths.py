from pathlib import Path

from distributed_pt import paths
from distributed_pt.paths import bundled, resolve_path

ROOT = Path(__file__).resolve().parents[2]


def test_bundled_files_resolve_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resolve_path("configs/sft_tiny.yaml") == ROOT / "configs" / "sft_tiny.yaml"
    assert (
        resolve_path("distributed_pt/assets/demo/sft_train.jsonl")
        == ROOT / "distributed_pt/assets/demo/sft_train.jsonl"
    )
    assert bundled("configs/models") == ROOT / "configs" / "models"
    # yours first: a file of that name in the working directory wins; a path that exists nowhere stays as given
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "sft_tiny.yaml").write_text("stage: sft\n")
    assert resolve_path("configs/sft_tiny.yaml") == Path("configs/sft_tiny.yaml")
    assert resolve_path("configs/missing.yaml") == Path("configs/missing.yaml")
    assert resolve_path("/abs/missing.yaml") == Path("/abs/missing.yaml")


def test_installed_layout_finds_configs_inside_the_package(tmp_path, monkeypatch):
    # a plain `pip install .` puts configs/ at site-packages/distributed_pt/configs (setup.py's package_dir)
    package = tmp_path / "site-packages" / "distributed_pt"
    (package / "configs" / "deepspeed").mkdir(parents=True)
    (package / "configs" / "deepspeed" / "zero2.json").write_text("{}")
    (package / "assets" / "demo").mkdir(parents=True)
    monkeypatch.setattr(paths, "PACKAGE_DIR", package)
    monkeypatch.chdir(tmp_path)
    assert resolve_path("configs/deepspeed/zero2.json") == package / "configs" / "deepspeed" / "zero2.json"
    assert resolve_path("distributed_pt/assets/demo") == package / "assets" / "demo"
