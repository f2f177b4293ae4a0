"""What TaylorPruningCallback costs under DDP: bytes it communicates, and step time with/without it.

Two CPU processes (gloo), CIFAR ResNet-20 on synthetic 32x32 images. Lightning's ``strategy="ddp"``
starts the second process by re-running this script. Configurations alternate in trials inside the
same two processes, so that machine load affects them alike:

* ``none``: plain DDP training;
* ``taylor_fo_bn``: the group criterion, read from DDP-averaged parameter gradients;
* ``taylor_fo_bn_fg``: the per-sample criterion, through explicit gates and one all_reduce per step.

Bytes are counted for real: :class:`lightning_prune.distributed.CollectiveCounter` wraps
``torch.distributed``'s collectives during the fit and keeps those called from the pruning code
(the payload this rank puts in). Step time is taken on rank zero between ``on_train_batch_start``
and ``on_train_batch_end`` (DDP synchronises the ranks every step). The ratio to plain DDP is taken
per trial (the configurations run back to back, in alternating order) and its median over trials is
reported, with the ratio of the 10th percentiles of all steps as a load-robust second figure, and the
ratio of rank zero's training-thread CPU time per step (what the callback computes, without waits);
the time spent inside the callback's hooks is timed directly too (the explicit gates' extra forward and
backward work of the per-sample criterion is only in the step time).

    python benchmarks/ddp_overhead.py [--steps 20] [--trials 5] [--batch-size 32] [--every 10]

Prints a table and writes ``benchmarks/results/ddp_overhead.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_prune import TaylorPruningCallback
from lightning_prune.distributed import CollectiveCounter
from overhead import ResNet20Classifier  # same network and optimizer as the single-process benchmark

CONFIGS = ("none", "taylor_fo_bn", "taylor_fo_bn_fg")
RESULTS = Path(__file__).resolve().parent / "results" / "ddp_overhead.json"


class _Probe(pl.Callback):
    """Step times, and the pruning code's collectives per batch (counted from ``on_train_start``)."""

    def __init__(self, warmup: int) -> None:
        self.warmup = warmup
        self.times: list[float] = []
        self.cpu_times: list[float] = []
        self.hook_times: list[float] = []  # time inside the pruning callback's hooks, per step
        self.hook_clock = 0.0
        self.comm: list[tuple[int, list]] = []
        self.counter = CollectiveCounter()

    def on_train_start(self, trainer, pl_module):
        self.counter.__enter__()

    def on_train_end(self, trainer, pl_module):
        self.counter.__exit__(None, None, None)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._start = time.perf_counter()
        self._cpu_start = time.thread_time()
        self.hook_clock = 0.0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx >= self.warmup:
            self.times.append(time.perf_counter() - self._start)
            self.cpu_times.append(time.thread_time() - self._cpu_start)
            self.hook_times.append(self.hook_clock)
        self.comm.append((trainer.global_step, list(self.counter.records)))
        self.counter.records.clear()


def _fit(config: str, args, loader: DataLoader, root: str) -> tuple[_Probe, TaylorPruningCallback | None, pl.Trainer]:
    probe = _Probe(args.warmup)
    callbacks: list[pl.Callback] = [probe]
    pruner = None
    if config != "none":
        pruner = TaylorPruningCallback(
            config, prune_every_n_batches=args.every, neurons_per_step=args.per_step, keep_ratio=0.3,
            history_dir=os.path.join(root, "history"),
        )  # fmt: skip
        callbacks.insert(0, pruner)
        for hook in ("on_before_backward", "on_after_backward", "on_before_optimizer_step", "on_train_batch_end"):
            setattr(pruner, hook, _timed(getattr(pruner, hook), probe))
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, strategy="ddp", max_steps=args.warmup + args.steps, callbacks=callbacks,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        limit_val_batches=0, default_root_dir=root,
    )  # fmt: skip
    trainer.fit(ResNet20Classifier(), loader)
    return probe, pruner, trainer


def _timed(method, probe: _Probe):
    def timed(*args, **kwargs):
        start = time.perf_counter()
        try:
            return method(*args, **kwargs)
        finally:
            probe.hook_clock += time.perf_counter() - start

    return timed


