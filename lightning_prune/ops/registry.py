"""The op-rule registry: one :class:`OpRule` per op, found by module type, function or method name, or by
the import path of a module class or function (``"timm.layers.drop.DropPath"``, never imported here)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from torch import fx, nn

if TYPE_CHECKING:
    from lightning_prune.compaction.compact import CompactBuilder
    from lightning_prune.dependency.propagation import ChannelWalker

_MODULES: dict[type[nn.Module], OpRule] = {}
_FUNCTIONS: dict[Callable[..., Any], OpRule] = {}
_METHODS: dict[str, OpRule] = {}
_PATHS: dict[str, OpRule] = {}  # "package.module.Name" of a module class or function


class OpRule:
    """How one op moves channels, and how it is rewritten in the compact network.

    ``propagate`` returns the :class:`~lightning_prune.dependency.channels.ChannelTag` of the op's output
    (None for a value without channels) and ties the channel nodes the op joins; ``walker.opaque(node)``
    is the safe answer for a case the rule does not handle. ``compact`` returns the op's node in the
    compact graph, holding the output's kept channels (``builder.kept_positions``), or None: the op then
    runs on full-width inputs (zeros at the removed channels), which is always exact.

    ``takes_nonzero``: the rule handles inputs whose removed channels are not zero
    (``ChannelTag.nonzero``, e.g. after a sigmoid) itself; for any other rule the walker first blocks the
    channels of such inputs.
    """

    takes_nonzero = False

    def propagate(self, walker: ChannelWalker, node: fx.Node) -> Any:
        raise NotImplementedError

    def compact(self, builder: CompactBuilder, node: fx.Node) -> fx.Node | None:
        return None

    def prepare(self, module: nn.Module) -> None:
        """Called before tracing on each module of a class with this rule: it may change how the module
        computes (never what it computes) so that its neurons can be seen and removed. A class it gives
        the module names the original as ``prepared_from`` and any submodule it adds in ``added_modules``
        (see :func:`architecture_modules`)."""


def register_op_rule(*targets: type[nn.Module] | Callable[..., Any] | str, override: bool = False):
    """Class decorator registering an :class:`OpRule` subclass for ``targets``: module classes (the rule
    of the closest base class of a module applies, so a rule for your subclass of a built-in layer takes
    precedence), functions (``torch.sigmoid``) or tensor method names (``"view"``). A target that already
    has a rule raises ``ValueError`` unless ``override=True``, which replaces it."""

    def add(cls: type[OpRule]) -> type[OpRule]:
        tables = [_table(target) for target in targets]
        for target, table in zip(targets, tables):
            old = table.get(target)
            if old is not None and type(old) is not cls and not override:
                raise ValueError(
                    f"{_name(target)} already has the op rule {type(old).__name__}; pass override=True "
                    f"to replace it by {cls.__name__}"
                )
        rule = cls()
        for target, table in zip(targets, tables):
            table[target] = rule
        return cls

    return add


def find_op_rule(node: fx.Node, modules: Mapping[str, nn.Module]) -> OpRule | None:
    """The rule of the op ``node`` calls (``modules``: the traced module's submodules), or None."""
    if node.op == "call_module":
        return next((rule for c in type(modules[str(node.target)]).__mro__ if (rule := _class_rule(c))), None)
    if node.op == "call_function":
        return _FUNCTIONS.get(node.target) or _PATHS.get(_path(node.target))
    if node.op == "call_method":
        return _METHODS.get(node.target)
    return None


def prepare_modules(model: nn.Module) -> None:
    """Let the rule of each module of ``model`` prepare it (:meth:`OpRule.prepare`)."""
    for module in model.modules():
        rule = next((rule for c in type(module).__mro__ if (rule := _class_rule(c))), None)
        if rule is not None:
            rule.prepare(module)


def architecture_modules(model: nn.Module) -> list[tuple[str, type]]:
    """(qualified name, class) of every module of ``model`` as it was before :func:`prepare_modules`: a
    prepared class names its original as ``prepared_from`` and the submodules it added as ``added_modules``."""
    added = {f"{name}.{child}".lstrip(".") for name, m in model.named_modules()
             for child in type(m).__dict__.get("added_modules", ())}  # fmt: skip
    return [
        (name, type(m).__dict__.get("prepared_from", type(m))) for name, m in model.named_modules() if name not in added
    ]


def traced_as_one_op(module: nn.Module) -> bool:
    """Whether tracing keeps ``module`` as one op: a rule is registered for its class, or a base class of
    it, defined outside ``torch.nn`` (whose modules torch.fx keeps as leaves anyway)."""
    return any(_class_rule(c) and not c.__module__.startswith("torch.nn") for c in type(module).__mro__)


def _class_rule(cls: type) -> OpRule | None:
    return _MODULES.get(cls) or _PATHS.get(_path(cls))


def _path(target: Any) -> str:
    return f"{getattr(target, '__module__', '')}.{getattr(target, '__qualname__', '')}"


def tensor_shape(node: Any) -> tuple[int, ...] | None:
    """The shape of a traced tensor value (from the example forward), or None."""
    meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    shape = getattr(meta, "shape", None)
    return tuple(shape) if shape is not None else None


def sole_reader(node: fx.Node) -> bool:
    """Whether the ``get_attr`` ``node`` is all that reads its attribute in its graph, once: no other
    ``get_attr`` of it, no module called as a whole that holds it, a single user."""
    if node.op != "get_attr" or len(node.users) != 1:
        return False
    target = str(node.target)
    owner = target.rpartition(".")[0] + "."
    return not any(
        (other.op == "get_attr" and other is not node and other.target == target)
        or (other.op == "call_module" and owner.startswith(f"{other.target}."))
        for other in node.graph.nodes
    )


def _table(target: Any) -> dict[Any, OpRule]:
    if isinstance(target, str):
        return _PATHS if "." in target else _METHODS
    if isinstance(target, type) and issubclass(target, nn.Module):
        return _MODULES
    if callable(target):
        return _FUNCTIONS
    raise TypeError(f"an op rule is registered for module classes, functions or method names, not {target!r}")


def _name(target: Any) -> str:
    if isinstance(target, str):
        return target if "." in target else f"method .{target}()"
    return getattr(target, "__name__", repr(target))
