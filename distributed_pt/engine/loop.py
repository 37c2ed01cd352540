"""Pieces every stage's training loop shares: run state, SIGTERM, NaN guard, checkpoint, export, clean exit."""

from __future__ import annotations

import hashlib
import json
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from distributed_pt import checkpoint
from distributed_pt.config import ConfigError, save_config, to_dict
from distributed_pt.engine import dist


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. a non-finite loss); the message names the step."""


@dataclass
class State:
    step: int = 0  # optimizer steps done
    micro_step: int = 0  # micro batches consumed (the data position)
    sigterm: list[bool] = field(default_factory=lambda: [False])  # set by this rank's handler, never cleared
    saved_step: int = -1  # the step of the checkpoint on disk that holds this state (never written twice)
    inputs: dict[str, str] = field(default_factory=dict)  # fingerprint of what trains: saved with every checkpoint

    def install_sigterm(self) -> None:
        signal.signal(signal.SIGTERM, lambda *_: self.sigterm.__setitem__(0, True))


def start(cfg) -> Path:
    """Every stage's first lines: process group, seed, output dir with the resolved config (printed on rank 0)."""
    from distributed_pt.engine.metrics import set_seed

    dist.init_distributed()
    set_seed(cfg.train.seed)
    out = Path(cfg.output_dir)
    if dist.is_main():
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")
        print(json.dumps(to_dict(cfg), indent=1), flush=True)
    return out


def finish(cfg, logger, state: State, before: dict, after: dict) -> dict:
    """Every stage's last lines: summary.json (held-out metrics before and after), W&B summary, teardown."""
    summary = {"stage": cfg.stage, "steps": state.step, "before": before, "after": after}
    if dist.is_main():
        (Path(cfg.output_dir) / "summary.json").write_text(json.dumps(summary, indent=1))
    logger.summary(after)
    logger.close()
    dist.destroy()
    return summary


def fingerprint(tokenizer, train_files: list[str]) -> dict[str, str]:
    """Short sha256 digests of the tokenizer (vocabulary and chat template) and of the training files' bytes."""
    vocab = json.dumps([sorted(tokenizer.get_vocab().items()), tokenizer.chat_template or ""])
    data = hashlib.sha256()
    for path in train_files:
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                data.update(chunk)
    return {"tokenizer": hashlib.sha256(vocab.encode()).hexdigest()[:16], "training data": data.hexdigest()[:16]}


def resume(engines, cfg, state: State, inputs: dict[str, str]) -> dict:
    """Load the checkpoint `checkpoint.resume` names (auto: the latest complete one), if any, into `engines` (one
    engine or {name: engine}). Returns the saved client state ({} when starting fresh).

    `inputs` (see `fingerprint`) is saved with every checkpoint; resuming one written with another tokenizer or other
    training data is a ConfigError rather than a silent mix of two runs.
    """
    state.inputs = inputs
    # Rank 0 decides, so that every rank loads the same step even where a shared file system lags.
    found = dist.broadcast_object(
        checkpoint.find_resume(cfg.output_dir, cfg.checkpoint.resume) if dist.is_main() else None
    )
    if found is None:
        return {}
    client, where = checkpoint.load(engines, *found), found[0] / found[1]
    changed = [key for key, digest in client.get("inputs", inputs).items() if inputs.get(key) != digest]
    if changed:
        raise ConfigError(
            f"checkpoint.resume: the {' and the '.join(changed)} changed since {where} was written; "
            f"use a new output_dir, or checkpoint.resume=none to start over in {cfg.output_dir}"
        )
    state.step, state.micro_step = client["step"], client["micro_step"]
    state.saved_step = state.step
    dist.print0(f"resumed from {where} at step {state.step}")
    return client


def save(engines, cfg, state: State, **extra) -> None:
    """Checkpoint `engines` with the run state (and any `extra` client state, e.g. PPO's KL controller).

    A step already on disk is not written again: rewriting the directory `latest` names is the one write a kill
    could leave half done.
    """
    if state.saved_step == state.step:
        return
    client = {"step": state.step, "micro_step": state.micro_step, "inputs": state.inputs, **extra}
    checkpoint.save(engines, cfg.output_dir, state.step, client, cfg.checkpoint.keep_last)
    state.saved_step = state.step


def check_finite(loss: torch.Tensor, step: int) -> None:
    """Stop every rank together, before backward, if any rank's loss is NaN/inf (the last checkpoint stays clean)."""
    bad = dist.all_reduce_sum((~torch.isfinite(loss.detach())).float().reshape(1))
    if bad.item() > 0:
        raise TrainingError(f"non-finite loss at step {step} on {int(bad.item())} rank(s); stopping")


def should_stop(state: State) -> bool:
    """True on every rank once any rank has got SIGTERM (one scalar all-reduce: every rank must call it).

    The handler's flag is only ever set: a signal that lands while this all-reduce runs counts at the next call.
    """
    return dist.all_reduce_sum(torch.tensor([float(state.sigterm[0])])).item() > 0


def exit_early(logger, state: State, error: Exception | None = None) -> None:
    """After a TrainingError (status 1) or a SIGTERM that saved a checkpoint (status 143): close up and exit."""
    if error is not None:
        dist.print0(f"error: {error}")
    else:
        dist.print0(f"SIGTERM: saved a checkpoint at step {state.step}; resume with checkpoint.resume=auto")
    logger.close()
    dist.destroy()
    sys.exit(1 if error is not None else 143)


def export(engine, tokenizer, cfg, out: Path, task_type: str = "CAUSAL_LM") -> None:
    """The HF model (LoRA merged in) and, with LoRA, the adapter alone in PEFT's format under `adapter/`."""
    if not cfg.lora.enabled:
        checkpoint.export_hf(engine, tokenizer, out)
        return
    from distributed_pt.models.lora import merged_state_dict, save_adapter

    save_adapter(engine, out / "adapter", cfg.lora, base_model_name_or_path=cfg.model.path, task_type=task_type)
    checkpoint.export_hf(engine, tokenizer, out, state=merged_state_dict(engine))
