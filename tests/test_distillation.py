"""Distillation from the unpruned network (``distill_weight``): training follows ``loss + w * KD`` exactly."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from helpers import synthetic_loader, trainer
from lightning.pytorch.callbacks import ModelCheckpoint

import lightning_prune.distillation as kd
from lightning_prune import TaylorPruningCallback
from test_compact_in_fit import UserModule


@pytest.mark.parametrize("shape", [(6, 10), (2, 5, 3, 3)])
def test_the_added_gradient_is_the_gradient_of_the_loss(shape):
    g = torch.Generator().manual_seed(0)
    student = torch.randn(*shape, dtype=torch.float64, generator=g).requires_grad_(True)
    teacher = torch.randn(*shape, dtype=torch.float64, generator=g)
    kd.distillation_loss(student, teacher, 3.0).backward()
    assert torch.allclose(kd.distillation_gradient(student.detach(), teacher, 3.0), student.grad, rtol=1e-12)
    reference = F.kl_div(F.log_softmax(student / 3, 1), F.log_softmax(teacher / 3, 1), log_target=True, reduction="sum")
    assert float(kd.distillation_loss(student, teacher, 3.0)) == pytest.approx(9 * float(reference) / (student.numel() // shape[1]))


class SGDOne(UserModule):
    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1.0)  # the step is minus the gradient


@pytest.mark.parametrize("accumulate", [1, 2])
def test_a_step_follows_the_loss_plus_distillation(accumulate):
    """The update of one optimizer step equals minus the autograd gradient of ``CE + w * KD`` (teacher: the
    network before the step, in eval mode), averaged over the accumulated micro-batches."""
    module = SGDOne()
    start = copy.deepcopy(module.net)
    teacher = copy.deepcopy(module.net).eval()
    pruning = TaylorPruningCallback(prune_every_n_batches=50, num_to_prune=1, distill_weight=0.7, distill_temperature=2.0)
    loader = synthetic_loader(n=32, batch_size=16, dtype=torch.float64)
    trainer(callbacks=[pruning], max_steps=1, accumulate_grad_batches=accumulate).fit(module, loader)
    reference = copy.deepcopy(start).train()
    for x, y in list(loader)[:accumulate]:
        loss = F.cross_entropy(reference(x), y)
        with torch.no_grad():
            t = teacher(x)
        ((loss + 0.7 * kd.distillation_loss(reference(x), t, 2.0)) / accumulate).backward()
    for (name, p0), p1, p in zip(start.named_parameters(), module.net.parameters(), reference.parameters()):
        assert torch.allclose(p1 - p0, -p.grad, rtol=1e-9, atol=1e-12), name


def test_no_distillation_changes_the_step():
    """The control: the same step without distillation differs (the teacher's pull is not negligible)."""
    updates = []
    for weight in (0.0, 0.7):
        module = SGDOne()
        start = [p.detach().clone() for p in module.net.parameters()]
        pruning = TaylorPruningCallback(prune_every_n_batches=50, num_to_prune=1, distill_weight=weight)
        trainer(callbacks=[pruning], max_steps=1).fit(module, synthetic_loader(n=16, dtype=torch.float64))
        updates.append(torch.cat([(p - s).flatten() for p, s in zip(module.net.parameters(), start)]))
    assert (updates[0] - updates[1]).norm() > 1e-3 * updates[0].norm()


def test_a_resumed_run_distils_from_the_network_before_pruning(tmp_path):
    def run(ckpt_path=None, checkpoint=None):
        module = UserModule()
        pruning = TaylorPruningCallback(prune_every_n_batches=2, neurons_per_step=3, num_to_prune=9, distill_weight=0.5)
        callbacks = [pruning] + ([checkpoint] if checkpoint else [])
        trainer(callbacks=callbacks, max_epochs=4, enable_checkpointing=checkpoint is not None).fit(
            module, synthetic_loader(dtype=torch.float64), ckpt_path=ckpt_path
        )
        return module, pruning

    initial = UserModule().net.state_dict()
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, every_n_epochs=1, filename="{epoch}")
    full, full_pruning = run(checkpoint=checkpoint)
    resumed, pruning = run(ckpt_path=tmp_path / "epoch=0.ckpt")  # after 2 of 3 pruning steps
    for name, value in initial.items():
        assert torch.equal(pruning._distiller.teacher.state_dict()[name], value), name
    for (n, a), (_, b) in zip(full.net.state_dict().items(), resumed.net.state_dict().items()):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-12), n
