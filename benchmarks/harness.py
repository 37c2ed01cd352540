"""Shared benchmark harness: time and memory of one callable, flat JSON records, and the views rendered from them.

Every bench builds records with ``make_record`` (one per case × provider × metric), hands them to ``save_results``
(``<out_dir>/<bench>.json``) which calls ``render`` for ``<bench>.md`` (table) and ``<bench>.png`` (grouped bars).
Re-render a saved result with::

    python -m benchmarks.harness render benchmarks/results/bench_lora_matmul.json
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

_REPO = Path(__file__).resolve().parent.parent
_RECORD_KEYS = ("bench", "case", "provider", "metric", "value", "unit")


def env_info() -> dict[str, str]:
    """Device, library versions, git sha and date (UTC) of this run; computed once per process."""
    from distributed_pt.logging import environment

    return dict(environment())


def cuda_device(bench: str, device: str) -> str:
    """The ``--device`` of a GPU bench, made current; exits with a hint when there is no such CUDA device."""
    if not torch.cuda.is_available() or not device.startswith("cuda"):
        raise SystemExit(f"{bench}: needs a CUDA GPU (none found or --device {device}); use --cpu-smoke to check the "
                         "script on CPU")  # fmt: skip
    if ":" in device:  # torch >= 2.11 refuses an index-less "cuda" here; it means the current device
        torch.cuda.set_device(device)
    return device


def _reset_grads(tensors: Sequence[torch.Tensor] | None) -> None:
    for t in tensors or ():
        t.grad = None


def measure(
    fn: Callable[[], object],
    *,
    warmup: int = 25,
    rep: int = 100,
    grad_to_none: Sequence[torch.Tensor] | None = None,
) -> tuple[float, float]:
    """Median run time of ``fn`` and the peak memory it allocates on top of what was allocated before.

    Args:
        fn: the work to time (e.g. one forward + backward); its return value is dropped.
        warmup: warm-up budget in milliseconds (``triton.testing.do_bench`` semantics; on CPU: one warm-up call).
        rep: timing budget in milliseconds (on CPU at least 3 calls).
        grad_to_none: tensors whose ``.grad`` is reset before every call, so gradients are not accumulated.

    Returns:
        (median milliseconds, peak extra MiB). On CUDA the time comes from ``do_bench`` (L2 flushed between calls)
        and the memory from one separate call between ``reset_peak_memory_stats`` and ``max_memory_allocated``.
        On CPU the time is a ``time.perf_counter`` median and the memory is NaN (not measured).
    """
    if torch.cuda.is_available():
        import triton.testing

        fn()  # compile/autotune first, or do_bench's run-count estimate would include it
        ms = triton.testing.do_bench(fn, warmup=warmup, rep=rep, grad_to_none=grad_to_none, return_mode="median")
        _reset_grads(grad_to_none)
        gc.collect()
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - before) / 2**20
        return float(ms), float(peak)

    _reset_grads(grad_to_none)
    fn()
    times: list[float] = []
    while len(times) < 3 or (sum(times) < rep / 1e3 and len(times) < 1000):
        _reset_grads(grad_to_none)
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3, float("nan")


def case_str(case: dict) -> str:
    """'tokens=8192,k=4096,n=4096,r=16' from a case dict, in the dict's order."""
    return ",".join(f"{k}={v}" for k, v in case.items())


def make_record(bench: str, case: dict, provider: str, metric: str, value: float, unit: str) -> dict:
    """One flat result record: bench, case (string and its fields), provider, metric, value, unit and ``env_info``."""
    clash = set(case) & (set(_RECORD_KEYS) | set(env_info()))
    if clash:
        raise ValueError(f"case fields {sorted(clash)} clash with record fields")
    record = {"bench": bench, "case": case_str(case), **case}
    record.update(provider=provider, metric=metric, value=float(value), unit=unit)
    record.update(env_info())
    return record


