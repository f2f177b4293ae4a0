"""A real vision-transformer run: a small timm ViT trained on the CIFAR-10 JPEGs, then pruned to each of
``--targets`` of its FLOPs by ``TaylorPruningCallback`` (heads, MLP neurons and the embedding) while
fine-tuning, and compacted; and, as the control, fine-tuned as long without pruning (the extra steps alone
also change top-1).

The LightningModule is written as users write it: no ``forward``, no ``example_input_array``, ``training_step``
calls ``self.net``. Reports the heads, MLP and embedding widths of every block before and after, top-1 on the
10,000 test images before and after, FLOPs (``torch.utils.flop_counter``, a multiply-add counts 2) and the measured CPU
latency of the original and compact networks (eval, batch 64, median of interleaved repeats). Writes
``benchmarks/results/vit_cifar.json``; the trained network is cached at ``--checkpoint``.

    python benchmarks/vit_cifar.py [--train-steps 2000] [--prune-steps 600] [--targets 0.5 0.3] [--threads 2]
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
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset
from torch.utils.flop_counter import FlopCounterMode

from lightning_prune import TaylorPruningCallback
from lightning_prune.data import cifar10_jpeg_archive, load_cifar10_jpeg_subset
from vs_torch_pruning import Augmented, top1  # the same augmentation and test as the side-by-side

RESULTS = Path(__file__).resolve().parent / "results" / "vit_cifar.json"
CONFIG = {"img_size": 32, "patch_size": 4, "embed_dim": 96, "depth": 4, "num_heads": 4, "mlp_ratio": 4.0,
          "num_classes": 10, "drop_path_rate": 0.0}  # fmt: skip


def vit() -> nn.Module:
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(**CONFIG)


class Classifier(pl.LightningModule):
    """No ``forward``: ``training_step`` calls ``self.net``. AdamW with a cosine schedule over ``steps``."""

    def __init__(self, net: nn.Module, lr: float, steps: int) -> None:
        super().__init__()
        self.net, self.lr, self.steps = net, lr, steps

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self.net(x), y, label_smoothing=0.1)
        self.log("loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=0.05)
        schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, self.lr, total_steps=self.steps, pct_start=0.1)
        return [optimizer], [{"scheduler": schedule, "interval": "step"}]


def fit(module: pl.LightningModule, steps: int, data: Dataset, callbacks=(), seed: int = 0) -> None:
    torch.manual_seed(seed)
    loader = DataLoader(data, batch_size=128, shuffle=True, drop_last=True,
                        generator=torch.Generator().manual_seed(seed))  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        pl.Trainer(max_steps=steps, callbacks=list(callbacks), logger=False, enable_checkpointing=False,
                   enable_model_summary=False, accelerator="cpu", default_root_dir=tmp,
                   enable_progress_bar=False).fit(module, loader)  # fmt: skip


def flops(net: nn.Module) -> float:
    net.eval()
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        net(torch.zeros(1, 3, 32, 32))
    return float(counter.get_total_flops())


def widths(net: nn.Module) -> dict[str, list[int]]:
    """Heads and MLP hidden neurons of every block, and the embedding width."""
    blocks = [net.get_submodule(f"blocks.{i}") for i in range(CONFIG["depth"])]
    return {"heads": [b.attn.num_heads for b in blocks], "mlp": [b.mlp.fc1.out_features for b in blocks],
            "embedding": [b.attn.qkv.in_features for b in blocks]}  # fmt: skip


def latency(first: nn.Module, second: nn.Module, repeats: int = 30) -> tuple[float, float]:
    """Median seconds of a batch-64 eval forward of each, interleaved so both see the same machine state."""
    x = torch.randn(64, 3, 32, 32)
    times: tuple[list[float], list[float]] = ([], [])
    with torch.inference_mode():
        for net in (first, second):
            net.eval()
            for _ in range(5):
                net(x)
        for _ in range(repeats):
            for net, record in zip((first, second), times):
                start = time.perf_counter()
                net(x)
                record.append(time.perf_counter() - start)
    return statistics.median(times[0]), statistics.median(times[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train-steps", type=int, default=2000)
    parser.add_argument("--prune-steps", type=int, default=600, help="optimizer steps of pruning + fine-tuning")
    parser.add_argument("--targets", nargs="+", type=float, default=[0.5, 0.3], help="FLOPs ratios")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--checkpoint", type=Path, default=Path(tempfile.gettempdir()) / "vit_cifar_base.pt")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    archive = cifar10_jpeg_archive()
    train = Augmented(load_cifar10_jpeg_subset(archive, "train", per_class=None))
    test = load_cifar10_jpeg_subset(archive, "test", per_class=1000)
    net = vit()
    train_seconds = None  # the network comes from --checkpoint
    if args.checkpoint.is_file():
        net.load_state_dict(torch.load(args.checkpoint, weights_only=True))
    else:
        start = time.perf_counter()
        fit(Classifier(net, lr=2e-3, steps=args.train_steps), args.train_steps, train)
        train_seconds = time.perf_counter() - start
        torch.save(net.state_dict(), args.checkpoint)
    base = {"top1": top1(net, test), "flops": flops(net), "widths": widths(net),
            "params": sum(p.numel() for p in net.parameters())}  # fmt: skip
    print(f"trained ViT: top-1 {base['top1']:.2f}, {base['flops'] / 1e6:.1f} MFLOPs, widths {base['widths']}")
    trained = {k: v.clone() for k, v in net.state_dict().items()}
    rows = [prune(trained, target, args, train, test, base) for target in [None, *args.targets]]
    result = {"model": f"timm VisionTransformer {CONFIG}", "train_steps": args.train_steps,
              "train_seconds": train_seconds, "base": base, "rows": rows,
              "machine": {"cpu": platform.processor() or platform.machine(), "threads": args.threads,
                          "torch": torch.__version__}}  # fmt: skip
    args.output.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.output}")


def prune(trained: dict, target: float, args: argparse.Namespace, train: Dataset, test: TensorDataset,
          base: dict) -> dict:  # fmt: skip
    """The trained network pruned to ``target`` of its FLOPs while fine-tuning, compacted and measured; with
    ``target=None`` fine-tuned as long without pruning (the control: what the extra steps alone give)."""
    net, original = vit(), vit()
    net.load_state_dict(trained)
    original.load_state_dict(trained)
    module = Classifier(net, lr=5e-4, steps=args.prune_steps)
    pruning_steps = args.prune_steps // 4
    callbacks = [] if target is None else [TaylorPruningCallback(
        target_flops_ratio=target, pruning_steps=pruning_steps, prune_every_n_batches=max(1, pruning_steps // 30),
        compact_when_done=True, compact_on_fit_end=True)]  # fmt: skip
    start = time.perf_counter()
    fit(module, args.prune_steps, train, callbacks, seed=1)
    seconds = time.perf_counter() - start
    small = (callbacks[0].compact_model if callbacks else net).eval()
    before, after = latency(original, small)
    pruned = {"top1": top1(small, test), "flops": flops(small), "widths": widths(small),
              "params": sum(p.numel() for p in small.parameters())}  # fmt: skip
    row = {"target_flops_ratio": target, "prune_steps": args.prune_steps,
           "pruning_steps": pruning_steps if callbacks else 0,
           "pruned": pruned, "flops_ratio": pruned["flops"] / base["flops"],
           "latency_batch64_s": {"original": before, "compact": after, "speedup": before / after},
           "seconds": seconds}  # fmt: skip
    print(json.dumps(row), flush=True)
    return row


if __name__ == "__main__":
    main()
