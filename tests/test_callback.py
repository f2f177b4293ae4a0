"""TaylorPruningCallback on small synthetic problems: importance, schedule, masking, errors, resume."""

from __future__ import annotations

import copy
import csv
import json
import math
import types
import warnings

import lightning.pytorch as pl
import pytest
import torch
from helpers import Classifier, SmallCNN, SmallResNet, gate_gradients, relative_error, synthetic_loader, trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.plugins import MixedPrecision
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from lightning_prune.pruner import CostModel, NeuronSelector, neuron_scores
from lightning_prune import (
    PruningConfigurationError,
    TaylorPruningCallback,
    UnsupportedModelError,
    UnsupportedStrategyError,
    available_criteria,
)

X16 = torch.randn(2, 3, 16, 16)


def _fit(model, cb, loader=None, **trainer_kwargs):
    module = model if isinstance(model, pl.LightningModule) else Classifier(model, example=X16)
    trainer_kwargs.setdefault("callbacks", [cb])
    trainer(**trainer_kwargs).fit(module, loader or synthetic_loader())
    return module


# -- importance equals autograd ------------------------------------------------------------------------------


@pytest.mark.parametrize("gate_gradient", ["auto", "hooks"])
@pytest.mark.parametrize("placement", ["after_bn", "before_bn"])
def test_taylor_fo_bn_equals_autograd_gate_gradient(gate_gradient, placement):
    torch.manual_seed(0)
    model = SmallResNet().double()
    reference = copy.deepcopy(model)
    loader = synthetic_loader(n=48, batch_size=16, dtype=torch.float64)
    cb = TaylorPruningCallback(
        prune_every_n_batches=3, neurons_per_step=1, num_to_prune=1, gate_gradient=gate_gradient,
        gate_placement=placement,
    )  # fmt: skip
    _fit(Classifier(model, lr=0.0, example=X16.double()), cb, loader, max_steps=3)
    names = [n.removeprefix("model.") for n in cb.graph.gates]
    grads = gate_gradients(reference.train(), names, [(x, y, 1.0) for x, y in loader])
    for name in names:
        expected = torch.stack([g[name].square() for g in grads]).mean(0)
        assert relative_error(cb.importance["model." + name], expected) < 1e-10, name


def test_full_gradient_variant_sums_per_sample_squares():
    torch.manual_seed(0)
    model = SmallCNN().double()
    reference = copy.deepcopy(model)
    loader = synthetic_loader(n=32, batch_size=16, dtype=torch.float64)
    cb = TaylorPruningCallback("taylor_fo_bn_fg", prune_every_n_batches=2, neurons_per_step=1, num_to_prune=1)
    _fit(Classifier(model, lr=0.0, example=X16.double()), cb, loader, max_steps=2)
    names = [n.removeprefix("model.") for n in cb.graph.gates]
    grads = gate_gradients(reference.train(), names, [(x, y, 1.0) for x, y in loader], per_sample=True)
    for name in names:
        expected = torch.stack([g[name].square().sum(0) for g in grads]).mean(0)
        assert relative_error(cb.importance["model." + name], expected) < 1e-10, name


@pytest.mark.parametrize("criterion", ["taylor_fo_bn", "taylor_fo_bn_fg"])
def test_gradient_accumulation_squares_the_gradient_of_the_whole_step(criterion):
    torch.manual_seed(0)
    model = SmallResNet().double()
    reference = copy.deepcopy(model)
    loader = synthetic_loader(n=32, batch_size=8, dtype=torch.float64)
    cb = TaylorPruningCallback(criterion, prune_every_n_batches=2, neurons_per_step=1, num_to_prune=1)
    _fit(Classifier(model, lr=0.0, example=X16.double()), cb, loader, max_steps=2, accumulate_grad_batches=2)
    names = [n.removeprefix("model.") for n in cb.graph.gates]
    micro = [(x, y, 0.5) for x, y in loader]  # Lightning divides each micro-batch loss by 2
    per_sample = criterion == "taylor_fo_bn_fg"
    grads = gate_gradients(reference.train(), names, micro, per_sample=per_sample)
    for name in names:
        if per_sample:
            steps = [grads[i][name].square().sum(0) + grads[i + 1][name].square().sum(0) for i in (0, 2)]
        else:
            steps = [(grads[i][name] + grads[i + 1][name]).square() for i in (0, 2)]
        assert relative_error(cb.importance["model." + name], torch.stack(steps).mean(0)) < 1e-10, name


