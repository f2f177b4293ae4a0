"""Importance criteria outside and inside the callback: definitions against autograd, Hessians, label-free use."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from helpers import Classifier, SmallCNN, SmallResNet, gate_gradients, relative_error, synthetic_loader, trainer
from torch import nn

from lightning_prune import PruningConfigurationError, TaylorPruningCallback, available_criteria
from lightning_prune.compaction import alive_from_masks
from lightning_prune.importance import estimate_importance, get_criterion, prune_once
from lightning_prune.importance.estimate import graph_for
from lightning_prune.importance.hessian import hessian_diagonal
from lightning_prune.importance.statistics import writer_parameters
from lightning_prune.study.common import TinyNet

NEW = ["taylor_fo_weight", "taylor_so", "obd", "taylor_output", "activation_mean", "apoz", "taylor_fo_abs", "taylor_fo_sq"]
X16 = torch.randn(2, 3, 16, 16)


def _data(n=32, size=16, seed=0):
    return list(synthetic_loader(n, 16, size=size, seed=seed))


def test_every_criterion_is_registered():
    assert set(NEW) <= set(available_criteria())


@pytest.mark.parametrize("net", [SmallCNN, SmallResNet])
def test_estimate_importance_scores_every_prunable_neuron(net):
    torch.manual_seed(0)
    model = net().eval()
    names = [c for c in available_criteria() if c != "bn_scale" or net is SmallResNet]
    results = estimate_importance(model, _data(), criterion=names, num_batches=2, hessian_samples=2)
    assert set(results) == set(names)
    for name, scores in results.items():
        prunable = scores.graph.prunable
        assert torch.isfinite(scores.neurons[prunable]).all(), name
        assert torch.isnan(scores.neurons[~prunable]).all(), name


def test_taylor_fo_bn_equals_the_squared_autograd_gate_gradient():
    torch.manual_seed(0)
    model = SmallCNN().eval()
    data = _data()
    scores = estimate_importance(model, data, criterion="taylor_fo_bn")
    names = list(scores.gates)
    ref = gate_gradients(model, names, [(x, y, 1.0) for x, y in data])
    for name in names:
        expected = sum(r[name].square() for r in ref) / len(ref)
        assert relative_error(scores.gates[name], expected) < 1e-4


def test_taylor_fo_weight_matches_its_definition():
    torch.manual_seed(0)
    model = SmallCNN().eval()
    x, y = _data(16)[0]
    graph = graph_for(model, (x, y))
    squares = estimate_importance(model, [(x, y)], criterion="taylor_fo_weight", graph=graph)
    group = estimate_importance(model, [(x, y)], criterion=get_criterion("taylor_fo_weight", form="group"), graph=graph)
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    neuron = 5  # a channel of conv1/bn1
    sq, gr = 0.0, 0.0
    for layer, params in writer_parameters(graph).items():
        rows = torch.nonzero(graph.writers[layer] == neuron).flatten()
        for p in params.values():
            prod = (p.grad * p.detach())[rows]
            sq += float(prod.square().sum())
            gr += float(prod.sum())
    assert squares.neurons[neuron] == pytest.approx(sq, rel=1e-4)
    assert group.neurons[neuron] == pytest.approx(gr**2, rel=1e-4)


def _tiny_problem(width=3):
    torch.manual_seed(0)
    model = TinyNet(width=width).eval()
    x = torch.randn(8, 3, 4, 4)
    y = torch.randint(0, 4, (8,))
    return model, x, y


def test_exact_hessian_diagonal_matches_the_full_hessian():
    model, x, y = _tiny_problem()
    w = model.fc.weight
    loss = F.cross_entropy(model(x), y)
    (diag,) = hessian_diagonal(loss, [w], method="exact")

    def f(weight):
        return F.cross_entropy(torch.func.functional_call(model, {"fc.weight": weight}, (x,)), y)

    full = torch.autograd.functional.hessian(f, w.detach()).reshape(w.numel(), w.numel())
    assert torch.allclose(diag.reshape(-1), full.diagonal(), atol=1e-6)


def test_hutchinson_estimate_approaches_the_exact_diagonal():
    model, x, y = _tiny_problem()
    names = ["bn2.weight", "fc.weight"]
    params = [model.get_parameter(n) for n in names]
    sizes = [p.numel() for p in params]

    def f(flat):
        values = {n: v.view_as(p) for n, p, v in zip(names, params, flat.split(sizes))}
        return F.cross_entropy(torch.func.functional_call(model, values, (x,)), y)

    full = torch.autograd.functional.hessian(f, torch.cat([p.detach().flatten() for p in params]))
    exact = torch.cat([t.flatten() for t in hessian_diagonal(F.cross_entropy(model(x), y), params, method="exact")])
    assert torch.allclose(exact, full.diagonal(), atol=1e-6)
    samples = 300
    est = hessian_diagonal(F.cross_entropy(model(x), y), params, method="hutchinson", samples=samples,
                           generator=torch.Generator().manual_seed(0))  # fmt: skip
    est = torch.cat([t.flatten() for t in est])
    # v_i (Hv)_i = H_ii + sum_{j != i} H_ij v_i v_j: unbiased, with variance sum_{j != i} H_ij^2 per sample
    std = ((full.square().sum(1) - full.diagonal().square()) / samples).sqrt()
    assert ((est - exact).abs() <= 5 * std + 1e-7).all()
    # auto: exact for small parameter sets
    auto = hessian_diagonal(F.cross_entropy(model(x), y), params, method="auto")
    assert torch.allclose(torch.cat([t.flatten() for t in auto]), exact)


def test_taylor_so_is_the_second_order_change_of_gates():
    model, x, y = _tiny_problem()
    scores = estimate_importance(model, [(x, y)], criterion="taylor_so", hessian="exact")
    gate = scores.graph.gates["bn2"]

    def loss_of(z):
        handle = gate.module.register_forward_hook(lambda m, a, out: out * z.view(1, -1, 1, 1))
        try:
            return F.cross_entropy(model(x), y)
        finally:
            handle.remove()

    ones = torch.ones(gate.channels)
    g = torch.autograd.functional.jacobian(loss_of, ones)
    h = torch.autograd.functional.hessian(loss_of, ones).diagonal()
    assert torch.allclose(scores.gates["bn2"], (g - h / 2).square(), rtol=1e-4, atol=1e-10)


def test_obd_sums_half_h_w_squared_and_has_a_squared_form():
    model, x, y = _tiny_problem(width=2)
    graph = graph_for(model, x)
    both = estimate_importance(model, [(x, y)], criterion=["obd", get_criterion("obd", form="squared")], graph=graph,
                               hessian="exact")  # fmt: skip
    signed, squared = both.values()
    prunable = graph.prunable
    assert torch.allclose(squared.neurons[prunable], signed.neurons[prunable].square(), rtol=1e-5)
    # by hand for one neuron of conv2/bn2: the full Hessian of its parameters
    neuron = int(graph.gates["bn2"].neurons[1])
    total = 0.0
    for layer, params in writer_parameters(graph).items():
        rows = torch.nonzero(graph.writers[layer] == neuron).flatten()
        for attr, p in params.items():
            key = f"{layer}.{attr}"

            def f(value, key=key):
                return F.cross_entropy(torch.func.functional_call(model, {key: value}, (x,)), y)

            hd = torch.func.hessian(f)(p.detach()).reshape(p.numel(), p.numel()).diagonal().view_as(p)
            total += float((0.5 * hd * p.detach().square())[rows].sum())
    assert signed.neurons[neuron] == pytest.approx(total, rel=1e-4, abs=1e-9)


def test_activation_criteria_need_no_labels_and_match_their_definitions():
    torch.manual_seed(0)
    model = SmallCNN().eval()
    x = torch.randn(16, 3, 16, 16)
    results = estimate_importance(model, [x], criterion=["activation_mean", "apoz"])
    out = {}
    handle = model.bn2.register_forward_hook(lambda m, a, o: out.setdefault("bn2", o.detach()))
    with torch.no_grad():
        model(x)
    handle.remove()
    act = out["bn2"].clamp_min(0)
    assert torch.allclose(results["activation_mean"].gates["bn2"], act.mean(dim=(0, 2, 3)), atol=1e-6)
    assert torch.allclose(results["apoz"].gates["bn2"], (act > 0).float().mean(dim=(0, 2, 3)), atol=1e-6)
    with pytest.raises(PruningConfigurationError, match="targets"):
        estimate_importance(model, [x], criterion="taylor_fo_bn")


def test_elementwise_taylor_and_taylor_output_definitions():
    torch.manual_seed(0)
    model = SmallCNN().eval()
    x, y = _data(16)[0]
    results = estimate_importance(model, [(x, y)], criterion=["taylor_fo_abs", "taylor_fo_sq", "taylor_output"])
    store = {}

    def hook(m, a, o):
        o.retain_grad()
        store["x"] = o
    handle = model.bn2.register_forward_hook(hook)
    F.cross_entropy(model(x), y).backward()
    handle.remove()
    prod = store["x"].detach() * store["x"].grad
    assert torch.allclose(results["taylor_fo_abs"].gates["bn2"], prod.abs().mean(dim=(0, 2, 3)), rtol=1e-4)
    assert torch.allclose(results["taylor_fo_sq"].gates["bn2"], prod.square().mean(dim=(0, 2, 3)), rtol=1e-4)
    te = prod.mean(dim=(2, 3)).abs().mean(0)
    assert torch.allclose(results["taylor_output"].gates["bn2"], te / te.norm(), rtol=1e-4)
    assert results["taylor_output"].gates["bn2"].norm() == pytest.approx(1.0, rel=1e-5)


def test_random_gradients_need_no_labels_are_seeded_and_normalisable():
    torch.manual_seed(0)
    model = SmallCNN().eval()
    x = torch.randn(16, 3, 16, 16)
    rand = get_criterion("taylor_fo_sq", gradient="random")
    a = estimate_importance(model, [x], criterion=rand, seed=1)
    b = estimate_importance(model, [x], criterion=get_criterion("taylor_fo_sq", gradient="random"), seed=1)
    c = estimate_importance(model, [x], criterion=get_criterion("taylor_fo_sq", gradient="random"), seed=2)
    norm = estimate_importance(model, [x], criterion=get_criterion("taylor_fo_sq", gradient="random",
                                                                     normalize_gradient=True), seed=1)  # fmt: skip
    p = a.graph.prunable
    assert torch.equal(a.neurons[p], b.neurons[p])
    assert not torch.equal(a.neurons[p], c.neurons[p])
    assert not torch.allclose(a.neurons[p], norm.neurons[p])
    # unit-normalised output gradients, any criterion via estimate_importance: E = mean_n <f(x_n), v_n> with
    # v_n of unit l2 norm per example, the direction of the example's own loss gradient or a standard normal
    # draw (the generator seeded with `seed`), so the gate gradient is (1/N) sum_n <v_n, df(x_n)/dz>
    y = torch.randint(0, 10, (16,))
    plain = estimate_importance(model, [(x, y)], criterion="taylor_fo_bn")
    normed = estimate_importance(model, [(x, y)], criterion="taylor_fo_bn", normalize_gradient=True)
    random_normed = estimate_importance(model, [x], criterion="taylor_fo_bn", gradient="random",
                                        normalize_gradient=True, seed=1)  # fmt: skip
    with torch.no_grad():
        out = model(x)
    loss_gradient = torch.softmax(out, 1) - F.one_hot(y, 10)  # d cross-entropy_n / d f(x_n)
    draw = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))

    def unit(v):
        return v / v.norm(dim=1, keepdim=True)

    n = len(x)
    for scores, v in ((plain, loss_gradient / n), (normed, unit(loss_gradient) / n), (random_normed, unit(draw) / n)):
        expected = _gate_gradients_of_linear_objective(model, list(scores.gates), x, v)
        for name, g in expected.items():
            assert relative_error(scores.gates[name], g.square()) < 1e-4, name


def _gate_gradients_of_linear_objective(model, names, x, v):
    """dE/dz of batch-shared gates z = 1 after the named modules, for E = sum_n <f(x_n), v_n>."""
    modules = dict(model.named_modules())
    gates, handles = {}, []
    for name in names:
        def hook(m, a, out, name=name):
            gates[name] = torch.ones(1, out.shape[1], *[1] * (out.ndim - 2), requires_grad=True)
            return out * gates[name]

        handles.append(modules[name].register_forward_hook(hook))
    try:
        objective = (model(x) * v).sum()
    finally:
        for h in handles:
            h.remove()
    return dict(zip(names, (g.flatten() for g in torch.autograd.grad(objective, [gates[n] for n in names]))))


def test_prune_once_zeroes_the_lowest_scoring_neurons():
    torch.manual_seed(0)
    model = SmallResNet().eval()
    data = _data()
    scores = estimate_importance(model, data, criterion="taylor_fo_bn")
    alive = alive_from_masks(scores.graph, prune_once(model, scores, num=5))
    removed = torch.nonzero(~alive).flatten()
    assert removed.numel() == 5
    finite = torch.nan_to_num(scores.neurons, nan=float("inf"))
    assert finite[removed].max() <= finite[alive & scores.graph.prunable].min()
    for name, gate in scores.graph.gates.items():
        dead = ~alive[gate.neurons]
        if gate.kind == "batchnorm" and dead.any():
            assert (gate.module.weight[dead] == 0).all() and (gate.module.bias[dead] == 0).all()


@pytest.mark.parametrize("criterion", NEW + ["taylor_fo_weight:group", "obd:squared"])
def test_new_criteria_prune_inside_the_callback(criterion):
    torch.manual_seed(0)
    name, _, form = criterion.partition(":")
    cb = TaylorPruningCallback(name, prune_every_n_batches=2, neurons_per_step=3, num_to_prune=6,
                               criterion_kwargs={"form": form} if form else None)  # fmt: skip
    module = Classifier(SmallCNN(), example=X16)
    trainer(callbacks=[cb], max_epochs=1).fit(module, synthetic_loader())
    assert cb.num_pruned == 6
    assert all(torch.isfinite(v).all() for v in cb.importance.values())
    assert any(float(v.abs().sum()) > 0 for v in cb.importance.values())


def test_random_gradients_are_refused_inside_the_training_loop():
    cb = TaylorPruningCallback("taylor_fo_sq", prune_every_n_batches=2, neurons_per_step=3, num_to_prune=6,
                               criterion_kwargs={"gradient": "random"})  # fmt: skip
    with pytest.raises(PruningConfigurationError, match="estimate_importance"):
        trainer(callbacks=[cb], max_epochs=1).fit(Classifier(SmallCNN(), example=X16), synthetic_loader())


def test_obd_weight_pruning_once_and_in_the_training_loop():
    from lightning_prune.importance.obd_weights import OBDWeightPruningCallback, obd_weight_masks

    model, x, y = _tiny_problem(width=2)
    masks = obd_weight_masks(model, [(x, y)], fraction=0.25, hessian="exact")
    total = sum(m.numel() for m in masks.values())
    removed = total - sum(int(m.sum()) for m in masks.values())
    assert removed == round(0.25 * total)
    params = dict(model.named_parameters())
    for name, mask in masks.items():
        assert (params[name][~mask] == 0).all()

    torch.manual_seed(0)
    cb = OBDWeightPruningCallback(prune_every_n_batches=2, fraction_per_step=0.1, target_sparsity=0.3)
    module = Classifier(SmallCNN(), example=X16)
    trainer(callbacks=[cb], max_epochs=2).fit(module, synthetic_loader())
    assert cb.sparsity == pytest.approx(0.3, abs=0.01)
    for name, p in module.named_parameters():
        if name in cb.masks:
            assert (p[~cb.masks[name]] == 0).all()  # zeroed and frozen through training


def test_standalone_path_with_the_public_api_only():
    """estimate_importance -> prune_once -> compact, one object handed on at each step, names from the
    package's top level: the compact model computes the masked one, and masks feed a further prune_once."""
    import lightning_prune as lp

    torch.manual_seed(0)
    model = SmallResNet().eval()
    data = _data()
    scores = lp.estimate_importance(model, data, criterion="taylor_fo_bn")
    masks = lp.prune_once(model, scores, fraction=0.25)
    assert isinstance(masks, lp.PruningMasks) and set(masks) == set(scores.graph.gates)
    removed = sum(int((~m).sum()) for m in masks.values())
    small = lp.compact(model, masks)  # no example input: the masks know how the network was traced
    x = data[0][0]
    with torch.no_grad():
        assert torch.allclose(small(x), model(x), atol=1e-5)
    again = lp.prune_once(model, lp.estimate_importance(model, data), num=3, alive=masks)
    assert sum(int((~m).sum()) for m in again.values()) > removed
    assert all(torch.equal(again[n] & m, again[n]) for n, m in masks.items())  # removed stays removed


