"""Run logging on rank 0: `metrics.jsonl` always, W&B when enabled, a short console line.

W&B mode `auto` is online when an API key is configured (`wandb login` or WANDB_API_KEY) and offline otherwise;
`disabled` never imports wandb (so runs work where it is not installed).
"""

from __future__ import annotations

import datetime
import functools
import json
import math
import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

from distributed_pt.config import LoggingConfig
from distributed_pt.dist import is_main, print0


def wandb_mode(cfg: LoggingConfig) -> str:
    if cfg.wandb_mode != "auto":
        return cfg.wandb_mode
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    netrc = Path.home() / ".netrc"
    logged_in = os.environ.get("WANDB_API_KEY") or (netrc.is_file() and "api.wandb.ai" in netrc.read_text())
    return "online" if logged_in else "offline"


class RunLogger:
    """Writes one JSON object per `log` call to output_dir/metrics.jsonl and to W&B (rank 0 only)."""

    def __init__(self, cfg: LoggingConfig, output_dir: str, config: dict[str, Any], resume_step: int = 0):
        self.path = Path(output_dir) / "metrics.jsonl"
        self.run = None
        if not is_main():
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step and self.path.exists():
            # Drop what a crashed run logged after the checkpoint we resume from: the curve stays one curve.
            kept = [ln for ln in self.path.read_text().splitlines() if _step_of(ln) <= resume_step]
            self.path.write_text("".join(ln + "\n" for ln in kept))
        elif self.path.exists():
            self.path.unlink()
        mode = wandb_mode(cfg)
        if mode != "disabled":
            try:
                import wandb
            except ImportError:
                print0("wandb is not installed: logging to metrics.jsonl only")
                return
            self.run = wandb.init(
                project=cfg.project,
                entity=cfg.entity,
                name=cfg.run_name,
                tags=cfg.tags,
                config=config,
                dir=output_dir,
                mode=mode,
                resume="allow",
                id=_run_id(output_dir),
            )

    def log(self, metrics: dict[str, Any], step: int, console: bool = True) -> None:
        if not is_main():
            return
        record = {"step": step, **metrics}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.run is not None:
            self.run.log(metrics, step=step)
        if console:
            print0(" ".join(f"{k}={_fmt(v)}" for k, v in record.items()))

    def log_table(self, name: str, columns: list[str], rows: list[list[Any]], step: int) -> None:
        if is_main() and self.run is not None:
            import wandb

            self.run.log({name: wandb.Table(columns=columns, data=rows)}, step=step)

    def summary(self, values: dict[str, Any]) -> None:
        if is_main() and self.run is not None:
            self.run.summary.update(values)

    def close(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None


def _step_of(line: str) -> float:
    """The step of a metrics line; a partial line left by a crash mid-write counts as past any checkpoint."""
    try:
        return json.loads(line).get("step", 0)
    except json.JSONDecodeError:
        return float("inf")


def _run_id(output_dir: str) -> str:
    """A W&B run id stored in the output dir, so a resumed run continues the same W&B run."""
    path = Path(output_dir) / "wandb_run_id"
    if not path.exists():
        import uuid

        path.write_text(uuid.uuid4().hex[:12])
    return path.read_text().strip()


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if math.isfinite(v) else str(v)
    return str(v)


REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("torch", "transformers", "deepspeed", "triton", "datasets", "peft")


@functools.lru_cache(maxsize=1)
def environment() -> dict[str, str]:
    """What a figure needs to be reproduced: device, library versions, git sha (and whether the tree had changes)
    and date (UTC). Written into every run's summary.json and every benchmark record."""
    import torch

    if torch.cuda.is_available():
        device = torch.cuda.get_device_name()
    else:
        # the vector ISA ATen and oneDNN dispatch to: AVX2 and AVX-512 machines round differently, so a demo's
        # figures differ between them even with the same versions
        isa = torch.backends.cpu.get_cpu_capability()
        device = f"cpu: {platform.machine()} {isa}, {os.cpu_count()} cores (no GPU)"
    info = {"device": device}
    for pkg in PACKAGES:
        try:  # metadata, not import: deepspeed's import is slow and noisy
            info[pkg] = torch.__version__ if pkg == "torch" else metadata.version(pkg)
        except metadata.PackageNotFoundError:
            info[pkg] = "not installed"
    info["cuda"] = torch.version.cuda or "none"
    try:
        git = ["git", "-C", str(REPO)]
        run = functools.partial(subprocess.run, capture_output=True, text=True, timeout=10, check=True)
        info["git_sha"] = run([*git, "rev-parse", "--short", "HEAD"]).stdout.strip()
        dirty = run([*git, "status", "--porcelain", "--untracked-files=no"]).stdout.strip()
        info["git_dirty"] = "true" if dirty else "false"
    except (OSError, subprocess.SubprocessError):  # e.g. a copy of the tree without .git (a lent GPU machine)
        info["git_sha"] = os.environ.get("BENCH_GIT_SHA", "unknown")
        info["git_dirty"] = os.environ.get("BENCH_GIT_DIRTY", "unknown")
    info["date"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    return info