@pytest.mark.parametrize(
    "precision", ["bf16-mixed", "16-mixed"], ids=["bf16-mixed", "16-mixed-with-grad-scaler"]
)
def test_mixed_precision_importance_is_unscaled(precision):
    torch.manual_seed(0)
    model = SmallResNet()
    reference = copy.deepcopy(model)
    loader = synthetic_loader(n=32, batch_size=16)
    cb = TaylorPruningCallback(prune_every_n_batches=2, neurons_per_step=1, num_to_prune=1)
    if precision == "16-mixed":  # Lightning swaps 16-mixed for bf16 on CPU unless given a scaler plugin
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
        kwargs = {"plugins": [MixedPrecision("16-mixed", "cpu", scaler=scaler)]}
        dtype = torch.float16
    else:
        kwargs, dtype = {"precision": "bf16-mixed"}, torch.bfloat16
    _fit(Classifier(model, lr=0.0, example=X16), cb, loader, max_steps=2, **kwargs)
    if precision == "16-mixed":
        assert scaler.get_scale() >= 2.0**12  # the gradients really were scaled
    names = [n.removeprefix("model.") for n in cb.graph.gates]
    grads = gate_gradients(reference.train(), names, [(x, y, 1.0) for x, y in loader], autocast=dtype)
    for name in names:
        expected = torch.stack([g[name].float().square() for g in grads]).mean(0)
        # the same autocast in the reference: rounding changes digits, a missing unscale would be 4096^2 off
        assert relative_error(cb.importance["model." + name], expected) < 0.05, name


# -- schedule and masking ------------------------------------------------------------------------------------


def _dead_channels_are_zero(module, cb):
    graph = cb.graph
    dead = ~graph.alive_from_masks(cb.masks)
    padded = torch.cat([dead, torch.tensor([False])])
    for name, neurons in graph.writers.items():
        rows = padded[neurons]
        layer = graph.modules[name]
        for attr in ("weight", "bias", "running_mean"):
            tensor = getattr(layer, attr, None)
            if isinstance(tensor, torch.Tensor) and rows.any():
                assert tensor[rows].abs().max() == 0, f"{name}.{attr}"
                if getattr(tensor, "grad", None) is not None:
                    assert tensor.grad[rows].abs().max() == 0, f"{name}.{attr}.grad"
    return dead


def test_iterative_global_pruning_reaches_the_target_and_zeroes_removed_neurons():
    torch.manual_seed(0)
    model = SmallResNet()
    cb = TaylorPruningCallback(prune_every_n_batches=2, neurons_per_step=0.1, keep_ratio=0.5, reset_momentum=False)
    module = _fit(model, cb, max_epochs=4)
    prunable = cb.graph.num_prunable
    assert cb.done and cb.stop_reason == "target reached"
    assert cb.num_pruned == prunable - round(0.5 * prunable)
    step = round(0.1 * prunable)
    assert [r.neurons_removed for r in cb.history[:-1]] == [step] * (len(cb.history) - 1)
    assert [r.step for r in cb.history] == [2 * (i + 1) for i in range(len(cb.history))]
    assert all(a.flops > b.flops for a, b in zip(cb.history, cb.history[1:]))
    assert cb.history[-1].params < cb.initial_params
    dead = _dead_channels_are_zero(module, cb)
    assert int(dead.sum()) == cb.num_pruned
    # removed neurons never come back: their optimizer state is zero too
    optimizer = module.trainer.optimizers[0]
    padded = torch.cat([dead, torch.tensor([False])])
    for name, neurons in cb.graph.writers.items():
        for p in cb.graph.modules[name].parameters(recurse=False):
            buf = optimizer.state[p].get("momentum_buffer")
            if buf is not None and padded[neurons].any():
                assert buf[padded[neurons]].abs().max() == 0
    # a tied group is removed from every layer at once
    stream = [n for n in cb.masks if n.endswith(("stem.1", "block1.bn2", "block2.bn2"))]
    assert all(torch.equal(cb.masks[stream[0]], cb.masks[n]) for n in stream)


