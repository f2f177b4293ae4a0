"""Distributed pruning runs for ``tests/test_ddp.py``.

Run as a script: every rank writes what it saw after each pruning step (masks, importance, and
hashes of masks, weights and optimizer state) to ``OUT/<config>_rank<r>.pt``; the single-process
references run in the test process through :func:`run` with ``devices=1``.

    python tests/ddp_worker.py OUT --configs fo,fg --launch ddp          # Lightning starts rank 1
    python tests/ddp_worker.py OUT --configs fo --launch ddp_spawn
    NODE_RANK=0 ... python tests/ddp_worker.py OUT --launch external --num-nodes 2 --devices 1

Data order: under DDP Lightning wraps the sequential loader in ``DistributedSampler(shuffle=False)``,
which gives rank ``r`` the samples ``r, r + W, r + 2W, ...``; the single-process reference reads the
global batch ``k`` as rank 0's batch ``k`` followed by rank 1's batch ``k`` (:func:`global_order`).
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.plugins import MixedPrecision
from torch.utils.data import DataLoader, DistributedSampler, Subset, TensorDataset

from lightning_prune import TaylorPruningCallback, compact
from lightning_prune.distributed import CollectiveCounter, CPUSyncBatchNorm, CPUSyncBatchNormPlugin, all_reduce_tensors
from lightning_prune.models import CifarResNet

SAMPLES = 48  # 3 optimizer steps per epoch with 2 ranks x 8
BATCH = 8  # per rank
SIZE = 16  # image side


@dataclass(frozen=True)
class Config:
    criterion: str = "taylor_fo_bn"
    dtype: str = "float64"
    precision: str = "32-true"  # or "bf16-mixed", "16-mixed" (with a CPU GradScaler)
    accumulate: int = 1
    epochs: int = 3
    prune_every: int = 2
    per_step: int = 2
    num_to_prune: int | None = 8
    gate_gradient: str = "auto"
    resume_after: int = 0  # >0: fit this many epochs, checkpoint, and resume in a new Trainer
    max_loss: float | None = None
    pattern: str = "forward_example"  # how the LightningModule exposes its network (see ``MODULES``)
    history_dir: bool = True  # False: the history goes to the trainer's log dir, read on every rank
    pruning_steps: int | None = None  # a cubic schedule over this many optimizer steps
    compact_when_done: bool = False  # train the compact network after the last pruning step
    latency_ratio: float | None = None  # target_latency_ratio: the table measured on rank zero only
    distill_weight: float = 0.0  # distillation from the network before pruning


CONFIGS = {
    "fo": Config(),
    "fg": Config(criterion="taylor_fo_bn_fg"),
    "accum": Config(accumulate=2, epochs=4),
    "accum_fg": Config(criterion="taylor_fo_bn_fg", accumulate=2, epochs=4),
    "hooks": Config(gate_gradient="hooks"),
    "fo32": Config(dtype="float32"),
    "bf16": Config(dtype="float32", precision="bf16-mixed"),
    "fp16": Config(dtype="float32", precision="16-mixed"),
    "resume": Config(resume_after=1),
    "stop": Config(max_loss=1.0),  # the global smoothed loss (~2.5) exceeds it at the first pruning step
    # the patterns users write, each the same training problem as "fo"
    "no_forward": Config(pattern="no_forward", history_dir=False),
    "module_name": Config(pattern="module_name"),
    "forward_only": Config(pattern="forward_only"),
    "schedule": Config(pruning_steps=6, epochs=4),  # 3 pruning steps removing 5, 7, 8 neurons in all
    "compact": Config(pattern="no_forward", per_step=3, compact_when_done=True),  # compact from step 7 of 9
    "latency": Config(pattern="no_forward", latency_ratio=0.7, pruning_steps=6, epochs=4, num_to_prune=None),
    "distill": Config(pattern="no_forward", per_step=3, compact_when_done=True, distill_weight=1.0),
}


class NoForward(pl.LightningModule):
    """A user's module: no ``forward``, no ``example_input_array``; ``training_step`` calls ``self.net``."""

    def __init__(self, dtype: torch.dtype, depth: int = 8, lr: float = 0.1) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = CifarResNet(depth).to(dtype)
        self.lr = lr
        self.dtype_ = dtype

    def train_dataloader(self) -> DataLoader:
        data = dataset(self.dtype_)
        world = self.trainer.world_size
        if world == 1:  # the reference: global batches of 2 x BATCH in the order two DDP ranks see them
            return DataLoader(Subset(data, global_order(SAMPLES, 2, BATCH)), batch_size=2 * BATCH, shuffle=False)
        # Lightning's automatic DistributedSampler would shuffle (training data always is): not here
        sampler = DistributedSampler(data, num_replicas=world, rank=self.trainer.global_rank, shuffle=False)
        return DataLoader(data, batch_size=BATCH, sampler=sampler)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9, weight_decay=5e-4)


