"""A user's script, as written in issue 11: a small plain network in ``self.net``, no ``forward``, no
``example_input_array``, default logger, no ``history_dir``; run by ``tests/test_ddp.py`` under
``strategy="ddp"`` with a timeout (before the fix the two ranks ran a different number of collectives
and hung). Each rank writes ``OUT/user_rank<r>.pt``: masks, pruned count, a hash of the parameters.

    python tests/ddp_user_script.py OUT [--module-name net] [--shuffle] [--vit | --swin | --encoder]

``--vit`` / ``--swin`` / ``--encoder``: the network is a tiny timm ViT / torchvision Swin / ``nn.TransformerEncoder``
over 16 tokens pruned to 0.3x its FLOPs (heads must go), then compacted inside the fit
(``compact_when_done``); each rank also records the heads of its compact attention blocks.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from ddp_worker import digest
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_prune import TaylorPruningCallback


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(32)
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 2)
        x = F.relu(self.bn2(self.conv2(x)))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def tiny_vit() -> nn.Module:
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=4, num_classes=10)


def tiny_swin() -> nn.Module:
    from torchvision.models.swin_transformer import SwinTransformer

    return SwinTransformer(patch_size=[2, 2], embed_dim=16, depths=[2, 2], num_heads=[2, 4], window_size=[4, 4],
                           num_classes=10)  # fmt: skip


class TokenMean(nn.Module):
    def forward(self, x):
        return x.mean(dim=1)


def tiny_encoder() -> nn.Module:
    layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
    encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
    return nn.Sequential(nn.Linear(12, 32), encoder, TokenMean(), nn.Linear(32, 10))


class M(L.LightningModule):
    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def training_step(self, b, i):
        x, y = b
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--module-name", default=None)
    parser.add_argument("--shuffle", action="store_true")  # Lightning's default DistributedSampler then shuffles
    parser.add_argument("--vit", action="store_true")
    parser.add_argument("--swin", action="store_true")
    parser.add_argument("--encoder", action="store_true")
    args = parser.parse_args()
    torch.manual_seed(0)
    inputs = torch.randn(512, 16, 12) if args.encoder else torch.randn(512, 3, 16, 16)
    data = TensorDataset(inputs, torch.randint(0, 10, (512,)))
    dl = DataLoader(data, batch_size=32, shuffle=args.shuffle)
    transformer = args.vit or args.swin or args.encoder
    if transformer:
        cb = TaylorPruningCallback(target_flops_ratio=0.3, prune_every_n_batches=2, pruning_steps=8,
                                   compact_when_done=True)  # fmt: skip
    else:
        cb = TaylorPruningCallback(
            criterion="taylor_fo_bn", prune_every_n_batches=2, neurons_per_step=3, keep_ratio=0.6,
            module_name=args.module_name,
        )  # fmt: skip
    model = M(tiny_vit() if args.vit else tiny_swin() if args.swin else tiny_encoder() if args.encoder else Net())
    trainer = L.Trainer(
        accelerator="cpu", devices=2, strategy="ddp", max_epochs=2, callbacks=[cb],
        default_root_dir=str(args.out), enable_progress_bar=False,
    )  # fmt: skip
    trainer.fit(model, dl)
    result = {
        "masks": cb.masks,
        "num_pruned": cb.num_pruned,
        "history_steps": [r.step for r in cb.history],
        "log_dir": trainer.log_dir,
        "hash_params": digest(dict(model.named_parameters())),  # (running stats are per rank without sync BN)
    }
    if transformer:
        result["heads"] = [m.num_heads for n, m in model.net.named_modules() if n.endswith(("attn", "self_attn"))]
        result["flops_kept"] = cb.history[-1].flops / cb.initial_flops
    torch.save(result, args.out / f"user_rank{trainer.global_rank}.pt")


if __name__ == "__main__":
    main()