def test_removed_neurons_have_no_effect_on_the_output():
    torch.manual_seed(0)
    model = SmallResNet()
    cb = TaylorPruningCallback(prune_every_n_batches=1, neurons_per_step=6, keep_ratio=0.4)
    module = _fit(model, cb, max_epochs=3)
    model.eval()
    x = torch.randn(4, 3, 16, 16)
    before = model(x)
    # cut every weight that reads a removed channel: the output cannot change if those channels are zero
    dead = ~cb.graph.alive_from_masks(cb.masks)
    padded = torch.cat([dead, torch.tensor([True])])
    with torch.no_grad():
        for name, neurons in cb.graph.readers.items():
            weight = cb.graph.modules[name].weight
            if weight.shape[1] == neurons.numel():
                weight[:, padded[neurons]] = torch.randn_like(weight[:, padded[neurons]])
    assert torch.equal(model(x), before)
    assert module.trainer.progress_bar_metrics["neurons"] == cb.neurons_remaining


def test_min_channels_is_never_crossed():
    torch.manual_seed(0)
    cb = TaylorPruningCallback(prune_every_n_batches=1, neurons_per_step=10, keep_ratio=0.2, min_channels=3)
    _fit(SmallCNN(), cb, max_epochs=4)
    assert cb.done
    assert all(int(m.sum()) >= 3 for m in cb.masks.values())