class ForwardOnly(NoForward):
    """A ``forward`` that ``training_step`` calls, no ``example_input_array``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)


class Net(ForwardOnly):
    """The callback's own pattern: ``forward`` and ``example_input_array``."""

    def __init__(self, dtype: torch.dtype, depth: int = 8, lr: float = 0.1) -> None:
        super().__init__(dtype, depth, lr)
        self.example_input_array = torch.zeros(2, 3, SIZE, SIZE, dtype=dtype)


MODULES = {"forward_example": Net, "forward_only": ForwardOnly, "no_forward": NoForward, "module_name": NoForward}


def dataset(dtype: torch.dtype) -> TensorDataset:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(SAMPLES, 3, SIZE, SIZE, generator=g).to(dtype)
    y = torch.randint(0, 10, (SAMPLES,), generator=g)
    return TensorDataset(x, y)


def global_order(n: int, world: int, batch: int) -> list[int]:
    """Sample order of a single process whose batch ``k`` is the concatenation of every rank's batch ``k``."""
    per_rank = [list(range(n))[r::world] for r in range(world)]
    order = []
    for k in range(0, len(per_rank[0]), batch):
        for r in range(world):
            order += per_rank[r][k : k + batch]
    return order


def digest(tensors: dict[str, Any]) -> str:
    h = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key]
        if not isinstance(t, torch.Tensor):
            h.update(f"{key}={t!r}".encode())
            continue
        t = t.detach().cpu().contiguous()
        t = t.to(torch.uint8) if t.dtype == torch.bool else t
        h.update(key.encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def optimizer_tensors(trainer: pl.Trainer) -> dict[str, Any]:
    out = {}
    for i, opt in enumerate(trainer.optimizers):
        for p, state in opt.state_dict()["state"].items():
            for k, v in state.items():
                out[f"{i}.{p}.{k}"] = v
    return out


class Recorder(Callback):
    """After each pruning step (and at the end), what this rank holds: masks, importance and hashes."""

    def __init__(self, pruner: TaylorPruningCallback, prefix: Path) -> None:
        self.pruner = pruner
        self.prefix = prefix  # every rank writes <prefix>_rank<r>.pt when fitting ends
        self.steps: list[dict[str, Any]] = []
        self.final: dict[str, Any] = {}
        self.info: dict[str, Any] = {}
        self.labels: list[torch.Tensor] = []
        self.comm: list[tuple[int, list[tuple[str, int, str]]]] = []  # per batch: (global step, collectives)
        self._counter = CollectiveCounter()
        self._seen = 0

    def _snapshot(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        masks = {k: v.cpu() for k, v in self.pruner.masks.items()}
        return {
            "global_step": trainer.global_step,
            "num_pruned": self.pruner.num_pruned,
            "done": self.pruner.done,
            "stop_reason": self.pruner.stop_reason,
            "masks": masks,
            "importance": {k: v.detach().cpu().double().clone() for k, v in self.pruner.importance.items()},
            "loss": self.pruner.history[-1].loss if self.pruner.history else None,
            "hash_masks": digest(masks),
            "hash_weights": digest(pl_module.state_dict()),
            "hash_optimizer": digest(optimizer_tensors(trainer)),
        }

    def on_train_start(self, trainer, pl_module):
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        self.info = {
            "strategy": type(trainer.strategy).__name__,
            "world_size": trainer.world_size,
            "num_nodes": trainer.num_nodes,
            "node_rank": trainer.node_rank,
            "global_rank": trainer.global_rank,
            "precision": trainer.precision,
            "scaler": type(scaler).__name__ if scaler is not None else None,
            "sync_bn": sorted({type(m).__name__ for m in pl_module.modules() if "BatchNorm" in type(m).__name__}),
            "cluster": type(getattr(trainer.strategy, "cluster_environment", None)).__name__,
        }
        self._seen = len(self.pruner.history)
        self._counter.__enter__()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        Path(f"{self.prefix}_rank{trainer.global_rank}.heartbeat").touch()  # alive (tests/test_ddp.py: STALL)
        self.labels.append(batch[1].cpu())  # the data order this rank saw
        self.comm.append((trainer.global_step, [(r.op, r.bytes, r.caller) for r in self._counter.records]))
        self._counter.records.clear()
        if len(self.pruner.history) != self._seen:
            self._seen = len(self.pruner.history)
            self.steps.append(self._snapshot(trainer, pl_module))
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if scaler is not None:
            self.info["max_scale"] = max(self.info.get("max_scale", 0.0), float(scaler.get_scale()))

    def on_train_end(self, trainer, pl_module):
        self._counter.__exit__(None, None, None)
        self.final = self._snapshot(trainer, pl_module)
        self.final["weights"] = {k: v.detach().cpu().clone() for k, v in pl_module.state_dict().items()}
        data = {"steps": self.steps, "final": self.final, "info": self.info, "labels": self.labels, "comm": self.comm}
        torch.save(data, f"{self.prefix}_rank{trainer.global_rank}.pt")


def _trainer(cfg: Config, out: Path, callbacks, devices: int, num_nodes: int, strategy: str, epochs: int):
    plugins: list[Any] = []
    checkpoint = strategy == "ddp_spawn"  # the docs' way back to the masks in the launching process
    precision: str | None = cfg.precision
    if devices * num_nodes > 1:
        plugins.append(CPUSyncBatchNormPlugin())  # sync_batchnorm=True, on the CPU
    if cfg.precision == "16-mixed":  # Lightning would swap 16-mixed for bf16 on the CPU without the scaler
        plugins.append(MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu")))
        precision = None
    return pl.Trainer(
        accelerator="cpu",
        devices=devices,
        num_nodes=num_nodes,
        strategy=strategy,
        precision=precision,
        plugins=plugins or None,
        max_epochs=epochs,
        accumulate_grad_batches=cfg.accumulate,
        callbacks=callbacks + ([ModelCheckpoint(dirpath=str(out / "checkpoints"))] if checkpoint else []),
        logger=False,
        enable_checkpointing=checkpoint,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        default_root_dir=str(out),
    )


def run(name: str, out: Path, devices: int = 1, num_nodes: int = 1, strategy: str = "auto") -> None:
    """Fit config ``name``; single-process (``devices=1``) runs read the global batches in DDP order."""
    cfg = CONFIGS[name]
    dtype = getattr(torch, cfg.dtype)

    def make(epochs: int, tag: str, ckpt: str | None = None) -> None:
        pruner = TaylorPruningCallback(
            cfg.criterion,
            prune_every_n_batches=cfg.prune_every,
            neurons_per_step=cfg.per_step,
            num_to_prune=cfg.num_to_prune,
            gate_gradient=cfg.gate_gradient,
            max_loss=cfg.max_loss,
            history_dir=str(out / f"history_{tag}") if cfg.history_dir else None,
            module_name="net" if cfg.pattern == "module_name" else None,
            pruning_steps=cfg.pruning_steps,
            compact_when_done=cfg.compact_when_done,
            target_latency_ratio=cfg.latency_ratio,
            distill_weight=cfg.distill_weight,
        )
        root = out / f"root_{tag}"
        trainer = _trainer(cfg, root, [pruner, Recorder(pruner, out / tag)], devices, num_nodes, strategy, epochs)
        module = MODULES[cfg.pattern](dtype)
        trainer.fit(module, ckpt_path=ckpt)
        if ckpt is None and cfg.resume_after:
            trainer.save_checkpoint(out / f"{tag}.ckpt")
        if strategy == "ddp_spawn":
            _masks_in_the_launcher(pruner, module, root / "checkpoints", out / f"{tag}_launcher.pt")

    if cfg.resume_after:  # <name>_first: the run up to the checkpoint; <name>: the resumed run
        make(cfg.resume_after, f"{name}_first")
        make(cfg.epochs, name, str(out / f"{name}_first.ckpt"))
    else:
        make(cfg.epochs, name)


def _masks_in_the_launcher(pruner: TaylorPruningCallback, module: pl.LightningModule, ckpt_dir: Path, path: Path):
    """What docs/distributed.md tells ``ddp_spawn`` users: the callback here saw nothing of the fit; load
    its state from the checkpoint, then compact the weights Lightning handed back with its masks."""
    before = dict(pruner.masks)
    (ckpt_path,) = ckpt_dir.glob("*.ckpt")
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    pruner.load_state_dict(ckpt["callbacks"][pruner.state_key])
    compact_net = compact(module, pruner.masks)  # the network, or the LightningModule where it was traced
    x = torch.randn(4, 3, SIZE, SIZE, dtype=module.dtype_, generator=torch.Generator().manual_seed(1))
    module.eval()
    compact_net.eval()
    with torch.no_grad():
        masked, small = module.net(x), compact_net(x)
    torch.save(
        {
            "masks_before_loading": before,
            "masks": {k: v.clone() for k, v in pruner.masks.items()},
            "relative_difference": float((masked - small).norm() / masked.norm()),
            "parameters": (sum(p.numel() for p in module.net.parameters()), sum(p.numel() for p in compact_net.parameters())),
        },
        path,
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--configs", default="fo")
    parser.add_argument("--launch", choices=["ddp", "ddp_spawn", "external"], default="ddp")
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--num-nodes", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("LIGHTNING_PRUNE_CACHE", str(args.out / "cache"))  # latency tables
    strategy = "ddp" if args.launch == "external" else args.launch
    for name in args.configs.split(","):
        run(name, args.out, devices=args.devices, num_nodes=args.num_nodes, strategy=strategy)
    if torch.distributed.is_available() and torch.distributed.is_initialized():  # helpers, same process group
        rank = torch.distributed.get_rank()
        local = {"a": torch.full((3,), rank + 1.0, dtype=torch.float64), "b": torch.tensor([rank])}
        torch.save(
            {"sum": all_reduce_tensors(local), "mean": all_reduce_tensors(local, mean=True), **_sync_bn_check(rank)},
            args.out / f"helpers_rank{rank}.pt",
        )


def _sync_bn_check(rank: int) -> dict[str, float]:
    """CPUSyncBatchNorm on this rank's half of a batch against BatchNorm2d on the whole batch."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(8, 4, 5, 5, generator=g, dtype=torch.float64) * 3 + 1
    w = torch.randn(8, 4, 5, 5, generator=g, dtype=torch.float64)
    bn = torch.nn.BatchNorm2d(4).double()
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5, generator=g)
        bn.bias.uniform_(-1, 1, generator=g)
    sync = CPUSyncBatchNorm.convert(copy.deepcopy(bn))
    full = x.clone().requires_grad_(True)
    (bn(full) * w).sum().backward()
    half = slice(4 * rank, 4 * rank + 4)
    part = x[half].clone().requires_grad_(True)
    out = sync(part)
    (out * w[half]).sum().backward()  # the sum over ranks of these losses is the single-process loss
    weight_grad = sync.weight.grad.clone()
    torch.distributed.all_reduce(weight_grad)
    with torch.no_grad():
        ref_out = bn.train()(x)[half]  # second forward: compare outputs only (running stats updated twice)
    return {
        "bn_type": type(sync).__name__,
        "bn_out": (out - ref_out).abs().max().item(),
        "bn_input_grad": (part.grad - full.grad[half]).abs().max().item(),
        "bn_weight_grad": (weight_grad - bn.weight.grad).abs().max().item(),
        "bn_running_var": (sync.running_var - (0.9 + 0.1 * x.var(dim=(0, 2, 3)))).abs().max().item(),
        "bn_running_mean": (sync.running_mean - 0.1 * x.mean(dim=(0, 2, 3))).abs().max().item(),
    }


if __name__ == "__main__":
    main()