# -- the later criteria inside the callback: one interval against autograd ------------------------------------

GATED = ("bn1", "bn2", "fc1")  # SmallCNN's gated layers


def _callback_interval(criterion: str, steps: int = 2):
    """The importance the callback computes over its first interval (``steps`` optimizer steps, so no moving
    average yet) on a float64 SmallCNN at learning rate 0 (weights unchanged, BatchNorm in training mode,
    as the reference must be), with a copy of the network as it was and the batches it saw."""
    torch.manual_seed(0)
    name, _, form = criterion.partition(":")
    model = SmallCNN().double()
    reference = copy.deepcopy(model).train()
    loader = synthetic_loader(n=16 * steps, batch_size=16, dtype=torch.float64)
    cb = TaylorPruningCallback(name, prune_every_n_batches=steps, neurons_per_step=1, num_to_prune=1,
                               criterion_kwargs={"form": form} if form else None)  # fmt: skip
    trainer(callbacks=[cb], max_steps=steps).fit(Classifier(model, lr=0.0, example=X16.double()), loader)
    assert [r.step for r in cb.history] == [steps]
    return {n.removeprefix("model."): v for n, v in cb.importance.items()}, reference, list(loader)


def _outputs_and_gradients(model, x, y):
    """Each gated layer's output ``x`` as ``[N, C, M]`` and ``dE/dx`` of the mean cross-entropy, by autograd."""
    store, handles = {}, []
    for name in GATED:
        def hook(m, a, out, name=name):
            out.retain_grad()
            store[name] = out

        handles.append(getattr(model, name).register_forward_hook(hook))
    model.zero_grad()
    try:
        F.cross_entropy(model(x), y).backward()
    finally:
        for h in handles:
            h.remove()
    return {n: (o.detach().reshape(*o.shape[:2], -1), o.grad.reshape(*o.shape[:2], -1)) for n, o in store.items()}