def save_results(
    bench: str, records: list[dict], out_dir: str | Path = "benchmarks/results", wandb_project: str | None = None
) -> Path:
    """Write ``<out_dir>/<bench>.json`` (a list of records), render its table and plot, optionally log to W&B.

    Returns:
        The JSON path.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{bench}.json"
    path.write_text(json.dumps(records, indent=1) + "\n")
    render(path)
    if wandb_project:
        _log_wandb(bench, records, wandb_project)
    return path


def _log_wandb(bench: str, records: list[dict], project: str) -> None:
    import wandb  # lazy: only when asked

    mode = os.environ.get("WANDB_MODE")
    if mode is None:  # with no key configured, wandb.init would fail: stay offline
        netrc = Path.home() / ".netrc"
        has_key = "WANDB_API_KEY" in os.environ or (netrc.exists() and "api.wandb.ai" in netrc.read_text())
        mode = "online" if has_key else "offline"
    columns = list(dict.fromkeys(k for r in records for k in r))
    run = wandb.init(project=project, name=bench, config=env_info(), mode=mode, job_type="benchmark")
    run.log({bench: wandb.Table(columns=columns, data=[[r.get(c) for c in columns] for r in records])})
    run.finish()


def _fmt(value: float | None) -> str:
    if value is None:
        return "—"
    if value != value:  # NaN
        return "n/a"
    return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"


def _plot_metric(records: list[dict]) -> str:
    metrics = list(dict.fromkeys(r["metric"] for r in records))
    if "time" in metrics:
        return "time"
    return next((r["metric"] for r in records if r["unit"] == "ms"), metrics[0])


def render(json_path: str | Path, out_dir: str | Path | None = None) -> tuple[Path, Path]:
    """Markdown table and PNG bar chart of a results JSON.

    Args:
        json_path: ``<bench>.json`` written by ``save_results``.
        out_dir: where to write; defaults to the JSON's folder.

    Returns:
        (markdown path, png path): ``<bench>.md`` has one row per case and one column per provider per metric;
        ``<bench>.png`` has grouped bars of the time metric per case, one bar per provider.
    """
    json_path = Path(json_path)
    records = json.loads(json_path.read_text())
    if not records:
        raise ValueError(f"{json_path} holds no records")
    out = Path(out_dir) if out_dir is not None else json_path.parent
    out.mkdir(parents=True, exist_ok=True)
    bench = records[0]["bench"]
    cases = list(dict.fromkeys(r["case"] for r in records))
    providers = list(dict.fromkeys(r["provider"] for r in records))
    metrics = list(dict.fromkeys(r["metric"] for r in records))
    units = {r["metric"]: r["unit"] for r in records}
    table = {(r["case"], r["provider"], r["metric"]): r["value"] for r in records}

    first = records[0]
    versions = ", ".join(f"{p} {first.get(p, '?')}" for p in ("torch", "triton", "transformers", "deepspeed", "peft"))
    dirty = " (dirty)" if first.get("git_dirty") == "true" else ""
    columns = [(m, p) for m in metrics for p in providers if any((c, p, m) in table for c in cases)]
    lines = [
        f"# {bench}",
        "",
        f"device: {first.get('device')} · date: {first.get('date')} · git: {first.get('git_sha')}{dirty}",
        f"versions: {versions}, cuda {first.get('cuda')}",
        "",
        "| case | " + " | ".join(f"{p} {m} ({units[m]})" for m, p in columns) + " |",
        "|---|" + "---:|" * len(columns),
    ]
    for c in cases:
        lines.append(f"| {c} | " + " | ".join(_fmt(table.get((c, p, m))) for m, p in columns) + " |")
    md_path = out / f"{bench}.md"
    md_path.write_text("\n".join(lines) + "\n")

    png_path = out / f"{bench}.png"
    _plot(png_path, bench, first, cases, providers, table, _plot_metric(records), units)
    return md_path, png_path


def _plot(path: Path, bench: str, first: dict, cases, providers, table, metric: str, units) -> None:  # noqa: ANN001
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    width = 0.8 / max(len(providers), 1)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(cases) * max(1, len(providers)) / 3 + 2), 4.5))
    for i, p in enumerate(providers):
        xs = [j + (i - (len(providers) - 1) / 2) * width for j in range(len(cases))]
        ax.bar(xs, [table.get((c, p, metric), float("nan")) for c in cases], width, label=p)
    ax.set_xticks(range(len(cases)))
    ax.set_xticklabels(cases, rotation=30, ha="right", fontsize=7)
    ax.set_ylabel(f"{metric} ({units[metric]})")
    ax.set_title(f"{bench} — {first.get('device')} — {first.get('git_sha')}", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.harness", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_render = sub.add_parser("render", help="render <bench>.md and <bench>.png from a results JSON")
    p_render.add_argument("json_path", type=Path)
    p_render.add_argument("--out-dir", type=Path, default=None)
    args = parser.parse_args(argv)
    md, png = render(args.json_path, args.out_dir)
    print(f"wrote {md} and {png}")


if __name__ == "__main__":
    main()
