"""DeepSpeed checkpoints that are safe to crash in, exact resume, and export to Hugging Face format.

Layout: ``<output_dir>/checkpoints/step_<N>/`` (DeepSpeed's files, one ``rng_rank<r>.safetensors`` per rank) and a
``latest`` file naming the newest *complete* step. ``latest`` is replaced atomically only after every rank has
finished writing, so a crash mid-save leaves the previous checkpoint as the one to resume.

Resuming unpickles nothing, so a checkpoint from someone else cannot run code: the RNG states are safetensors, and
DeepSpeed's own files are read with every ``torch.load`` forced to ``weights_only`` (see ``_weights_only``).
"""

from __future__ import annotations

import json
import os
import pickle
import random
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from distributed_pt.dist import barrier, is_main, rank
from distributed_pt.models.zero import gathered, unwrap

LATEST = "latest"


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed safely (an old format, a corrupt or tampered file)."""


def _save_rng(path: Path) -> None:
    """This rank's python, numpy, torch (and CUDA) generator states: the arrays as tensors, the scalars as JSON."""
    py_version, py_ints, py_gauss = random.getstate()  # (3, 625 ints < 2**32, None | float)
    np_name, np_keys, *np_rest = np.random.get_state()  # ('MT19937', uint32[624], pos, has_gauss, cached_gaussian)
    tensors = {"python": torch.tensor(py_ints, dtype=torch.int64), "numpy": torch.from_numpy(np_keys.astype(np.int64))}
    tensors["torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        tensors["cuda"] = torch.cuda.get_rng_state()
    scalars = {"python": [py_version, py_gauss], "numpy": [np_name, *np_rest]}
    save_file(tensors, str(path), metadata={"scalars": json.dumps(scalars)})  # JSON floats round-trip exactly


def _read_rng(path: Path) -> Callable[[], None] | None:
    """Parse and check the states `_save_rng` wrote, restoring nothing yet; returns the function that restores them
    (None: this rank saved none)."""
    if not path.is_file():
        if path.with_suffix(".pt").is_file():
            raise CheckpointError(
                f"{path.with_suffix('.pt')}: this checkpoint predates the safe RNG format ({path.name}); its pickle "
                "is not loaded, since unpickling can run code. Start over with checkpoint.resume=none"
            )
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            scalars, t = json.loads(f.metadata()["scalars"]), {k: f.get_tensor(k) for k in f.keys()}
        (py_version, py_gauss), (np_name, *np_rest) = scalars["python"], scalars["numpy"]
        py_state = (py_version, tuple(t["python"].tolist()), py_gauss)
        np_state = (np_name, t["numpy"].numpy().astype(np.uint32), *np_rest)
        random.Random().setstate(py_state)  # checked on scratch generators: a bad file fails before anything loads
        np.random.RandomState().set_state(np_state)
        torch.Generator().set_state(t["torch"])
    except Exception as e:
        raise CheckpointError(f"{path}: not a valid RNG state file ({type(e).__name__}: {e})") from e

    def restore() -> None:
        random.setstate(py_state)
        np.random.set_state(np_state)
        torch.set_rng_state(t["torch"])
        if "cuda" in t and torch.cuda.is_available():
            torch.cuda.set_rng_state(t["cuda"])

    return restore


@contextmanager
def _weights_only() -> Iterator[None]:
    """Every ``torch.load`` inside runs weights-only, DeepSpeed's too: DeepSpeed 0.19 passes ``weights_only=False``
    (``runtime/checkpoint_engine/torch_checkpoint_engine.py:37``), which torch's ``TORCH_FORCE_WEIGHTS_ONLY_LOAD``
    overrides. Besides tensors and plain data, ZeRO optimizer files hold these plain DeepSpeed objects."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    key, old = "TORCH_FORCE_WEIGHTS_ONLY_LOAD", os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    os.environ[key] = "1"
    try:
        with torch.serialization.safe_globals([LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]):
            yield
    finally:
        os.environ.pop(key)
        if old is not None:
            os.environ[key] = old


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
    _save_rng(root / tag / f"rng_rank{rank()}.safetensors")
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
    """Restore model, optimizer, scheduler and this rank's RNG; returns the client state (step, data position).

    Raises CheckpointError, naming the file or directory, for a checkpoint that would need unpickling.
    """
    restore_rng = _read_rng(root / tag / f"rng_rank{rank()}.safetensors")  # first: a bad file stops the resume early
    for name, engine in _engines(engines).items():
        where, sub = (root, tag) if not name else (root / tag, name)
        try:
            with _weights_only():
                path, client_state = engine.load_checkpoint(str(where), tag=sub)
        except pickle.UnpicklingError as e:
            why = str(e).rsplit("WeightsUnpickler error:", 1)[-1].strip().split("\n")[0]  # e.g. Unsupported global
            raise CheckpointError(f"{where / sub}: refusing to unpickle more than tensors and plain data: {why}") from e
        if path is None:
            raise FileNotFoundError(f"could not load DeepSpeed checkpoint {where / sub}")
    if restore_rng is not None:
        restore_rng()
    return client_state


def gathered_state_dict(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Full CPU state dict on rank 0 (empty elsewhere), gathering ZeRO-3 partitions one parameter at a time."""
    state: dict[str, torch.Tensor] = {}
    for name, p in module.named_parameters():
        with gathered([p]):
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
    module = unwrap(engine.module)  # the HF model inside models.heads.Backbone
    if state is None:
        state = gathered_state_dict(module)
    if is_main():
        out.mkdir(parents=True, exist_ok=True)
        module.save_pretrained(out, state_dict=state, safe_serialization=True)
        tokenizer.save_pretrained(out)
    barrier()
    return out