def _hook_reference(criterion, x, dx):
    prod = x * dx
    if criterion == "taylor_output":  # |mean over positions| per example, mean over examples, unit l2 norm
        te = prod.mean(2).abs().mean(0)
        return te / te.norm()
    if criterion == "activation_mean":
        return x.clamp_min(0).mean((0, 2))
    if criterion == "apoz":  # 1 - APoZ: the fraction of non-zeros after the ReLU
        return (x > 0).double().mean((0, 2))
    if criterion == "taylor_fo_abs":
        return prod.abs().mean((0, 2))
    return prod.square().mean((0, 2))  # taylor_fo_sq


@pytest.mark.parametrize("criterion", ["taylor_output", "activation_mean", "apoz", "taylor_fo_abs", "taylor_fo_sq"])
def test_hook_criteria_in_the_callback_equal_their_definition_on_the_training_batches(criterion):
    """The hooks record the training forwards and backwards: each step's scores by definition from the
    autograd outputs and gradients of the same batch, averaged over the interval."""
    importance, reference, batches = _callback_interval(criterion)
    steps = [_outputs_and_gradients(reference, x, y) for x, y in batches]
    for name in GATED:
        expected = torch.stack([_hook_reference(criterion, *step[name]) for step in steps]).mean(0)
        assert relative_error(importance[name], expected) < 1e-5, name


