"""Where the files shipped with distributed_pt are: the repository's configs/ (stage configs, model presets, example
configs, DeepSpeed JSONs) and distributed_pt/assets (the demo data and tokenizer).

A source checkout (or ``pip install -e .``) has configs/ beside the package; a plain ``pip install .`` carries it as
``distributed_pt/configs`` (setup.py). Relative paths in configs and on the command line name these files as in the
repository, and resolve from any working directory after either kind of install.
"""

from __future__ import annotations

from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent


def bundled(relative: str | Path) -> Path:
    """A file shipped with distributed_pt, named as in the repo (``configs/models``, ``distributed_pt/assets/demo``)."""
    for root in (PACKAGE_DIR, PACKAGE_DIR.parent):
        if (root / relative).exists():
            return root / relative
    return PACKAGE_DIR.parent / relative


def resolve_path(path: str | Path) -> Path:
    """A path as given when it exists (or is absolute), else the bundled file of that name when there is one, so the
    bundled configs and the paths inside them work from any working directory and after any kind of install."""
    p = Path(path)
    if p.exists() or p.is_absolute():
        return p
    found = bundled(p)
    return found if found.exists() else p
