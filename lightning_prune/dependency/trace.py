"""Symbolic tracing of a module with torch.fx, plus shapes of every value from one example forward."""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from lightning_prune.errors import UnsupportedModelError
from lightning_prune.ops.registry import prepare_modules, traced_as_one_op


class _Tracer(fx.Tracer):
    """torch.fx tracer that also keeps as leaves user-named modules, modules with a user op rule and every
    BatchNorm subclass (timm's ``BatchNormAct2d`` calls ``F.batch_norm(training=self.training)``: traced
    through, the mode of the traced step would be frozen into the graph and the compact network).
    ``failed``: the innermost submodule whose forward raised while being traced."""

    def __init__(self, leaf_modules: Iterable[str] = ()) -> None:
        super().__init__()
        self._leaf_names = set(leaf_modules)
        self.failed: str | None = None

    def call_module(self, m: nn.Module, forward: Any, args: Any, kwargs: Any) -> Any:
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed is None:
                self.failed = self.path_of_module(m)
            raise

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return (
            module_qualified_name in self._leaf_names
            or traced_as_one_op(m)
            or isinstance(m, nn.modules.batchnorm._BatchNorm)
            or super().is_leaf_module(m, module_qualified_name)
        )


def trace(
    module: nn.Module, example_input: Any, leaf_modules: Iterable[str] = ()
) -> fx.GraphModule:
    """Trace ``module`` and annotate every node with ``meta['tensor_meta']`` from one forward pass.

    ``example_input`` is a tensor, a sequence of positional tensors or a mapping of keyword arguments.
    The forward runs in eval mode under ``no_grad`` so BatchNorm statistics are untouched.
    """
    prepare_modules(module)
    graph = trace_graph(module, leaf_modules)
    gm = fx.GraphModule(module, graph)
    args, kwargs = as_call_args(example_input)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    flat = list(args) + [kwargs[n.target] for n in placeholders[len(args):] if n.target in kwargs]
    modes = {m: m.training for m in module.modules()}
    module.eval()
    try:
        with torch.no_grad():
            ShapeProp(gm).propagate(*flat)
    except Exception as err:
        raise UnsupportedModelError(
            f"running {type(module).__name__} on the example input failed: {err}"
        ) from err
    finally:
        for m, training in modes.items():
            m.training = training
    return gm


def trace_graph(module: nn.Module, leaf_modules: Iterable[str] = ()) -> fx.Graph:
    """The fx graph of ``module``. A submodule whose forward torch.fx cannot trace (control flow on a
    traced value, ...) is traced as one op instead, with a warning naming it: the channels flowing in and
    out of it are then kept. Raises :class:`UnsupportedModelError` when ``module``'s own forward fails."""
    leaves, untraceable = set(leaf_modules), {}
    while True:
        tracer = _Tracer(leaves)
        try:
            graph = tracer.trace(module)
            break
        except Exception as err:  # fx raises many kinds of errors on untraceable code
            if tracer.failed is None or tracer.failed in leaves:
                raise UnsupportedModelError(
                    f"torch.fx could not trace {type(module).__name__}: {err}. Pass the untraceable submodules "
                    "as `leaf_modules` (their channels are then left unpruned) or restructure forward()."
                ) from err
            leaves.add(tracer.failed)
            untraceable[tracer.failed] = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
    if untraceable:
        names = ", ".join(f"{name} ({type(module.get_submodule(name)).__name__})" for name in untraceable)
        warnings.warn(
            f"torch.fx could not trace {len(untraceable)} submodule(s): {names}; first error: "
            f"{next(iter(untraceable.values()))}. Each is traced as one op, the channels flowing into and out "
            "of it are kept. Name them in `leaf_modules` to silence this.",
            stacklevel=3,
        )
    return graph


def as_call_args(example_input: Any) -> tuple[Sequence[Any], Mapping[str, Any]]:
    if isinstance(example_input, Mapping):
        return (), dict(example_input)
    if isinstance(example_input, (tuple, list)):
        return tuple(example_input), {}
    return (example_input,), {}