def test_momentum_is_reset_when_the_target_is_reached():
    class Probe(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if cb.done and not hasattr(self, "state_size"):
                self.state_size = len(trainer.optimizers[0].state)

    cb = TaylorPruningCallback(prune_every_n_batches=2, neurons_per_step=8, num_to_prune=8)
    probe = Probe()
    module = Classifier(SmallCNN(), example=X16)
    trainer(callbacks=[cb, probe], max_epochs=2).fit(module, synthetic_loader())
    assert probe.state_size == 0


@pytest.mark.parametrize("criterion", ["weight_norm", "bn_scale", "random"])
def test_baseline_criteria(criterion):
    assert criterion in available_criteria()
    torch.manual_seed(0)
    cb = TaylorPruningCallback(criterion, prune_every_n_batches=2, neurons_per_step=4, num_to_prune=8)
    _fit(SmallResNet(), cb, max_epochs=1)
    assert cb.num_pruned == 8
    if criterion == "bn_scale":
        gate, kept = cb.graph.gates["model.block1.bn1"], cb.masks["model.block1.bn1"]
        # scored at the last step (the last pruning step), before it zeroed the channels it removed
        assert torch.allclose(cb.importance["model.block1.bn1"][kept], gate.module.weight.detach().abs()[kept])


def test_bn_scale_rejects_layers_without_batchnorm():
    cb = TaylorPruningCallback("bn_scale", num_to_prune=2)
    with pytest.raises(PruningConfigurationError, match="fc1"):
        _fit(SmallCNN(), cb, max_steps=1)


def test_max_loss_stops_pruning():
    cb = TaylorPruningCallback(prune_every_n_batches=2, neurons_per_step=2, keep_ratio=0.5, max_loss=1e-3)
    _fit(SmallCNN(), cb, max_epochs=1)
    assert cb.done and "max_loss" in cb.stop_reason and cb.num_pruned == 0


def test_non_finite_importance_is_skipped_with_a_warning():
    class SkipNonFinite(torch.optim.SGD):  # like AMP's scaler: no update when gradients are not finite
        def step(self, closure=None):
            loss = closure() if closure is not None else None
            if all(p.grad is None or torch.isfinite(p.grad).all() for g in self.param_groups for p in g["params"]):
                super().step()
            return loss

    class Poisoned(Classifier):
        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            return loss * float("inf") if batch_idx == 1 else loss

        def configure_optimizers(self):
            return SkipNonFinite(self.parameters(), lr=0.01)

    cb = TaylorPruningCallback(prune_every_n_batches=2, neurons_per_step=2, num_to_prune=4)
    with pytest.warns(UserWarning, match="non-finite"):
        _fit(Poisoned(SmallCNN(), example=X16), cb, max_epochs=1)
    assert cb.num_pruned == 4
    assert all(torch.isfinite(v).all() for v in cb.importance.values())


@pytest.mark.parametrize("bad_batches", [{1}, {0, 1}, {1, 2, 3}])  # one step; the first interval; two intervals
def test_non_finite_losses_are_left_out_of_the_smoothed_loss(bad_batches):
    """An ``inf`` loss (with finite gradients) leaves the smoothed loss as it was: later records hold a finite
    loss and ``max_loss`` keeps pruning going; an interval with no finite loss at all records none."""

    class InfLoss(Classifier):
        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            return loss + float("inf") if batch_idx in bad_batches else loss  # the gradient stays finite

    cb = TaylorPruningCallback(prune_every_n_batches=2, neurons_per_step=2, num_to_prune=4, max_loss=100.0)
    _fit(InfLoss(SmallCNN(), example=X16), cb, max_epochs=1)
    assert cb.num_pruned == 4 and cb.stop_reason == "target reached"
    losses = [r.loss for r in cb.history]
    if bad_batches == {0, 1}:  # nothing finite before the first pruning step
        assert losses[0] is None and math.isfinite(losses[1])
    else:
        assert all(math.isfinite(v) for v in losses)


def test_adam_state_of_removed_neurons_is_zeroed():
    cb = TaylorPruningCallback(prune_every_n_batches=2, neurons_per_step=4, num_to_prune=8, reset_momentum=False)
    module = _fit(Classifier(SmallCNN(), optimizer="adam", lr=1e-3, example=X16), cb, max_epochs=1)
    dead = ~cb.graph.alive_from_masks(cb.masks)
    padded = torch.cat([dead, torch.tensor([False])])
    state = module.trainer.optimizers[0].state
    for name, neurons in cb.graph.writers.items():
        for p in cb.graph.modules[name].parameters(recurse=False):
            for key in ("exp_avg", "exp_avg_sq"):
                if padded[neurons].any():
                    assert state[p][key][padded[neurons]].abs().max() == 0
    _dead_channels_are_zero(module, cb)


# -- finding the network ----------------------------------------------------------------------------------------


def test_network_input_is_captured_without_example_input_array():
    class NoExample(Classifier):
        def training_step(self, batch, batch_idx):  # calls the child module directly
            x, y = batch
            return torch.nn.functional.cross_entropy(self.model(x), y)

    cb = TaylorPruningCallback(prune_every_n_batches=2, neurons_per_step=2, num_to_prune=2)
    _fit(NoExample(SmallCNN()), cb, max_epochs=1)
    assert set(cb.masks) == {"model.bn1", "model.bn2", "model.fc1"} and cb.num_pruned == 2


def test_module_name_and_ignored_modules():
    cb = TaylorPruningCallback(
        prune_every_n_batches=1, neurons_per_step=4, keep_ratio=0.5, module_name="model", ignored_modules=["bn1"]
    )
    _fit(Classifier(SmallCNN()), cb, max_epochs=1)
    assert "model.bn1" not in cb.masks and "model.bn2" in cb.masks


# -- logging, history, checkpoints ---------------------------------------------------------------------------


def test_logs_metrics_and_writes_history(tmp_path):
    cb = TaylorPruningCallback(prune_every_n_batches=2, neurons_per_step=4, num_to_prune=8)
    _fit(SmallCNN(), cb, max_epochs=1, logger=CSVLogger(tmp_path, name="run"), log_every_n_steps=1)
    log_dir = tmp_path / "run" / "version_0"
    metrics = (log_dir / "metrics.csv").read_text()
    assert "pruning/neurons_pruned" in metrics and "pruning/flops" in metrics and "pruning/channels/model.bn2" in metrics
    history = json.loads((log_dir / "pruning_history.json").read_text())
    assert [h["neurons_pruned"] for h in history] == [4, 8]
    assert {"layer", "index"} <= set(history[0]["removed"][0])
    assert (log_dir / "pruning_history.csv").read_text().count("\n") == 3


def test_resume_mid_pruning_ends_with_the_same_masks(tmp_path):
    def run(max_epochs, ckpt_path=None, checkpoint=None):
        torch.manual_seed(0)
        cb = TaylorPruningCallback(prune_every_n_batches=3, neurons_per_step=3, keep_ratio=0.5)
        callbacks = [cb] + ([checkpoint] if checkpoint else [])
        module = Classifier(SmallResNet(), example=X16)
        trainer(callbacks=callbacks, max_epochs=max_epochs, enable_checkpointing=checkpoint is not None).fit(
            module, synthetic_loader(), ckpt_path=ckpt_path
        )
        return cb, module

    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, every_n_epochs=1, filename="{epoch}")
    full, full_module = run(6, checkpoint=checkpoint)
    middle = torch.load(tmp_path / "epoch=1.ckpt", weights_only=False)
    state = next(v for k, v in middle["callbacks"].items() if "TaylorPruningCallback" in k)
    assert 0 < state["num_pruned"] < full.num_pruned and state["steps_in_interval"] == 2  # mid-interval
    resumed, resumed_module = run(6, ckpt_path=tmp_path / "epoch=1.ckpt")
    assert resumed.num_pruned == full.num_pruned
    assert all(torch.equal(full.masks[n], resumed.masks[n]) for n in full.masks)
    assert [r.removed for r in resumed.history] == [r.removed for r in full.history]
    for (n, a), (_, b) in zip(full_module.state_dict().items(), resumed_module.state_dict().items()):
        assert torch.allclose(a.float(), b.float(), atol=1e-6), n