def test_taylor_so_in_the_callback_uses_the_fisher_diagonal_of_the_gates():
    """``(g - h/2)^2`` per step with ``g`` the step's gate gradient and ``h = N sum_n (dE/dz_n)^2`` (the
    empirical Fisher, ``dE/dz_n`` being the per-sample gate gradient of the mean loss), N = 16 samples."""
    importance, reference, batches = _callback_interval("taylor_so")
    grads = gate_gradients(reference, list(GATED), [(x, y, 1.0) for x, y in batches], per_sample=True)
    for name in GATED:
        steps = [(g[name].sum(0) - 0.5 * 16 * g[name].square().sum(0)).square() for g in grads]
        assert relative_error(importance[name], torch.stack(steps).mean(0)) < 1e-8, name


# a neuron's parameters: the rows of the layers writing its channels
_WRITERS = {"bn1": ("conv1", "bn1"), "bn2": ("conv2", "bn2"), "fc1": ("fc1",)}


@pytest.mark.parametrize("criterion", ["obd", "obd:squared"])
def test_obd_in_the_callback_uses_the_minibatch_fisher_diagonal(criterion):
    """``sum over the neuron's parameters of h w^2 / 2`` with ``h = N (dE/dw)^2`` per step (signed, or the
    sum squared), from the autograd weight gradients of the step's batch."""
    importance, reference, batches = _callback_interval(criterion)
    modules = dict(reference.named_modules())
    for name, layers in _WRITERS.items():
        steps = []
        for x, y in batches:
            reference.zero_grad()
            F.cross_entropy(reference(x), y).backward()
            saliency = sum(
                (0.5 * 16 * p.grad.square() * p.detach().square()).reshape(p.shape[0], -1).sum(1)
                for layer in layers
                for p in (modules[layer].weight, modules[layer].bias)
            )
            steps.append(saliency.square() if criterion == "obd:squared" else saliency)
        assert relative_error(importance[name], torch.stack(steps).mean(0)) < 1e-6, name  # float32 inside


