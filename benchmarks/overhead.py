"""Training-step time of CIFAR ResNet-20 (batch 128, CPU) with and without TaylorPruningCallback.

Both configurations run in one process, in alternating trials, so that machine load affects them
alike; the step time is taken between ``on_train_batch_start`` and ``on_train_batch_end`` and the
median over all measured steps is compared. Pruning stays active during the whole measurement
(a pruning step every 10 optimizer steps).

    python benchmarks/overhead.py [--steps 40] [--trials 3] [--criterion taylor_fo_bn]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from lightning_prune import TaylorPruningCallback
from lightning_prune.models import cifar_resnet20


class ResNet20Classifier(pl.LightningModule):
    """CIFAR ResNet-20 with cross-entropy and SGD, the same initial weights in every process."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.model = cifar_resnet20()
        self.example_input_array = torch.zeros(1, 3, 32, 32)

    def forward(self, x):
        return self.model(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)


class _StepTimer(pl.Callback):
    """Step times from ``clock``: wall time, or the main thread's CPU time (with one intra-op thread
    all compute runs on it, so other processes' load does not count)."""

    def __init__(self, warmup: int, clock) -> None:
        self.warmup = warmup
        self.clock = clock
        self.times: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._start = self.clock()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx >= self.warmup:
            self.times.append(self.clock() - self._start)


def _trial(steps: int, warmup: int, loader: DataLoader, criterion: str | None, clock) -> list[float]:
    torch.manual_seed(0)
    timer = _StepTimer(warmup, clock)
    callbacks: list[pl.Callback] = [timer]
    if criterion is not None:
        callbacks.insert(0, TaylorPruningCallback(criterion, prune_every_n_batches=10, neurons_per_step=0.02, keep_ratio=0.5))
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=steps + warmup,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tempfile.mkdtemp(),
    )
    trainer.fit(ResNet20Classifier(), loader)
    return timer.times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40, help="measured steps per trial")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--trials", type=int, default=3, help="alternating trials per configuration")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--criterion", default="taylor_fo_bn")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--clock", choices=["wall", "thread-cpu"], default="wall",
        help="thread-cpu: CPU time of the training thread (use with --threads 1 on a loaded machine)",
    )  # fmt: skip
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "overhead.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    n = args.batch_size * (args.steps + args.warmup)
    gen = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(n, 3, 32, 32, generator=gen), torch.randint(0, 10, (n,), generator=gen))
    loader = DataLoader(data, batch_size=args.batch_size, shuffle=False)

    if args.clock == "thread-cpu" and args.threads != 1:
        parser.error("--clock thread-cpu measures one thread: use --threads 1")
    clock = time.perf_counter if args.clock == "wall" else time.thread_time
    baseline: list[float] = []
    pruning: list[float] = []
    for _ in range(args.trials):
        baseline += _trial(args.steps, args.warmup, loader, None, clock)
        pruning += _trial(args.steps, args.warmup, loader, args.criterion, clock)
    base_ms, prune_ms = statistics.median(baseline) * 1e3, statistics.median(pruning) * 1e3
    result = {
        "model": "cifar_resnet20",
        "batch_size": args.batch_size,
        "criterion": args.criterion,
        "threads": args.threads,
        "clock": args.clock,
        "measured_steps_per_configuration": len(baseline),
        "step_ms_without_callback": round(base_ms, 2),
        "step_ms_with_callback": round(prune_ms, 2),
        "ratio": round(prune_ms / base_ms, 4),
        "torch": torch.__version__,
        "lightning": pl.__version__,
        "machine": platform.processor() or platform.machine(),
    }
    print(
        f"ResNet-20, batch {args.batch_size}, CPU ({args.threads} threads, {args.clock} clock), "
        f"median of {len(baseline)} steps each"
    )
    print(f"  without callback: {base_ms:8.1f} ms/step")
    print(f"  with {args.criterion}: {prune_ms:8.1f} ms/step")
    print(f"  ratio: {prune_ms / base_ms:.3f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