# -- errors before any training step ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"keep_ratio": 0.5, "num_to_prune": 3}, "at most one"),
        ({}, "give a target"),
        ({"keep_ratio": 1.5}, "keep_ratio"),
        ({"keep_ratio": 0.5, "neurons_per_step": 0}, "neurons_per_step"),
        ({"keep_ratio": 0.5, "neurons_per_step": 1.5}, "neurons_per_step"),
        ({"keep_ratio": 0.5, "prune_every_n_batches": 0}, "prune_every_n_batches"),
        ({"keep_ratio": 0.5, "ema": 1.0}, "ema"),
        ({"keep_ratio": 0.5, "min_channels": 0}, "min_channels"),
        ({"keep_ratio": 0.5, "gate_placement": "inside"}, "gate_placement"),
        ({"keep_ratio": 0.5, "criterion": "nope"}, "unknown criterion"),
        ({"keep_ratio": 0.5, "criterion": "random", "criterion_kwargs": {"sed": 1}}, r"'random'.*accepts seed"),
        ({"keep_ratio": 0.5, "criterion_kwargs": {"seed": 1}}, "'taylor_fo_bn'.*accepts no arguments"),
    ],
)
def test_invalid_arguments(kwargs, match):
    with pytest.raises(PruningConfigurationError, match=match):
        TaylorPruningCallback(**kwargs)


def test_impossible_target_fails_before_training():
    model = SmallCNN()
    before = copy.deepcopy(model.state_dict())
    cb = TaylorPruningCallback(num_to_prune=48, min_channels=1)  # 48 prunable, but each layer keeps one
    with pytest.raises(PruningConfigurationError, match="impossible target"):
        _fit(model, cb, max_steps=1)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_model_without_prunable_layer_fails_before_training():
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 16 * 16, 10))
    with pytest.raises(UnsupportedModelError, match="no prunable layer"):
        _fit(model, TaylorPruningCallback(num_to_prune=1), max_steps=1)


@pytest.mark.parametrize("strategy", [FSDPStrategy, DeepSpeedStrategy, ModelParallelStrategy], ids=lambda c: c.__name__)
def test_sharded_strategies_are_rejected(strategy):
    cb = TaylorPruningCallback(num_to_prune=1)
    try:
        instance = strategy()
    except (ImportError, MisconfigurationException):  # DeepSpeed's needs its package: the check is on the type
        instance = strategy.__new__(strategy)
    fake_trainer = types.SimpleNamespace(strategy=instance)
    with pytest.raises(UnsupportedStrategyError, match=strategy.__name__):
        cb.setup(fake_trainer, Classifier(SmallCNN()), "fit")


def test_flops_target_stops_pruning():
    cb = TaylorPruningCallback(prune_every_n_batches=1, neurons_per_step=4, keep_ratio=0.1, target_flops_ratio=0.8)
    _fit(SmallCNN(), cb, max_epochs=2)
    assert cb.done and "FLOPs target" in cb.stop_reason
    assert cb.history[-1].flops <= 0.8 * cb.initial_flops < cb.history[-2].flops


