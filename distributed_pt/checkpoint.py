"""DeepSpeed checkpoints that are safe to crash in, exact resume, and export to Hugging Face format.

Layout: ``<output_dir>/checkpoints/step_<N>/`` (DeepSpeed's files, one ``rng_rank<r>.safetensors`` per rank, and a
``manifest.json`` written last: every file with its size, and a sha256 of the small ones) and a ``latest`` file naming
the newest *complete* step. ``latest`` is replaced atomically only after the manifest, so a crash mid-save leaves the
previous checkpoint as the one to resume. Before a resume every rank checks the checkpoint against its manifest; a
damaged one is set aside (renamed ``damaged_step_<N>``, nothing deleted) and the newest complete one before it is
used instead, with a message that names the file. A save checks the free space first, and a failed write (a full
disk) names the path and leaves the previous checkpoint the resume point.

Resuming unpickles nothing, so a checkpoint from someone else cannot run code: the RNG states are safetensors, and
DeepSpeed's own files are read with every ``torch.load`` forced to ``weights_only`` (see ``_weights_only``).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import pickle
import random
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from distributed_pt import dist
from distributed_pt.dist import barrier, is_main, rank
from distributed_pt.models.zero import gathered, unwrap

LATEST = "latest"
MANIFEST = "manifest.json"
SMALL_FILE = 1 << 20  # files up to this size get a checksum in the manifest (RNG states, configs, DeepSpeed's json)


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


def _read_rng(path: Path) -> Callable[[], None]:
    """Parse and check the states `_save_rng` wrote, restoring nothing yet; returns the function that restores them."""
    if not path.is_file():
        if path.with_suffix(".pt").is_file():
            raise CheckpointError(
                f"{path.with_suffix('.pt')}: this checkpoint predates the safe RNG format ({path.name}); its pickle "
                "is not loaded, since unpickling can run code. Start over with checkpoint.resume=none"
            )
        raise CheckpointError(f"{path}: missing (saved with fewer ranks than this run has, or damaged)")
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
    """Collective: every rank must call it. Writes step_<step> and its manifest, then points `latest` at it, then
    prunes old ones. Raises CheckpointError naming the path when the disk is too full or a write fails.

    `engines`: one DeepSpeed engine, or {name: engine} (e.g. PPO's actor and critic).
    """
    root = Path(output_dir) / "checkpoints"
    tag = f"step_{step}"
    problem = dist.broadcast_object(_space_problem(root) if is_main() else None)  # every rank stops, or none
    if problem:
        raise CheckpointError(problem)
    if is_main() and (root / tag).is_dir():  # a half-written or set-aside save of this step: not ours to mix with
        shutil.rmtree(root / tag)
    barrier()
    try:
        for name, engine in _engines(engines).items():
            where, sub = (root, tag) if not name else (root / tag, name)
            engine.save_checkpoint(str(where), tag=sub, client_state=client_state, save_latest=False)
        _save_rng(root / tag / f"rng_rank{rank()}.safetensors")
        barrier()  # every rank's files are on disk before the manifest lists them
        if is_main():
            _write_manifest(root / tag)
            _replace(root / LATEST, tag)
    except (OSError, RuntimeError) as e:
        raise CheckpointError(_write_error(root, tag, e)) from e
    if is_main():
        steps = [p for p in _steps(root) if p.name != tag]
        for old in steps[: max(0, len(steps) - (keep_last - 1))] if keep_last > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    return root / tag


def _replace(path: Path, text: str) -> None:
    """Write `text` to `path` atomically (a temporary file renamed over it)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _write_manifest(step_dir: Path) -> None:
    files = {}
    for f in sorted(p for p in step_dir.rglob("*") if p.is_file() and p.name != MANIFEST):
        entry: dict[str, Any] = {"size": f.stat().st_size}
        if entry["size"] <= SMALL_FILE:
            entry["sha256"] = _sha256(f)
        files[f.relative_to(step_dir).as_posix()] = entry
    _replace(step_dir / MANIFEST, json.dumps({"format": 1, "files": files}, indent=1))


def _size(step_dir: Path) -> int:
    """Bytes of a complete checkpoint, from its manifest (0 when it has none)."""
    try:
        return sum(e["size"] for e in json.loads((step_dir / MANIFEST).read_text())["files"].values())
    except (OSError, ValueError, KeyError):
        return 0


def _space_problem(root: Path) -> str | None:
    """Why the next save would not fit: the newest complete checkpoint's size against the free space of `root`."""
    root.mkdir(parents=True, exist_ok=True)
    latest = _latest(root)
    need = _size(root / latest) if latest else 0
    free = shutil.disk_usage(root).free
    if need and free < need * 1.05:
        return (
            f"no space left on device for the next checkpoint in {root}: the last one took {need / 2**20:.1f} MiB, "
            f"{free / 2**20:.1f} MiB are free; {latest} stays the resume point: free some space "
            "(or lower checkpoint.keep_last) and run again"
        )
    return None


def _write_error(root: Path, tag: str, e: BaseException) -> str:
    """The message for a save that failed: the OS error (torch's writer hides a full disk behind 'unexpected pos')."""
    free = shutil.disk_usage(root).free if root.is_dir() else 0
    full = getattr(e, "errno", None) == errno.ENOSPC or "unexpected pos" in str(e) or free < 2**20
    why = "no space left on device" if full else f"{type(e).__name__}: {e}"
    latest = _latest(root)
    keep = f"{latest} stays the resume point" if latest else "there is no earlier checkpoint"
    return f"saving {root / tag} failed: {why} ({free / 2**20:.1f} MiB free); {keep}"


def verify(step_dir: Path) -> str | None:
    """What is wrong with a checkpoint directory, or None when every file its manifest lists is there, whole."""
    if not step_dir.is_dir():
        return f"{step_dir}: missing"
    try:
        files = json.loads((step_dir / MANIFEST).read_text())["files"]
    except FileNotFoundError:
        return f"{step_dir}: no {MANIFEST} (a save that never finished)"
    except (OSError, ValueError, KeyError) as e:
        return f"{step_dir / MANIFEST}: unreadable ({e})"
    for name, entry in files.items():
        f = step_dir / name
        if not f.is_file():
            return f"{f}: missing"
        if f.stat().st_size != entry["size"]:
            return f"{f}: {f.stat().st_size} bytes, {entry['size']} when saved (truncated or overwritten)"
        if "sha256" in entry and _sha256(f) != entry["sha256"]:
            return f"{f}: its checksum differs from the one saved"
    return None


def find_resume(output_dir: str, resume: str) -> tuple[Path, list[str], bool] | None:
    """(checkpoint root, tags to try in order, strict) for `checkpoint.resume`: `auto` = the step `latest` names, then
    every other step newest first; `none`; or a path: a checkpoints directory (as auto) or one step directory (that
    one alone: strict)."""
    if resume == "none":
        return None
    root = Path(output_dir) / "checkpoints" if resume == "auto" else Path(resume)
    if resume != "auto" and root.is_dir() and root.name.startswith("step_"):
        return root.parent, [root.name], True
    latest = _latest(root)
    if resume != "auto" and latest is None:
        raise FileNotFoundError(
            f"checkpoint.resume: '{resume}' is neither a checkpoints directory nor a step_<N> directory"
        )
    tags = ([latest] if latest else []) + [p.name for p in reversed(_steps(root)) if p.name != latest]
    return (root, tags, False) if tags else None


def _latest(root: Path) -> str | None:
    """The tag the `latest` file of a checkpoints directory names (None without one)."""
    return (root / LATEST).read_text().strip() if (root / LATEST).is_file() else None


def _number(tag: str) -> int:
    """N of step_N (-1 for anything else)."""
    n = tag.split("_")[-1]
    return int(n) if tag.startswith("step_") and n.isdigit() else -1


def _steps(root: Path) -> list[Path]:
    """The step_<N> directories of a checkpoints directory, oldest (smallest N) first."""
    return sorted(
        (p for p in root.glob("step_*") if p.is_dir() and _number(p.name) >= 0), key=lambda p: _number(p.name)
    )


def resume_point(output_dir: str, resume: str) -> tuple[Path, str] | None:
    """Collective. The checkpoint to resume from (None: start fresh), checked against its manifest on every rank.

    A damaged checkpoint is set aside as ``damaged_step_<N>`` and the newest complete one before it is used (said on
    rank 0, with the file that is wrong); half-written step directories (no manifest, not named by `latest`) are
    removed. With no complete checkpoint left, a CheckpointError says what is wrong and the way out.
    """
    found = dist.broadcast_object(find_resume(output_dir, resume) if is_main() else None)
    if found is None:
        return None
    root, tags, strict = found
    latest = _latest(root)
    problems: dict[str, str] = {}
    chosen = None
    for tag in tags:
        bad = next((p for p in dist.all_gather_object(verify(root / tag)) if p), None)
        if bad is None:
            chosen = tag
            break
        problems[tag] = bad
    if chosen is not None:  # saves after the chosen one that never finished (a crash mid-save) go too
        for tag in tags:
            if _number(tag) > _number(chosen) and tag not in problems and not (root / tag / MANIFEST).exists():
                problems[tag] = f"{root / tag}: no {MANIFEST} (a save that never finished)"
    unfinished = {t for t in problems if t != latest and not (root / t / MANIFEST).exists()}
    if strict and chosen is None and not (root / tags[0] / MANIFEST).exists() and (root / tags[0]).is_dir():
        dist.print0(f"warning: {root / tags[0]} has no {MANIFEST} (written before manifests?): loading it unverified")
        return root, tags[0]
    if chosen is None and (strict or set(problems) != unfinished):
        raise CheckpointError(
            f"no complete checkpoint to resume in {root}: {'; '.join(problems.values())}. Start over with "
            "checkpoint.resume=none or a new output_dir (nothing has been deleted), restore the files, or load a "
            "checkpoint written before manifests unverified with checkpoint.resume=<its step_N directory>"
        )
    if is_main():
        for tag, problem in problems.items():
            if tag in unfinished:
                shutil.rmtree(root / tag, ignore_errors=True)
                print(f"removed {root / tag}: a save that never finished", flush=True)
            elif (root / tag).exists():
                aside = root / f"damaged_{tag}"
                aside = aside if not aside.exists() else root / f"damaged_{tag}_{int(time.time())}"
                os.replace(root / tag, aside)
                print(f"checkpoint {root / tag} is damaged ({problem}); set aside as {aside.name}", flush=True)
            else:
                print(f"checkpoint {root / tag} is damaged ({problem})", flush=True)
        if chosen is not None and chosen != latest:
            _replace(root / LATEST, chosen)
            print(f"resuming from {root / chosen}, the newest complete checkpoint", flush=True)
    barrier()
    return (root, chosen) if chosen is not None else None


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
        except Exception as e:  # what the manifest cannot see (same size, other bytes) or another world size
            raise CheckpointError(
                f"{where / sub}: could not be loaded ({type(e).__name__}: {e}); resume an older checkpoint with "
                f"checkpoint.resume=<its step_N directory>, or start over with checkpoint.resume=none"
            ) from e
        if path is None:
            raise CheckpointError(f"could not load DeepSpeed checkpoint {where / sub}")
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
