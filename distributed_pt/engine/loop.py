"""The run lifecycle every stage shares, written once: start → resume → logger → SIGTERM → first eval → the stage's
loop → stop check → final eval → save → (the stage's export) → finish.

A stage calls it like this, and keeps its own loop, `train_step`, eval and export:

    start(cfg)                                            # process group, seed, output dir + resolved config
    ... tokenizer, data, models, engines ...
    run = Run(cfg, engine, total_steps, fingerprint(tokenizer, cfg.data.train_files))   # resumes if it can
    before, after = run.train(lambda: train(run, ...), lambda: evaluate(...))
    export(engine, tokenizer, cfg, run.out / "final")
    return run.finish(before, after)

    def train(run, ...):                                  # the stage's loop, with the step visible
        while run.training():
            ... forward, check_finite(loss, run.state.step + 1), backward, step ...
            run.end_step(timer.flush)                     # count, progress bar, log, eval, save, stop check
"""

from __future__ import annotations

import json
import os
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from distributed_pt import checkpoint, dist
from distributed_pt.config import ConfigError, save_config, to_dict
from distributed_pt.data.io import files_digest, tokenizer_digest
from distributed_pt.engine.metrics import peak_memory_gib
from distributed_pt.engine.planner import run_plan
from distributed_pt.logging import RunLogger, environment

Metrics = dict[str, float]


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


def start(cfg: Any) -> Path:
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


def data_cache(cfg: Any) -> Path:
    """Where the tokenized data is cached: `data.cache_dir`, else <output_dir>/data_cache."""
    return Path(cfg.data.cache_dir or Path(cfg.output_dir) / "data_cache")


