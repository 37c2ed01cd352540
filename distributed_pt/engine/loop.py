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

import datetime
import fcntl
import json
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
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
        """SIGTERM and SIGINT (Ctrl-C) ask for a checkpoint and a clean exit (143); so does the DeepSpeed launcher
        above this rank going away (`watch_launcher`)."""
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self.sigterm.__setitem__(0, True))
        watch_launcher(self.sigterm)


def watch_launcher(flag: list[bool], every_s: float = 1.0) -> threading.Thread | None:
    """Under DeepSpeed's launcher, stop like on SIGTERM once the launcher is gone.

    A signal to the `deepspeed` command kills it alone on one node (it forwards nothing), leaving its launch.py and
    the ranks training with nobody to stop them; each rank therefore watches its parent (launch.py) and the command
    above it, and sets `flag` when either has gone. Returns the watching thread (None when not under the launcher).
    """
    import psutil

    try:
        parent = psutil.Process(os.getppid())
        if "deepspeed.launcher.launch" not in " ".join(parent.cmdline()):
            return None
        watched = [parent] + [p for p in parent.parents()[:1] if "deepspeed" in " ".join(p.cmdline())]
    except psutil.Error:
        return None

    def is_gone(p: psutil.Process) -> bool:
        try:
            return not p.is_running() or p.status() == psutil.STATUS_ZOMBIE
        except psutil.Error:
            return True

    def watch() -> None:
        while not flag[0]:
            time.sleep(every_s)
            gone = [p for p in watched if is_gone(p)]
            if gone:
                print(f"rank {dist.rank()}: the launcher ({gone[0].pid}) is gone; saving a checkpoint and stopping",
                      flush=True)  # fmt: skip
                flag[0] = True

    thread = threading.Thread(target=watch, name="watch_launcher", daemon=True)
    thread.start()
    return thread


def start(cfg: Any) -> Path:
    """Every stage's first lines: process group, seed, the output dir locked for this run, the resolved config printed
    on rank 0 (config.yaml is written once the run is known to start: `Run`)."""
    from distributed_pt.engine.metrics import set_seed

    dist.init_distributed()
    set_seed(cfg.train.seed)
    out = Path(cfg.output_dir)
    lock_output_dir(out)
    if dist.is_main():
        print(json.dumps(to_dict(cfg), indent=1), flush=True)
    return out


_LOCK: list[Any] = []  # rank 0's open lock file: the lock lasts as long as the process


def lock_output_dir(out: Path) -> None:
    """One run per output dir: rank 0 holds an exclusive lock on <output_dir>/.run.lock (the kernel drops it when the
    process ends, however it ends). A second run stops at once with a ConfigError naming the holder; a lock file left
    by a run that died is taken over, and said."""
    problem = None
    if dist.is_main():
        out.mkdir(parents=True, exist_ok=True)
        f = open(out / ".run.lock", "a+")  # held open: the lock lasts while it is
        f.seek(0)
        holder = f.read().strip()
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            problem = (
                f"output_dir {out} is in use by another run ({holder or 'holder unknown'}); wait for it to end, "
                "stop it, or choose another output_dir"
            )
            f.close()
        else:
            if holder:
                print(f"output_dir {out}: taking over from a run that ended without finishing ({holder})", flush=True)
            started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
            f.seek(0)
            f.truncate()
            f.write(f"host {socket.gethostname()}, pid {os.getpid()}, started {started}\n")
            f.flush()
            _LOCK[:] = [f]
    problem = dist.broadcast_object(problem)
    if problem:
        raise ConfigError(problem)


def release_output_dir() -> None:
    """A finished run empties its lock file: a holder left in it means the run did not finish."""
    if _LOCK:
        _LOCK[0].truncate(0)
        _LOCK[0].close()
        _LOCK.clear()


def write_config(cfg: Any, out: Path) -> None:
    """config.yaml (rank 0). A config that differs from the one already there (a resumed run) is said, key by key."""
    path = out / "config.yaml"
    if path.is_file():
        old, new = _flat(yaml.safe_load(path.read_text()) or {}), _flat(to_dict(cfg))
        changed = [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted({*old, *new}) if old.get(k) != new.get(k)]
        if changed:
            print(f"config changed since {path} was written:\n  " + "\n  ".join(changed), flush=True)
    save_config(cfg, path)


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        v = list(v) if isinstance(v, tuple) else v  # as YAML writes it (optim.betas)
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) and k != "init_config" else {f"{prefix}{k}": v})
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
        if dist.is_main():
            write_config(cfg, self.out)
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
        try:
            save(self.engines, self.cfg, self.state, **self._client_state())
        except checkpoint.CheckpointError as e:  # a full disk or a failed write: the message names the path
            self._exit(e)

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
        release_output_dir()
        return summary

    def _exit(self, error: Exception | None = None) -> None:
        """After a TrainingError (status 1) or a SIGTERM that saved a checkpoint (status 143): close up and exit."""
        if error is not None:
            dist.print0(f"error: {error}")
        else:
            dist.print0(f"stopped by a signal: saved a checkpoint at step {self.state.step}; run again to resume")
        self.logger.close()
        dist.destroy(barrier=error is None)  # after an error another rank may be stuck elsewhere
        if error is None:
            release_output_dir()  # stopped cleanly with a checkpoint
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
    found = checkpoint.resume_point(cfg.output_dir, cfg.checkpoint.resume)
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
