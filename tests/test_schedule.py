"""``pruning_steps``: pruning spread over a window of the fit along a schedule, then fine-tuning."""

from __future__ import annotations

import pytest
import torch
from helpers import Classifier, SmallResNet, synthetic_loader, trainer
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_prune import PruningConfigurationError, TaylorPruningCallback
from lightning_prune.callbacks.taylor_pruning import schedule_share
from lightning_prune.pruner import fewest_reaching

X16 = torch.randn(2, 3, 16, 16)


def _fit(cb, width: int = 8, ckpt_path=None, checkpoint=None, **kwargs):
    torch.manual_seed(0)
    module = Classifier(SmallResNet(width=width), example=X16)
    callbacks = [cb] + ([checkpoint] if checkpoint else [])
    trainer(callbacks=callbacks, enable_checkpointing=checkpoint is not None, **kwargs).fit(
        module, synthetic_loader(), ckpt_path=ckpt_path
    )
    return module


def test_schedule_shares():
    assert [schedule_share("cubic", i, 4) for i in range(1, 6)] == [0.578125, 0.875, 0.984375, 1.0, 1.0]
    assert [schedule_share("linear", i, 4) for i in range(1, 6)] == [0.25, 0.5, 0.75, 1.0, 1.0]


@pytest.mark.parametrize("budget", [100.0, 73.0, 50.5, 12.0, 3.0, -1.0])
def test_fewest_reaching_is_the_smallest_count_under_the_budget(budget):
    costs = [100.0, 90.0, 90.0, 74.0, 60.0, 50.0, 12.0, 11.0, 3.0]  # cost after k removals, k = 0..8
    expected = next((k for k in range(1, 9) if costs[k] <= budget), 8)
    assert fewest_reaching(costs.__getitem__, 8, budget) == expected


def test_pruning_steps_spread_the_target_over_the_window_then_fine_tune():
    """40 optimizer steps, pruning in the first half (0.5), every 4: five pruning steps removing
    floor(20 * (1 - (1 - i/5)^3)) neurons in all after step i: large steps first, the target at step 20."""
    cb = TaylorPruningCallback(prune_every_n_batches=4, num_to_prune=20, pruning_steps=0.5)
    _fit(cb, max_steps=40)
    assert [r.step for r in cb.history] == [4, 8, 12, 16, 20]
    assert [r.neurons_pruned for r in cb.history] == [9, 15, 18, 19, 20]
    assert cb.done and cb.stop_reason == "target reached" and cb.num_pruned == 20


def test_linear_schedule_meets_each_flops_goal_and_stops_on_the_target():
    """FLOPs target alone: pruning step i of 5 brings the FLOPs to 1 - (i/5)(1 - 0.6) of the initial ones,
    no lower than one neuron more would: the last step lands on the target."""
    cb = TaylorPruningCallback(prune_every_n_batches=4, target_flops_ratio=0.6, pruning_steps=20, schedule="linear")
    _fit(cb, width=16, max_steps=40)
    ratios = [r.flops / cb.initial_flops for r in cb.history]
    goals = [1 - i / 5 * 0.4 for i in range(1, 6)]
    assert [r.step for r in cb.history] == [4, 8, 12, 16, 20]
    assert all(goal - 0.03 < ratio <= goal for ratio, goal in zip(ratios, goals)), ratios
    assert cb.done and "FLOPs target" in cb.stop_reason


def test_resume_mid_schedule_ends_where_the_uninterrupted_run_does(tmp_path):
    def run(ckpt_path=None, checkpoint=None):
        cb = TaylorPruningCallback(prune_every_n_batches=3, num_to_prune=16, pruning_steps=0.6)
        return cb, _fit(cb, max_epochs=6, ckpt_path=ckpt_path, checkpoint=checkpoint)

    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, every_n_epochs=1, filename="{epoch}")
    full, full_module = run(checkpoint=checkpoint)
    middle = torch.load(tmp_path / "epoch=1.ckpt", weights_only=False)
    state = next(v for k, v in middle["callbacks"].items() if "TaylorPruningCallback" in k)
    assert state["pruning_step"] == 2 and 0 < state["num_pruned"] < 16  # mid-schedule
    resumed, resumed_module = run(ckpt_path=tmp_path / "epoch=1.ckpt")
    assert [r.step for r in resumed.history] == [r.step for r in full.history]
    assert [r.removed for r in resumed.history] == [r.removed for r in full.history]
    for (n, a), (_, b) in zip(full_module.state_dict().items(), resumed_module.state_dict().items()):
        assert torch.allclose(a, b, atol=1e-6), n


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"pruning_steps": 0}, "pruning_steps must be"),
        ({"pruning_steps": 1.5}, "pruning_steps must be"),
        ({"pruning_steps": 10, "schedule": "exponential"}, "schedule must be one of"),
    ],
)
def test_invalid_schedules(kwargs, match):
    with pytest.raises(PruningConfigurationError, match=match):
        TaylorPruningCallback(num_to_prune=4, **kwargs)


def test_a_fraction_of_an_endless_fit_fails_before_training():
    cb = TaylorPruningCallback(num_to_prune=4, pruning_steps=0.5)
    with pytest.raises(PruningConfigurationError, match="needs a finite training length"):
        _fit(cb, max_epochs=-1)
    assert cb.num_pruned == 0