def test_elementwise_criteria_score_the_first_gated_layer_in_estimate_importance():
    """dE/dx at the first gated layer was never computed (autograd.grad stopped at the gates), so its
    neurons scored 0 under taylor_fo_abs/taylor_fo_sq and prune_once removed them first."""
    torch.manual_seed(0)
    model = SmallCNN().eval()
    x, y = _data(16)[0]
    results = estimate_importance(model, [(x, y)], criterion=["taylor_fo_abs", "taylor_fo_sq"])
    reference = _outputs_and_gradients(model, x, y)
    for criterion, scores in results.items():
        for name in GATED:
            assert name in scores.gates, (criterion, name)
            expected = _hook_reference(criterion, *reference[name])
            assert relative_error(scores.gates[name], expected.float()) < 1e-4, (criterion, name)


def test_a_user_criterion_registered_with_the_decorator_drives_the_callback(monkeypatch):
    """``@lightning_prune.register_criterion`` on a ``Criterion`` subclass: the name is listed, takes
    ``criterion_kwargs``, and the callback prunes by its scores (here ``|dE/dz|^power`` of each step)."""
    import lightning_prune
    from lightning_prune.importance import Criterion, registry

    monkeypatch.setattr(registry, "_CRITERIA", dict(registry._CRITERIA))  # registered for this test only

    @lightning_prune.register_criterion("user_abs_gate_gradient")
    class AbsGateGradient(Criterion):
        def __init__(self, power: float = 1.0) -> None:
            self.power = power

        def step_scores(self, grads):
            return {name: g.abs() ** self.power for name, g in grads.total.items()}

    assert "user_abs_gate_gradient" in lightning_prune.available_criteria()
    with pytest.raises(ValueError, match="already registered"):  # a name is taken once
        lightning_prune.register_criterion("user_abs_gate_gradient")(type("Other", (Criterion,), {}))
    torch.manual_seed(0)
    model = SmallCNN().double()
    reference = copy.deepcopy(model).train()
    loader = synthetic_loader(n=32, batch_size=16, dtype=torch.float64)
    cb = TaylorPruningCallback("user_abs_gate_gradient", prune_every_n_batches=2, neurons_per_step=3, num_to_prune=3,
                               criterion_kwargs={"power": 3.0})  # fmt: skip
    trainer(callbacks=[cb], max_steps=2).fit(Classifier(model, lr=0.0, example=X16.double()), loader)
    assert isinstance(cb.criterion, AbsGateGradient) and cb.criterion.power == 3.0
    grads = gate_gradients(reference, list(GATED), [(x, y, 1.0) for x, y in loader])
    scores = {name: torch.stack([g[name].abs() ** 3 for g in grads]).mean(0) for name in GATED}
    for name in GATED:
        assert relative_error(cb.importance["model." + name], scores[name]) < 1e-10, name
    # the three lowest-scoring channels of the network went
    flat = sorted((float(v), name, c) for name in GATED for c, v in enumerate(scores[name]))
    removed = {("model." + name, c) for _, name, c in flat[:3]}
    assert {(n, c) for n, m in cb.masks.items() for c in torch.nonzero(~m).flatten().tolist()} == removed


