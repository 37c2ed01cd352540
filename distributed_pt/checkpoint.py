"""DeepSpeed checkpoints that are safe to crash in, exact resume, and export to Hugging Face format.

Layout: ``<output_dir>/checkpoints/step_<N>/`` (DeepSpeed's files, one ``rng_rank<r>.pt`` per rank) and a
``latest`` file naming the newest *complete* step. ``latest`` is replaced atomically only after every rank has
finished writing, so a crash mid-save leaves the previous checkpoint as the one to resume.
"""

from __future__ import annotations

import os
import random
import shutil
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch

from distributed_pt.engine.dist import barrier, is_main, rank

LATEST = "latest"


def _rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _engines(engine_or_engines) -> dict[str, Any]:
    """{name: engine}; a single engine is saved directly in step_<N>/, several in step_<N>/<name>/."""
    return engine_or_engines if isinstance(engine_or_engines, dict) else {"": engine_or_engines}


def save(engines, output_dir: str, step: int, client_state: dict[str, Any], keep_last: int) -> Path:
    """Collective: every rank must call it. Writes step_<step>, then points `latest` at it, then prunes old ones.

    `engines`: one DeepSpeed engine, or {name: engine} (e.g. PPO's actor and critic).
    """
    root = Path(output_dir) / "checkpoints"
    tag = f"step_{step}"
    for name, engine in _engines(engines).items():
        where, sub = (root, tag) if not name else (root / tag, name)
        engine.save_checkpoint(str(where), tag=sub, client_state=client_state, save_latest=False)
    torch.save(_rng_state(), root / tag / f"rng_rank{rank()}.pt")
    barrier()  # every rank's files are on disk before `latest` moves
    if is_main():
        tmp = root / f".{LATEST}.tmp"
        tmp.write_text(tag)
        os.replace(tmp, root / LATEST)
        steps = sorted((int(p.name.split("_")[1]), p) for p in root.glob("step_*") if p.name != tag)
        for _, old in steps[: max(0, len(steps) - (keep_last - 1))] if keep_last > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    return root / tag


def find_resume(output_dir: str, resume: str) -> tuple[Path, str] | None:
    """(checkpoint root, tag) to resume from: `auto` = the latest complete one in output_dir, `none`, or a path."""
    if resume == "none":
        return None
    if resume == "auto":
        root = Path(output_dir) / "checkpoints"
        if not (root / LATEST).is_file():
            return None
        return root, (root / LATEST).read_text().strip()
    path = Path(resume)
    if (path / LATEST).is_file():  # a checkpoints/ directory
        return path, (path / LATEST).read_text().strip()
    if path.is_dir() and path.name.startswith("step_"):
        return path.parent, path.name
    raise FileNotFoundError(
        f"checkpoint.resume: '{resume}' is neither a checkpoints directory nor a step_<N> directory"
    )


def load(engines, root: Path, tag: str) -> dict[str, Any]:
    """Restore model, optimizer, scheduler and this rank's RNG; returns the client state (step, data position)."""
    for name, engine in _engines(engines).items():
        where, sub = (root, tag) if not name else (root / tag, name)
        path, client_state = engine.load_checkpoint(str(where), tag=sub)
        if path is None:
            raise FileNotFoundError(f"could not load DeepSpeed checkpoint {where / sub}")
    rng_file = root / tag / f"rng_rank{rank()}.pt"
    if rng_file.is_file():
        _set_rng_state(torch.load(rng_file, weights_only=False))
    return client_state


def gathered_state_dict(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Full CPU state dict on rank 0 (empty elsewhere), gathering ZeRO-3 partitions one parameter at a time."""
    state: dict[str, torch.Tensor] = {}
    for name, p in module.named_parameters():
        ctx = nullcontext()
        if hasattr(p, "ds_id"):
            import deepspeed

            ctx = deepspeed.zero.GatheredParameters([p], modifier_rank=None)
        with ctx:
            if is_main():
                state[name] = p.detach().cpu().clone()
    if is_main():
        persistent = module.state_dict(keep_vars=True).keys()  # leaves out non-persistent buffers (rotary inv_freq)
        state.update(
            {n: b.detach().cpu().clone() for n, b in module.named_buffers() if n in persistent and n not in state}
        )
    return state


def export_hf(engine, tokenizer, out_dir: str | Path, state: dict[str, torch.Tensor] | None = None) -> Path:
    """Collective: write a Hugging Face model directory (safetensors + config + tokenizer) from rank 0.

    `state` replaces the module's own (gathered) state dict, e.g. LoRA-merged weights.
    """
    out = Path(out_dir)
    module = engine.module
    if state is None:
        state = gathered_state_dict(module)
    if is_main():
        out.mkdir(parents=True, exist_ok=True)
        module.save_pretrained(out, state_dict=state, safe_serialization=True)
        tokenizer.save_pretrained(out)
    barrier()
    return out