def test_flops_target_alone_is_met_without_overshoot():
    """``target_flops_ratio`` alone is a target; the last step removes only what reaching it takes."""
    torch.manual_seed(0)
    cb = TaylorPruningCallback(prune_every_n_batches=1, neurons_per_step=8, target_flops_ratio=0.6)
    module = _fit(SmallResNet(), cb, max_epochs=3)
    assert cb.done and "FLOPs target" in cb.stop_reason
    budget = 0.6 * cb.initial_flops
    last = cb.history[-1]
    assert last.flops <= budget and last.neurons_removed < 8  # trimmed
    cost = CostModel(module.model, X16, cb.graph, prefix="model.")
    alive = torch.ones(cb.graph.num_neurons, dtype=torch.bool)
    for record in cb.history:
        for entry in record.removed:
            alive[cb.graph.gates[entry["layer"]].neurons[entry["index"]]] = False
    assert cost.flops(alive) == last.flops
    # the last step took the lowest-scoring neurons in order, and stopped at the first that met the target
    last_neurons = {int(cb.graph.gates[e["layer"]].neurons[e["index"]]) for e in last.removed}
    before = alive.clone()
    before[list(last_neurons)] = True
    order = NeuronSelector(cb.graph).select(neuron_scores(cb.graph, cb.importance), before, 8)
    assert set(order[: len(last_neurons)].tolist()) == last_neurons
    one_fewer = before.clone()
    one_fewer[order[: len(last_neurons) - 1]] = False
    assert cost.flops(one_fewer) > budget


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"ignored_modules": ["model.stemm"]}, r"ignored_modules: no module named 'model.stemm'.*mean 'model.stem'"),
        ({"ignored_modules": ["model.stem", "conv9"]}, r"no module named 'conv9'"),
        ({"leaf_modules": ["model.blok1"]}, r"leaf_modules: .*'model.blok1'.*did you mean 'model.block1'"),
        ({"module_name": "model", "ignored_modules": ["extra"]}, r"no module named 'extra' in SmallResNet"),
    ],
)
def test_unknown_module_names_fail_before_training_with_the_closest_names(kwargs, match):
    module = Classifier(SmallResNet(), example=X16)
    module.extra = torch.nn.Linear(2, 2)  # a module of the LightningModule, outside the network "model"
    before = copy.deepcopy(module.state_dict())
    with pytest.raises(PruningConfigurationError, match=match):
        _fit(module, TaylorPruningCallback(num_to_prune=2, **kwargs), max_steps=1)
    assert all(torch.equal(before[k], v) for k, v in module.state_dict().items())


@pytest.mark.parametrize("names", [["block1"], ["model.block1"]])
def test_module_names_relative_to_the_network_or_qualified(names):
    cb = TaylorPruningCallback(prune_every_n_batches=1, neurons_per_step=2, num_to_prune=2,
                               module_name="model", ignored_modules=names, leaf_modules=names)  # fmt: skip
    _fit(Classifier(SmallResNet()), cb, max_steps=2)
    assert not any(name.startswith("model.block1.") for name in cb.masks) and cb.num_pruned == 2


def test_errors_found_at_the_first_call_say_how_to_get_them_earlier():
    class NoForward(Classifier):
        def training_step(self, batch, batch_idx):
            x, y = batch
            return torch.nn.functional.cross_entropy(self.model(x), y)

    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 16 * 16, 10))
    with pytest.raises(UnsupportedModelError, match=r"no prunable layer(.|\n)*example_input_array"):
        _fit(NoForward(model), TaylorPruningCallback(num_to_prune=1), max_steps=1)


def test_resuming_with_another_criterion_warns(tmp_path):
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    cb = TaylorPruningCallback(prune_every_n_batches=1, neurons_per_step=2, num_to_prune=8)
    _fit(SmallCNN(), cb, max_steps=2, callbacks=[cb, checkpoint], enable_checkpointing=True)
    other = TaylorPruningCallback("weight_norm", prune_every_n_batches=1, neurons_per_step=2, num_to_prune=8)
    module = Classifier(SmallCNN(), example=X16)
    with pytest.warns(UserWarning, match=r"pruning state of .*'criterion': 'taylor_fo_bn'.*pruning restarts from scratch"):
        trainer(callbacks=[other], max_steps=3).fit(module, synthetic_loader(), ckpt_path=tmp_path / "last.ckpt")
    same = TaylorPruningCallback(prune_every_n_batches=1, neurons_per_step=2, num_to_prune=8)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*pruning restarts.*")
        trainer(callbacks=[same], max_steps=3).fit(
            Classifier(SmallCNN(), example=X16), synthetic_loader(), ckpt_path=tmp_path / "last.ckpt"
        )
    assert same.num_pruned == 6  # 4 from the checkpoint, 2 more