class _TwoLinear(nn.Module):
    """Linear(2, 3) -> ReLU -> Linear(3, 1): the hidden features are the only prunable neurons."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(2, 3, bias=False)
        self.fc2 = nn.Linear(3, 1, bias=False)
        with torch.no_grad():
            self.fc1.weight.copy_(torch.tensor([[1.0, 2.0], [0.0, -3.0], [1.0, 1.0]]))
            self.fc2.weight.copy_(torch.tensor([[2.0, -1.0, 0.0]]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.relu(self.fc1(x)))


@pytest.mark.parametrize(
    "kwargs, expected",
    [  # hidden feature j: writer row fc1.weight[j], reader column fc2.weight[:, j]
        ({"p": 2, "reduction": "sum", "normalize": None}, [5 + 4, 9 + 1, 2 + 0]),
        ({"p": 1, "reduction": "sum", "normalize": None}, [3 + 2, 3 + 1, 2 + 0]),
        ({"p": 2, "reduction": "mean", "normalize": None}, [4.5, 5.0, 1.0]),
        ({}, [4.5 / 3.5, 5.0 / 3.5, 1.0 / 3.5]),  # the defaults: p=2, mean over layers, over the group
    ],
)
def test_group_magnitude_values_by_hand(kwargs, expected):
    scores = estimate_importance(_TwoLinear(), [torch.zeros(1, 2)], "group_magnitude", criterion_kwargs=kwargs)
    assert torch.allclose(scores.gates["fc1"].double(), torch.tensor(expected, dtype=torch.float64))


class _ConvBNNet(nn.Module):
    """conv(bias)-bn-relu, conv-bn-relu, 2x2 pooling flattened into a Linear (4 features per channel)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(2, 3, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(3)
        self.conv2 = nn.Conv2d(3, 4, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(4)
        self.fc = nn.Linear(16, 2)
        for bn in (self.bn1, self.bn2):
            nn.init.normal_(bn.weight)
            nn.init.normal_(bn.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 2), 1))