class Run:
    """One stage run after its engines exist: resumes the latest checkpoint (if any), opens the logger, installs the
    SIGTERM handler; then `train` wraps the stage's loop and `finish` writes the summary.

    Args:
        cfg: the stage config (sections train, logging, checkpoint, output_dir are read).
        engines: the DeepSpeed engine, or {name: engine} for several (saved side by side).
        total_steps: optimizer steps (PPO: PPO steps) the run lasts.
        inputs: `fingerprint` of the tokenizer and training data, saved with every checkpoint and checked on resume.
        client_state: extra state to save with every checkpoint (e.g. PPO's KL controller); `self.client` holds
            what a resumed checkpoint had ({} on a fresh start).
    """

    def __init__(
        self,
        cfg: Any,
        engines: Any,
        total_steps: int,
        inputs: dict[str, str],
        client_state: Callable[[], dict[str, Any]] = dict,
    ) -> None:
        self.cfg, self.engines, self.total_steps, self._client_state = cfg, engines, total_steps, client_state
        self.out = Path(cfg.output_dir)
        self.state = State()
        self.client = resume(engines, cfg, self.state, inputs)
        self.logger = RunLogger(cfg.logging, cfg.output_dir, to_dict(cfg), resume_step=self.state.step)
        world, local = dist.world_size(), int(os.environ.get("LOCAL_WORLD_SIZE", dist.world_size()))
        self.plan = run_plan(cfg, world, local) if dist.is_main() else {}  # logged and summarised by rank 0 only
        if self.plan:
            self.logger.log(self.plan, step=self.state.step)
        self.state.install_sigterm()
        self._stopping = False
        self._evaluate: Callable[[], Metrics] = dict
        self._bar: tqdm | None = None

    def train(self, loop: Callable[[], None], evaluate: Callable[[], Metrics]) -> tuple[Metrics, Metrics]:
        """First eval (fresh runs only) → `loop()` → final eval and checkpoint. Returns (first, final) eval metrics.

        A TrainingError in the loop exits with status 1; a SIGTERM (during the loop or just after it) saves a
        checkpoint and exits with status 143.
        """
        self._evaluate = evaluate
        try:
            before = evaluate() if self.state.step == 0 else {}
            if before:
                self.logger.log(before, step=0)
            loop()
        except TrainingError as e:
            self._exit(e)
        finally:
            if self._bar is not None:
                self._bar.close()
        if should_stop(self.state):
            self.save()
            self._exit()
        try:
            after = evaluate()
        except TrainingError as e:  # e.g. a reward function that fails on the final eval's completions
            self.save()
            self._exit(e)
        self.logger.log(after, step=self.state.step)
        self.save()
        return before, after

    def training(self) -> bool:
        """The loop's condition: steps remain and no rank has asked to stop."""
        if self._bar is None:
            show = dist.is_main() and self.cfg.logging.progress_bar
            self._bar = tqdm(total=self.total_steps, initial=self.state.step, disable=not show)
        return self.state.step < self.total_steps and not self._stopping

    def end_step(self, metrics: Callable[[], Metrics] | Metrics, postfix: tuple[str, ...] = ("loss",)) -> None:
        """After each optimizer step: count it, then log (`metrics` is called only at log points when it is a
        function), evaluate, checkpoint and check for a stop on their schedules. Collective: every rank calls it."""
        s, train = self.state, self.cfg.train
        s.step += 1
        s.micro_step += 1
        self._bar.update(1)
        if s.step % train.log_every == 0 or s.step == self.total_steps:
            values = metrics() if callable(metrics) else metrics
            self._bar.set_postfix({k: f"{values[k]:.4f}" for k in postfix if k in values})
            self.logger.log(values, step=s.step, console=not self.cfg.logging.progress_bar)
        if train.eval_every and s.step % train.eval_every == 0 and s.step < self.total_steps:
            self.logger.log(self._evaluate(), step=s.step)
        if self.cfg.checkpoint.save_every and s.step % self.cfg.checkpoint.save_every == 0:
            self.save()
        self._stopping = should_stop(s)

    def save(self) -> None:
        save(self.engines, self.cfg, self.state, **self._client_state())

    def finish(self, before: Metrics, after: Metrics) -> dict[str, Any]:
        """summary.json (held-out metrics before and after), W&B summary, teardown."""
        summary = {"stage": self.cfg.stage, "steps": self.state.step, "before": before, "after": after}
        summary["environment"] = environment() if dist.is_main() else {}  # (git runs on rank 0 only)
        measured = dist.all_reduce_max(torch.tensor([peak_memory_gib()])).item()
        summary["memory_gib"] = {
            "planned_peak": self.plan.get("plan/peak_gib"),
            "measured_peak": measured,
            "measured": "torch max allocated" if torch.cuda.is_available() else "peak RSS (CPU: not comparable)",
        }
        if dist.is_main():
            (self.out / "summary.json").write_text(json.dumps(summary, indent=1))
        self.logger.summary(after)
        self.logger.close()
        dist.destroy()
        return summary

    def _exit(self, error: Exception | None = None) -> None:
        """After a TrainingError (status 1) or a SIGTERM that saved a checkpoint (status 143): close up and exit."""
        if error is not None:
            dist.print0(f"error: {error}")
        else:
            dist.print0(f"SIGTERM: saved a checkpoint at step {self.state.step}; resume with checkpoint.resume=auto")
        self.logger.close()
        dist.destroy()
        sys.exit(1 if error is not None else 143)


def fingerprint(tokenizer: Any, train_files: list[str]) -> dict[str, str]:
    """Short sha256 digests of the tokenizer (vocabulary and chat template) and of the training files' bytes."""
    return {"tokenizer": tokenizer_digest(tokenizer), "training data": files_digest(train_files)}


def resume(engines: Any, cfg: Any, state: State, inputs: dict[str, str]) -> dict[str, Any]:
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


def save(engines: Any, cfg: Any, state: State, **extra: Any) -> None:
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


def export(engine: Any, tokenizer: Any, cfg: Any, out: Path, task_type: str = "CAUSAL_LM") -> None:
    """The HF model (LoRA merged in) and, with LoRA, the adapter alone in PEFT's format under `adapter/`."""
    if not cfg.lora.enabled:
        checkpoint.export_hf(engine, tokenizer, out)
        return
    from distributed_pt.models.lora import merged_state_dict, save_adapter

    save_adapter(engine, out / "adapter", cfg.lora, base_model_name_or_path=cfg.model.path, task_type=task_type)
    checkpoint.export_hf(engine, tokenizer, out, state=merged_state_dict(engine))