def test_size_metrics_share_the_loss_row_and_the_progress_bar_shows_whole_neurons(tmp_path):
    class Logged(Classifier):
        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            self.log("train_loss", loss)
            return loss

    seen = []

    class Bar(pl.Callback):  # runs after the pruning callback, like the progress bar
        def on_train_batch_end(self, trainer, *args):
            seen.append((trainer.progress_bar_metrics["neurons"], cb.neurons_remaining))

    cb = TaylorPruningCallback(prune_every_n_batches=2, neurons_per_step=4, num_to_prune=8)
    _fit(Logged(SmallCNN(), example=X16), cb, max_epochs=1, callbacks=[cb, Bar()],
         logger=CSVLogger(tmp_path, name="run"), log_every_n_steps=1)  # fmt: skip
    assert all(type(shown) is int and shown == now for shown, now in seen) and seen[-1][1] == 40
    with open(tmp_path / "run" / "version_0" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    with_loss = [r for r in rows if r["train_loss"]]
    assert len(with_loss) == 4 and all(r["pruning/flops"] and r["pruning/neurons_remaining"] for r in with_loss)
    assert [int(float(r["pruning/neurons_pruned"])) for r in with_loss] == [0, 4, 4, 8]
    assert all(isinstance(r.flops, int) for r in cb.history)


# -- claims of the README, each against a wrong implementation that would pass unnoticed --------------------------


def test_a_real_sharded_trainer_is_rejected_before_any_step():
    """A real ``Trainer(strategy=ModelParallelStrategy())`` (one CPU process on gloo) stops in the callback's
    setup: no step, no analysis, weights untouched. Lightning builds ``FSDPStrategy`` only on a GPU
    accelerator and ``DeepSpeedStrategy`` only with the deepspeed package, so those two are checked on the
    strategy's type alone (``test_sharded_strategies_are_rejected``)."""
    import os

    env = dict(os.environ)
    model = SmallCNN()
    before = copy.deepcopy(model.state_dict())
    try:
        strategy = ModelParallelStrategy()
    except ImportError as err:  # it needs torch >= 2.4
        pytest.skip(str(err))
    cb = TaylorPruningCallback(num_to_prune=1)
    sharded = trainer(strategy=strategy, callbacks=[cb], max_steps=1)
    try:
        with pytest.raises(UnsupportedStrategyError, match="ModelParallelStrategy"):
            sharded.fit(Classifier(model, example=X16), synthetic_loader())
    finally:  # Lightning leaves its process group and environment variables behind
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        for key in set(os.environ) - set(env):
            del os.environ[key]
        os.environ.update(env)
    assert sharded.global_step == 0 and cb.graph is None and cb.num_pruned == 0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize(
    "ignored",
    [(), ("model.block1.bn1", "model.block2.bn1", "model.block3.bn1")],
    ids=["every-layer", "tied-only"],  # tied-only: the neurons of 3 (stem) and 2 (block3) tied channels compete
)
def test_every_step_removes_the_globally_least_important_alive_neurons(ignored):
    """At each pruning step the neurons removed are the lowest-scoring alive ones of the whole network, under
    the importance the callback held at that step; a tied neuron scores the sum of its channels in every
    layer (not their mean or maximum), and goes from all of them at once."""
    used = []

    class Spy(pl.Callback):  # after the pruning callback: its importance is the one the step used
        def on_train_batch_end(self, trainer, *args):
            if len(cb.history) > len(used):
                used.append({n: v.clone() for n, v in cb.importance.items()})

    torch.manual_seed(0)
    cb = TaylorPruningCallback(prune_every_n_batches=2, neurons_per_step=3, num_to_prune=12, ema=0.5,
                               ignored_modules=ignored)  # fmt: skip
    _fit(SmallResNet(), cb, max_epochs=2, callbacks=[cb, Spy()])
    assert len(used) == len(cb.history) == 4
    assert all(int(m.sum()) > 1 for m in cb.masks.values())  # the per-layer floor never held a neuron back
    graph = cb.graph
    channels: dict[int, list[tuple[str, int]]] = {}  # neuron -> its (layer, channel) in every gated layer
    for name, gate in graph.gates.items():
        for c, n in enumerate(gate.neurons.tolist()):
            channels.setdefault(n, []).append((name, c))
    alive = {n for n in channels if graph.prunable[n]}
    layers_hit, ties_removed = set(), set()
    for importance, record in zip(used, cb.history):
        score = {n: sum(float(importance[name][c]) for name, c in channels[n]) for n in alive}
        removed = {int(graph.gates[e["layer"]].neurons[e["index"]]) for e in record.removed}
        assert len(removed) == 3 and removed <= alive
        # every channel of a removed neuron is in the record
        assert sorted((e["layer"], e["index"]) for e in record.removed) == sorted(
            ch for n in removed for ch in channels[n]
        )
        assert max(score[n] for n in removed) < min(score[n] for n in alive - removed)
        alive -= removed
        layers_hit |= {e["layer"] for e in record.removed}
        ties_removed |= {len(channels[n]) for n in removed}
    assert len(layers_hit) > 1
    assert alive == {n for n in channels if graph.prunable[n] and graph.alive_from_masks(cb.masks)[n]}
    if ignored:
        assert ties_removed == {2, 3}


def test_hooks_give_the_loss_gate_gradient_when_the_loss_penalises_the_weights():
    """A penalty on the weights in the loss: ``gate_gradient="hooks"`` gives the loss' own gate gradient
    (the penalty does not depend on the gates), while ``"auto"`` reads ``sum p * dL/dp`` from parameter
    gradients that hold the penalty's too."""

    class Penalised(Classifier):
        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            return loss + 0.05 * sum(p.square().sum() for p in self.model.parameters())

    errors = {}
    for mode in ("hooks", "auto"):
        torch.manual_seed(0)
        model = SmallResNet().double()
        reference = copy.deepcopy(model)
        loader = synthetic_loader(n=32, batch_size=16, dtype=torch.float64)
        cb = TaylorPruningCallback(prune_every_n_batches=2, neurons_per_step=1, num_to_prune=1, gate_gradient=mode)
        _fit(Penalised(model, lr=0.0, example=X16.double()), cb, loader, max_steps=2)
        names = [n.removeprefix("model.") for n in cb.graph.gates]
        grads = gate_gradients(reference.train(), names, [(x, y, 1.0) for x, y in loader])  # the loss alone
        errors[mode] = {
            name: relative_error(cb.importance["model." + name], torch.stack([g[name].square() for g in grads]).mean(0))
            for name in names
        }
    assert max(errors["hooks"].values()) < 1e-10, errors["hooks"]
    assert min(errors["auto"].values()) > 0.1, errors["auto"]  # why "hooks" is needed here


def test_random_criterion_resumes_its_draws_from_the_checkpoint(tmp_path):
    """The ``random`` criterion's generator is in the checkpoint: a run resumed after two of its four pruning
    steps draws what the uninterrupted run drew, and removes the same neurons."""

    def run(max_epochs, ckpt_path=None, checkpoint=None):
        cb = TaylorPruningCallback("random", prune_every_n_batches=2, neurons_per_step=2, num_to_prune=8,
                                   criterion_kwargs={"seed": 3})  # fmt: skip
        callbacks = [cb] + ([checkpoint] if checkpoint else [])
        trainer(callbacks=callbacks, max_epochs=max_epochs, enable_checkpointing=checkpoint is not None).fit(
            Classifier(SmallCNN(), example=X16), synthetic_loader(), ckpt_path=ckpt_path
        )
        return cb

    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, every_n_epochs=1, filename="{epoch}")
    full = run(2, checkpoint=checkpoint)
    state = next(v for k, v in torch.load(tmp_path / "epoch=0.ckpt", weights_only=False)["callbacks"].items()
                 if "TaylorPruningCallback" in k)  # fmt: skip
    assert state["num_pruned"] == 4 and len(full.history) == 4
    resumed = run(2, ckpt_path=tmp_path / "epoch=0.ckpt")
    assert [r.removed for r in resumed.history] == [r.removed for r in full.history]
    assert torch.equal(resumed.criterion.generator.get_state(), full.criterion.generator.get_state())