def _per_channel_layers(model: _ConvBNNet, p: float, bias: bool) -> dict[str, list[list[float]]]:
    """Per gated layer, per channel, ``sum |w|^p`` of each layer the channel touches, written out by hand."""

    def s(t):
        return float(t.detach().abs().pow(p).sum())

    bn1 = [[s(model.conv1.weight[c]) + (s(model.conv1.bias[c]) if bias else 0),
            s(model.bn1.weight[c]) + (s(model.bn1.bias[c]) if bias else 0),
            s(model.conv2.weight[:, c])] for c in range(3)]  # fmt: skip
    bn2 = [[s(model.conv2.weight[c]),
            s(model.bn2.weight[c]) + (s(model.bn2.bias[c]) if bias else 0),
            s(model.fc.weight[:, 4 * c : 4 * c + 4])] for c in range(4)]  # fmt: skip
    return {"bn1": bn1, "bn2": bn2}


@pytest.mark.parametrize("p, bias", [(2, False), (1, True)])
def test_group_magnitude_sums_writer_rows_and_reader_columns(p, bias):
    torch.manual_seed(0)
    model = _ConvBNNet().eval()
    layers = _per_channel_layers(model, p, bias)
    for reduction, normalize in [("sum", None), ("mean", "mean")]:
        kwargs = {"p": p, "reduction": reduction, "normalize": normalize, "bias": bias}
        scores = estimate_importance(model, [torch.zeros(1, 2, 8, 8)], "group_magnitude", criterion_kwargs=kwargs)
        for name, channels in layers.items():
            expected = torch.tensor([sum(c) / (1 if reduction == "sum" else len(c)) for c in channels])
            if normalize == "mean":
                expected = expected / expected.mean()
            assert torch.allclose(scores.gates[name], expected.float(), rtol=1e-5), (name, kwargs)