def _communication(probe: _Probe, pruner: TaylorPruningCallback | None) -> dict:
    """Bytes per optimizer step (gradient collection) and per pruning step (decision), by collective."""
    pruning_steps = {r.step for r in pruner.history} if pruner else set()
    per_step: dict[str, list[int]] = defaultdict(list)
    per_prune: dict[str, list[int]] = defaultdict(list)
    calls = 0
    for step, records in probe.comm:
        calls += len(records)
        kinds = defaultdict(int)
        for r in records:
            kinds[f"{r.op} ({r.caller.rsplit('.', 1)[1]})"] += r.bytes
        for kind, size in kinds.items():
            (per_prune if step in pruning_steps and "_prune_step" in kind else per_step)[kind].append(size)
    step_bytes = {k: statistics.mean(v) for k, v in per_step.items()}
    prune_bytes = {k: statistics.mean(v) for k, v in per_prune.items()}
    total = sum(sum(r.bytes for r in records) for _, records in probe.comm)
    return {
        "pruning_steps": len(pruning_steps),
        "collective_calls": calls,
        "bytes_total": total,
        "bytes_per_optimizer_step": step_bytes,
        "bytes_per_pruning_step": prune_bytes,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=20, help="measured optimizer steps per trial")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=32, help="per process")
    parser.add_argument("--every", type=int, default=10, help="prune_every_n_batches (K)")
    parser.add_argument("--per-step", type=int, default=8, help="neurons removed per pruning step")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    n = 2 * args.batch_size * (args.warmup + args.steps)
    data = TensorDataset(torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g))
    loader = DataLoader(data, batch_size=args.batch_size, shuffle=True)

    times: dict[str, list[float]] = defaultdict(list)
    cpu_times: dict[str, list[float]] = defaultdict(list)
    hook_times: dict[str, list[float]] = defaultdict(list)
    trial_medians: dict[str, list[float]] = defaultdict(list)
    comm: dict[str, dict] = {}
    rank = 0
    with tempfile.TemporaryDirectory() as root:
        for trial in range(args.trials):
            order = CONFIGS if trial % 2 == 0 else CONFIGS[::-1]  # no config always runs first
            for config in order:
                probe, pruner, trainer = _fit(config, args, loader, root)
                rank = trainer.global_rank
                times[config] += probe.times
                cpu_times[config] += probe.cpu_times
                hook_times[config] += probe.hook_times
                trial_medians[config].append(statistics.median(probe.times))
                if config != "none":
                    comm[config] = _communication(probe, pruner)
    if rank != 0:
        return

    params = sum(p.numel() for p in ResNet20Classifier().parameters())
    # step-time ratio: per trial (configurations run back to back), median over trials; and from the
    # 10th percentile of all steps (the least disturbed ones: robust to other load on the machine)
    ratios = {c: [m / b for m, b in zip(trial_medians[c], trial_medians["none"])] for c in CONFIGS}
    p10 = {c: statistics.quantiles(times[c], n=10)[0] for c in CONFIGS}
    # CPU time of rank zero's training thread per step (forward, backward, callback; not the waits
    # for communication): what the callback computes, much less sensitive to other load
    cpu = {c: statistics.median(cpu_times[c]) for c in CONFIGS}
    result = {
        "setup": {
            "model": "cifar_resnet20", "processes": 2, "backend": "gloo", "device": "cpu",
            "threads_per_process": args.threads, "batch_per_process": args.batch_size,
            "prune_every_n_batches": args.every, "neurons_per_step": args.per_step,
            "measured_steps_per_trial": args.steps, "trials": args.trials,
            "torch": torch.__version__, "lightning": pl.__version__, "cpu": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "load_average": os.getloadavg(),
            "ddp_gradient_bytes_per_step": params * 4,
        },
        "configs": {},
    }  # fmt: skip
    print(f"ResNet-20, 2 CPU processes (gloo), batch {args.batch_size}/process, pruning every {args.every} steps")
    print(f"DDP's own gradient all-reduce: {params * 4:,} bytes per step (for comparison)")
    print(f"{'config':>16} {'median step (s)':>16} {'ratio':>7} {'ratio p10':>10} {'CPU ratio':>10} "
          f"{'hooks ms/step':>14} {'bytes/interval':>15} {'bytes/opt step':>15}")  # fmt: skip
    for config in CONFIGS:
        median = statistics.median(times[config])
        ratio = statistics.median(ratios[config])
        entry = {
            "median_step_s": median, "p10_step_s": p10[config], "ratio_to_none": ratio,
            "ratio_to_none_per_trial": ratios[config], "ratio_to_none_p10": p10[config] / p10["none"],
            "median_step_cpu_s": cpu[config], "cpu_ratio_to_none": cpu[config] / cpu["none"],
            "callback_hooks_s_per_step_mean": statistics.mean(hook_times[config]) if hook_times[config] else 0.0,
            "callback_hooks_s_per_step_median": statistics.median(hook_times[config]) if hook_times[config] else 0.0,
            "steps_measured": len(times[config]),
        }  # fmt: skip
        per_interval = per_step = 0.0
        if config in comm:
            c = comm[config]
            per_step = sum(c["bytes_per_optimizer_step"].values())
            per_interval = per_step * args.every + sum(c["bytes_per_pruning_step"].values())
            entry.update(c, bytes_per_pruning_interval=per_interval)
        result["configs"][config] = entry
        print(
            f"{config:>16} {median:16.4f} {ratio:7.3f} {p10[config] / p10['none']:10.3f} "
            f"{cpu[config] / cpu['none']:10.3f} "
            f"{entry['callback_hooks_s_per_step_mean'] * 1e3:14.2f} "
            f"{per_interval:15,.0f} {per_step:15,.0f}"
        )
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=1))
    print(f"written to {RESULTS}")


if __name__ == "__main__":
    main()