def test_the_sanity_check_batch_is_the_first_input_the_callback_sees():
    """No example input and a validation sanity check: the network is first called by validation (eval
    mode, no gradients); the callback analyses it there, on the validation batch's input, and prunes."""

    class Validated(Classifier):
        def training_step(self, batch, batch_idx):
            x, y = batch
            return torch.nn.functional.cross_entropy(self.model(x), y)

        def validation_step(self, batch, batch_idx):
            x, y = batch
            self.log("val_loss", torch.nn.functional.cross_entropy(self.model(x), y))

    first_call = []

    class FirstCall(pl.Callback):
        def on_sanity_check_end(self, trainer, pl_module):
            first_call.append(cb.graph is not None)

    cb = TaylorPruningCallback(prune_every_n_batches=2, neurons_per_step=2, num_to_prune=4)
    module = Validated(SmallCNN())  # no example_input_array
    assert module.example_input_array is None
    validation = synthetic_loader(n=5, batch_size=5, seed=1)  # 5 images: unlike any training batch
    trainer(callbacks=[cb, FirstCall()], max_epochs=1, num_sanity_val_steps=1, limit_val_batches=1).fit(
        module, synthetic_loader(), validation
    )
    assert first_call == [True]  # analysed during the sanity check
    assert cb.masks.trace["inputs"] == [{"name": "x", "shape": [5, 3, 16, 16], "dtype": "float32"}]
    assert set(cb.masks) == {"model.bn1", "model.bn2", "model.fc1"}
    assert cb.done and cb.num_pruned == 4 and [r.neurons_pruned for r in cb.history] == [2, 4]
    _dead_channels_are_zero(module, cb)