def test_group_magnitude_sums_tied_residual_channels_over_every_layer():
    torch.manual_seed(0)
    model = SmallResNet(width=4).eval()
    scores = estimate_importance(model, [torch.zeros(1, 3, 16, 16)], "group_magnitude",
                                 criterion_kwargs={"reduction": "sum", "normalize": None})  # fmt: skip
    m = dict(model.named_modules())
    writers = ["stem.0", "stem.1", "block1.conv2", "block1.bn2", "block2.conv2", "block2.bn2"]
    readers = ["block1.conv1", "block2.conv1", "block3.conv1", "block3.proj.0"]
    graph = scores.graph
    for c in range(4):
        neuron = int(graph.gates["stem.1"].neurons[c])
        assert graph.residual[neuron]
        expected = sum(float(m[w].weight[c].detach().square().sum()) for w in writers)
        expected += sum(float(m[r].weight[:, c].detach().square().sum()) for r in readers)
        assert scores.neurons[neuron].item() == pytest.approx(expected, rel=1e-5)
    mean = estimate_importance(model, [torch.zeros(1, 3, 16, 16)], "group_magnitude",
                               criterion_kwargs={"reduction": "mean", "normalize": None})  # fmt: skip
    tied = graph.gates["stem.1"].neurons
    assert torch.allclose(mean.neurons[tied] * 10, scores.neurons[tied], rtol=1e-6)


def test_group_magnitude_normalises_over_the_neurons_not_yet_removed():
    torch.manual_seed(0)
    model = SmallCNN().eval()
    scores = estimate_importance(model, _data(), "group_magnitude")
    alive = alive_from_masks(scores.graph, prune_once(model, scores, num=6))
    again = estimate_importance(model, _data(), "group_magnitude")
    pruned_layers = 0
    for name, gate in again.graph.gates.items():  # every gated layer of SmallCNN is its own group
        kept = alive[gate.neurons]
        assert again.gates[name][kept].mean().item() == pytest.approx(1.0, rel=1e-5), name
        if not kept.all():  # a removed neuron still has reader columns, yet does not count in the mean
            pruned_layers += 1
            assert (again.gates[name][~kept] > 0).all()
            assert again.gates[name].mean().item() != pytest.approx(1.0, rel=1e-3)
    assert pruned_layers > 0


def test_group_magnitude_is_registered_and_checks_its_arguments():
    assert "group_magnitude" in available_criteria()
    for bad in ({"reduction": "max"}, {"normalize": "gaussian"}, {"p": 0}):
        with pytest.raises(PruningConfigurationError, match="group_magnitude"):
            get_criterion("group_magnitude", **bad)
