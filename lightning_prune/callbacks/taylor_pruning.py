"""TaylorPruningCallback: iterative global pruning during fine-tuning (Molchanov et al., CVPR 2019)."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn
from torch.utils.hooks import RemovableHandle
from typing_extensions import override

from lightning_prune.compaction import PruningMasks, compact, masks_from_alive, round_alive, save_compact
from lightning_prune.compaction.compact import _network_of
from lightning_prune.compaction.in_fit import parameter_sources, put_network, replace_network
from lightning_prune.dependency import GATE_PLACEMENTS, DependencyGraph, build_dependency_graph
from lightning_prune.dependency.graph import module_names
from lightning_prune.distillation import Distiller
from lightning_prune.distributed import broadcast_decision, mean_over_ranks
from lightning_prune.errors import PruningConfigurationError, UnsupportedModelError, UnsupportedStrategyError
from lightning_prune.importance import Criterion, GateGradients, get_criterion
from lightning_prune.latency import LatencySelector, LatencyTable
from lightning_prune.pruner import CostModel, NeuronMasks, NeuronSelector, fewest_reaching, neuron_scores, reset_optimizer_state
from lightning_prune.pruner.history import PruningRecord, write_history

_UNSUPPORTED_STRATEGIES = (FSDPStrategy, DeepSpeedStrategy, ModelParallelStrategy)
SCHEDULES = ("cubic", "linear")


class TaylorPruningCallback(Callback):
    r"""Remove the globally least important neurons every few optimizer steps while fine-tuning.

    Gates ``z = 1`` sit on every BatchNorm output (and on Conv/Linear outputs with no BatchNorm after
    them); the importance of a neuron is computed by ``criterion`` from the gate gradients of each
    optimizer step, averaged over the steps between two pruning steps and smoothed across pruning
    steps by an exponential moving average. Channels tied by residual additions form one neuron.

    Args:
        criterion: name in the criteria registry (see ``lightning_prune.available_criteria()``) or a
            :class:`~lightning_prune.importance.Criterion` instance.
        prune_every_n_batches: optimizer steps between two pruning steps (K).
        neurons_per_step: neurons removed per pruning step; an ``int``, or a ``float`` in (0, 1) for a
            fraction of the initial prunable neurons. Unused with ``pruning_steps``.
        keep_ratio: fraction of the prunable neurons left at the end. Give this, ``num_to_prune`` or
            ``target_flops_ratio`` (or one of the first two with it, as a cap).
        num_to_prune: number of neurons to remove in total.
        ema: weight of the past in the moving average of importance across pruning steps (0: none).
        reset_momentum: clear the optimizer state (momentum buffers) once the target is reached.
        gate_placement: ``"after_bn"`` (the paper's best) or ``"before_bn"``.
        min_channels: channels every gated layer keeps at least.
        ignored_modules: qualified module names (and their children) never pruned.
        leaf_modules: modules that tracing must not enter (their channels stay unpruned).
        prune_residual: also prune channels tied by residual connections (``False`` is the paper's "No skip").
        max_loss: stop pruning early once the smoothed training loss exceeds this value.
        target_flops_ratio: stop once the FLOPs of the network, with removed neurons cut out, fall to this
            fraction of the initial FLOPs; the last step removes only as many neurons as that takes
            (``keep_ratio``/``num_to_prune``, if given, cap the removal).
        loss_smoothing: weight of the past in the training loss' moving average.
        module_name: the submodule of the LightningModule holding the network. By default the
            LightningModule itself, or the first direct child it calls if its own forward is unused.
        example_input: an input for tracing; by default ``example_input_array``, or the first input the
            network sees.
        gate_gradient: ``"auto"`` reads gate gradients from parameter gradients where exact (no overhead),
            ``"hooks"`` always uses explicit gates. Use ``"hooks"`` if the loss adds a penalty on the weights.
        history_dir: where ``pruning_history.{json,csv}`` go; by default the trainer's log dir.
        criterion_kwargs: arguments for the criterion's constructor (e.g. ``{"seed": 1}`` for ``random``).
        compact_on_fit_end: at the end of fit, physically remove the pruned neurons
            (:func:`lightning_prune.compact`): the result is ``callback.compact_model``, written on rank zero
            with :func:`lightning_prune.save_compact` to ``compact_path``.
        compact_path: where the compact model goes; by default ``compact_model.pt`` in the trainer's log dir.
        compact_when_done: once pruning ends, train the compact network for the rest of the fit: the
            network (an attribute of the LightningModule, e.g. ``self.net``) is replaced by its compact
            version, the optimizer's parameters and state follow, and so does the DDP wrapper. Every later
            step costs what the compact network costs and computes what the masked one would. Checkpoints
            then hold the compact network; resuming from one compacts the new network before its weights load.
        distill_weight: distil from the network as it was before pruning (frozen, in eval mode) while
            pruning and fine-tuning: training follows the gradient of ``loss + distill_weight * T^2 *
            KL(teacher || student)`` on the network's output logits (``T``: ``distill_temperature``). Your
            ``training_step`` stays as it is (and logs its own loss); the network must be an attribute of the
            LightningModule, as for ``compact_when_done``. 0 turns it off.
        distill_temperature: the softmax temperature ``T`` of distillation.
        pruning_steps: spread pruning over this many optimizer steps (an ``int``, or a ``float`` in (0, 1]
            for a fraction of the fit's ``trainer.estimated_stepping_batches``) and reach the target at its
            last pruning step; the rest of the fit fine-tunes the pruned network. Each pruning step brings the
            removal (of neurons, or of FLOPs with ``target_flops_ratio``) to its share of the target along
            ``schedule``.
        schedule: with ``pruning_steps``: ``"cubic"`` removes much early and little late, when the network
            is small and every neuron counts (share ``1 - (1 - i/P)^3`` after pruning step ``i`` of ``P``,
            Zhu & Gupta 2017); ``"linear"`` the same amount at every step.
        target_latency_ratio: stop once the predicted latency of the compact network falls to this fraction of
            the initial one. Each pruning step keeps the most important neurons under its latency budget (a
            knapsack over a per-layer latency table measured on the training device, HALP-style), at widths
            where latency actually drops. With ``pruning_steps`` the budget follows ``schedule``; without, it
            falls by the fraction ``neurons_per_step`` of the initial prunable neurons (of the initial latency)
            per step. With ``target_flops_ratio`` too, both are met.
        latency_table: a :class:`lightning_prune.LatencyTable` for the network (e.g. measured on the
            deployment device); by default one is measured at fit start on rank zero (cached on disk, see
            :meth:`LatencyTable.build`) and sent to the other ranks.
        latency_batch_size: the batch size latency is measured at (default: the network's first input's).
        latency_width_step: the width step of the measured table (channels come off in multiples of it).
        latency_memory_format: the memory format the network will run in, where latency is measured
            (``torch.channels_last`` or ``"channels_last"``: on CPUs and tensor cores often faster, and the
            fastest widths differ).
        latency_dtype: the dtype the network will run in (``torch.bfloat16`` or ``"bfloat16"``; default: its
            parameters' dtype).
        latency_feedback: measured latency corrects the table (0: trust the table). The compact network
            and the full-width one are timed in turn (rank zero, figures sent to every rank) and the table is
            calibrated on both (:meth:`LatencyTable.calibrated`). On the way, each time the predicted
            latency first falls halfway from the last measurement to the target (at most this many times),
            if the network measures faster than predicted (the later steps would remove too much, and
            removed neurons cannot come back; slower is left to the check at the target, so that one
            noisy measurement cannot make every later step remove more); and when it reaches the target,
            if the measured ratio is more than 2% above the target (pruning then goes on; at most this
            many times).
        compact_round_to: keep a multiple of this many channels per layer in the compact model (e.g. 16,
            oneDNN's float32 channel block on AVX-512 CPUs, or 8 for tensor cores). The FLOPs and
            parameters logged, and ``target_flops_ratio``, then count the rounded widths: pruning goes on
            until the compact model itself reaches the target. Rounding up revives the neurons removed
            last first (their weights stay zero, so the compact model still computes the masked one).
    """

    def __init__(
        self,
        criterion: str | Criterion = "taylor_fo_bn",
        prune_every_n_batches: int = 10,
        neurons_per_step: int | float = 0.02,
        keep_ratio: float | None = None,
        num_to_prune: int | None = None,
        ema: float = 0.9,
        reset_momentum: bool = True,
        *,
        gate_placement: Literal["after_bn", "before_bn"] = "after_bn",
        min_channels: int = 1,
        ignored_modules: Sequence[str] = (),
        leaf_modules: Sequence[str] = (),
        prune_residual: bool = True,
        max_loss: float | None = None,
        target_flops_ratio: float | None = None,
        loss_smoothing: float = 0.9,
        module_name: str | None = None,
        example_input: Any = None,
        gate_gradient: Literal["auto", "hooks"] = "auto",
        history_dir: str | None = None,
        criterion_kwargs: dict[str, Any] | None = None,
        compact_on_fit_end: bool = False,
        compact_path: str | None = None,
        compact_round_to: int | None = None,
        target_latency_ratio: float | None = None,
        latency_table: LatencyTable | None = None,
        latency_batch_size: int | None = None,
        latency_width_step: int = 8,
        latency_feedback: int = 3,
        latency_memory_format: torch.memory_format | str = torch.contiguous_format,
        latency_dtype: torch.dtype | str | None = None,
        pruning_steps: int | float | None = None,
        schedule: Literal["cubic", "linear"] = "cubic",
        compact_when_done: bool = False,
        distill_weight: float = 0.0,
        distill_temperature: float = 4.0,
    ) -> None:
        super().__init__()
        _check(isinstance(prune_every_n_batches, int) and prune_every_n_batches >= 1,
               f"prune_every_n_batches must be a positive int, got {prune_every_n_batches!r}")  # fmt: skip
        is_int = isinstance(neurons_per_step, int) and not isinstance(neurons_per_step, bool)
        _check((is_int and neurons_per_step >= 1) or (isinstance(neurons_per_step, float) and 0 < neurons_per_step < 1),
               f"neurons_per_step must be an int >= 1 or a float in (0, 1), got {neurons_per_step!r}")  # fmt: skip
        _check(keep_ratio is None or num_to_prune is None, "give at most one of keep_ratio and num_to_prune")
        _check(keep_ratio is not None or num_to_prune is not None or target_flops_ratio is not None
               or target_latency_ratio is not None,
               "give a target: keep_ratio, num_to_prune, target_flops_ratio or target_latency_ratio")  # fmt: skip
        _check(keep_ratio is None or (isinstance(keep_ratio, (int, float)) and 0 < keep_ratio < 1),
               f"keep_ratio must be in (0, 1), got {keep_ratio!r}")  # fmt: skip
        _check(num_to_prune is None or (isinstance(num_to_prune, int) and num_to_prune >= 1),
               f"num_to_prune must be a positive int, got {num_to_prune!r}")  # fmt: skip
        _check(0 <= ema < 1, f"ema must be in [0, 1), got {ema!r}")
        _check(0 <= loss_smoothing < 1, f"loss_smoothing must be in [0, 1), got {loss_smoothing!r}")
        _check(gate_placement in GATE_PLACEMENTS, f"gate_placement must be one of {GATE_PLACEMENTS}, got {gate_placement!r}")
        _check(isinstance(min_channels, int) and min_channels >= 1, f"min_channels must be an int >= 1, got {min_channels!r}")
        _check(max_loss is None or max_loss > 0, f"max_loss must be positive, got {max_loss!r}")
        _check(target_flops_ratio is None or 0 < target_flops_ratio < 1,
               f"target_flops_ratio must be in (0, 1), got {target_flops_ratio!r}")  # fmt: skip
        _check(target_latency_ratio is None or 0 < target_latency_ratio < 1,
               f"target_latency_ratio must be in (0, 1), got {target_latency_ratio!r}")  # fmt: skip
        _check(isinstance(latency_width_step, int) and latency_width_step >= 1,
               f"latency_width_step must be a positive int, got {latency_width_step!r}")  # fmt: skip
        _check(isinstance(latency_feedback, int) and latency_feedback >= 0,
               f"latency_feedback must be an int >= 0, got {latency_feedback!r}")  # fmt: skip
        _check(latency_batch_size is None or (isinstance(latency_batch_size, int) and latency_batch_size >= 1),
               f"latency_batch_size must be a positive int, got {latency_batch_size!r}")  # fmt: skip
        _check(pruning_steps is None or (isinstance(pruning_steps, int) and pruning_steps >= 1)
               or (isinstance(pruning_steps, float) and 0 < pruning_steps <= 1),
               f"pruning_steps must be an int >= 1 or a float in (0, 1], got {pruning_steps!r}")  # fmt: skip
        _check(distill_weight >= 0, f"distill_weight must be >= 0, got {distill_weight!r}")
        _check(distill_temperature > 0, f"distill_temperature must be positive, got {distill_temperature!r}")
        _check(schedule in SCHEDULES, f"schedule must be one of {SCHEDULES}, got {schedule!r}")
        _check(gate_gradient in ("auto", "hooks"), f"gate_gradient must be 'auto' or 'hooks', got {gate_gradient!r}")
        self.criterion = get_criterion(criterion, **(criterion_kwargs or {}))
        self.prune_every_n_batches = prune_every_n_batches
        self.neurons_per_step = neurons_per_step
        self.keep_ratio = keep_ratio
        self.num_to_prune = num_to_prune
        self.ema = ema
        self.reset_momentum = reset_momentum
        self.gate_placement = gate_placement
        self.min_channels = min_channels
        self.ignored_modules = tuple(ignored_modules)
        self.leaf_modules = tuple(leaf_modules)
        self.prune_residual = prune_residual
        self.max_loss = max_loss
        self.target_flops_ratio = target_flops_ratio
        self.loss_smoothing = loss_smoothing
        self.module_name = module_name
        self.example_input = example_input
        self.gate_gradient = gate_gradient
        self.history_dir = history_dir
        _check(compact_round_to is None or (isinstance(compact_round_to, int) and compact_round_to >= 1),
               f"compact_round_to must be a positive int, got {compact_round_to!r}")  # fmt: skip
        self.compact_on_fit_end = compact_on_fit_end
        self.compact_path = compact_path
        self.compact_round_to = compact_round_to
        self.target_latency_ratio = target_latency_ratio
        self.latency_table = latency_table
        self.latency_batch_size = latency_batch_size
        self.latency_width_step = latency_width_step
        self.latency_feedback = latency_feedback
        self.latency_memory_format = _torch_attribute(latency_memory_format, torch.memory_format,
                                                      "latency_memory_format", "channels_last")
        self.latency_dtype = None if latency_dtype is None else _torch_attribute(latency_dtype, torch.dtype,
                                                                                 "latency_dtype", "bfloat16")
        self._feedback_rounds = 0
        self._approach: list[float] = []  # latency ratios measured on the way
        self._measured: tuple[torch.Tensor, float, float] | None = None  # (alive, full-width s, compact s)
        self.initial_latency: float | None = None  # predicted seconds of the network before pruning
        self.measured_latency: float | None = None  # measured seconds of the compact network (rank zero's)
        self._latency_input: Any = None  # the traced network's input, to time its compact version
        self._latency_selector: LatencySelector | None = None
        self.pruning_steps = pruning_steps
        self.schedule = schedule
        self.compact_when_done = compact_when_done
        self.distill_weight = distill_weight
        self.distill_temperature = distill_temperature
        self._distiller: Distiller | None = None
        self.compacted = False  # the network in the LightningModule is the compact one
        self._network_path = ""  # where the network lives in the LightningModule (compact_when_done, distillation)
        self._hook_wrapped = False
        self.compact_model: nn.Module | None = None
        self.compact_file: str | None = None
        self._log_dir: str | None = None

        self.graph: DependencyGraph | None = None
        self.importance: dict[str, torch.Tensor] = {}
        self.history: list[PruningRecord] = []
        self.num_pruned = 0
        self.done = False
        self.stop_reason: str | None = None
        self.initial_flops: int | None = None
        self.initial_params: int | None = None
        self._alive: torch.Tensor | None = None
        self._initial_prunable = 0
        self._target = 0
        self._step_size = 0
        self._num_pruning_steps = 0  # P: the pruning steps of a ``pruning_steps`` schedule
        self._pruning_step = 0  # pruning steps taken (with or without removal)
        self._grads: GateGradients | None = None
        self._interval_sum: dict[str, torch.Tensor] = {}
        self._interval_count: torch.Tensor | int = 0
        self._steps_in_interval = 0
        self._last_step = -1
        self._loss: torch.Tensor | None = None
        self._pending_state: dict[str, Any] | None = None
        self._capture_handles: list[RemovableHandle] = []

    # -- public views ----------------------------------------------------------------------------------------
    @property
    def masks(self) -> PruningMasks | dict[str, torch.Tensor]:
        """Qualified name of each gated layer -> bool per output channel, True where the neuron is kept: a
        dict that also records how the network was traced, so ``lightning_prune.compact(network, masks)``
        needs no example input. After ``load_state_dict`` outside a fit (the launching process of
        ``ddp_spawn``), the masks of the loaded state."""
        return self._gate_masks(self._alive)

    @property
    def compact_masks(self) -> PruningMasks | dict[str, torch.Tensor]:
        """The channels the compact model keeps: :attr:`masks` with widths rounded up to a multiple of
        ``compact_round_to`` (the same as :attr:`masks` without it)."""
        return self._gate_masks(self._compact_alive() if self._alive is not None else None, "compact_masks")

    def _gate_masks(self, alive: torch.Tensor | None, key: str = "masks") -> PruningMasks | dict[str, torch.Tensor]:
        if self.graph is None:  # before fit, or a state loaded outside fit (the launcher of ddp_spawn)
            state = self._pending_state or {}
            return PruningMasks(state[key], state["trace"]) if key in state else {}
        if alive is None:
            return {}
        return masks_from_alive(self.graph, alive, self.gate_placement)

    @property
    def neurons_remaining(self) -> int:
        return self._initial_prunable - self.num_pruned

    @property
    def state_key(self) -> str:
        return self._generate_state_key(criterion=self.criterion.name, placement=self.gate_placement)

    # -- set-up ------------------------------------------------------------------------------------------------
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if isinstance(trainer.strategy, _UNSUPPORTED_STRATEGIES):
            raise UnsupportedStrategyError(
                f"TaylorPruningCallback does not support {type(trainer.strategy).__name__}: it shards parameters, "
                "so channels can't be masked consistently. Use strategy='ddp' (or a single device)."
            )
        if self.module_name is not None:
            try:
                pl_module.get_submodule(self.module_name)
            except AttributeError as err:
                raise PruningConfigurationError(f"module_name {self.module_name!r} is not a submodule: {err}") from err
        self._check_module_names(pl_module)
        if self.compact_when_done and "on_load_checkpoint" not in vars(pl_module):
            user_hook = pl_module.on_load_checkpoint

            def on_load_checkpoint(checkpoint: dict[str, Any]) -> None:
                # Lightning loads the weights right after this hook, and no callback hook runs before
                self._compact_for_checkpoint(pl_module, checkpoint)
                user_hook(checkpoint)

            pl_module.on_load_checkpoint = on_load_checkpoint
            self._hook_wrapped = True
        # resolved here, on every rank: ``trainer.log_dir`` is a collective (a broadcast from rank zero), so
        # reading it later on rank zero alone would leave the other ranks one collective behind (a hang)
        self._log_dir = trainer.log_dir or trainer.default_root_dir

    def _check_module_names(self, pl_module: pl.LightningModule) -> None:
        """Fail before training on a name in ``ignored_modules``/``leaf_modules`` that no module has: qualified
        names of the LightningModule, or relative to the network (``module_name``, or a child it calls)."""
        if self.module_name is not None:
            networks = [self.module_name]
        else:
            networks = ["", *(n for n, m in pl_module.named_children() if any(True for _ in m.parameters()))]
        for names, what in ((self.ignored_modules, "ignored_modules"), (self.leaf_modules, "leaf_modules")):
            for name in names:
                if not any(_has_module(pl_module, network, name) for network in networks):
                    root = networks[0]  # module_name, or the LightningModule: module_names words the error
                    module_names(pl_module.get_submodule(root), [name], f"{root}." if root else "", what)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.compacted:  # compacted already (resumed, or fitting again): pruning is over, nothing to trace
            self._attach_distiller(trainer, self.compact_model)
            return
        if self.graph is not None:  # fitting again with the same callback
            self._attach_distiller(trainer, pl_module.get_submodule(self._network_path) if self._network_path else pl_module)
            if self._grads is not None and not self.done:
                self._grads.detach()
                self._grads.attach()
            return
        example = self.example_input
        if example is None and self.module_name is None:
            example = pl_module.example_input_array
        if example is not None:
            self._initialize(trainer, pl_module, self.module_name or "", move_data_to_device(example, pl_module.device))
            return
        # no example input: analyse the network on the first input it is called with
        targets = [(self.module_name, pl_module.get_submodule(self.module_name))] if self.module_name else [
            ("", pl_module), *((n, m) for n, m in pl_module.named_children() if any(True for _ in m.parameters()))
        ]  # fmt: skip
        for name, module in targets:
            self._capture_handles.append(
                module.register_forward_pre_hook(self._capture_hook(trainer, pl_module, name), with_kwargs=True)
            )

    def _capture_hook(self, trainer: pl.Trainer, pl_module: pl.LightningModule, name: str):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            if not name and _forward_redirected(module):
                return  # DDP calls training_step through the LightningModule's forward: not the network's input
            for handle in self._capture_handles:
                handle.remove()
            self._capture_handles.clear()
            try:
                self._initialize(trainer, pl_module, name, kwargs if kwargs and not args else args)
            except (PruningConfigurationError, UnsupportedModelError) as err:
                raise type(err)(
                    f"{err}\n(TaylorPruningCallback analysed the network at its first call, inside the first "
                    "step, because no input was known before: set `example_input_array` on the LightningModule "
                    "or pass `example_input=` to the callback to get this error before training starts.)"
                ) from err

        return hook

    @override
    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor) -> None:
        if self.graph is None and not self.compacted:
            raise UnsupportedModelError(
                "TaylorPruningCallback never saw the network's input: set `example_input_array` on the "
                "LightningModule, or pass `example_input=` / `module_name=` to the callback."
            )

    def _initialize(self, trainer: pl.Trainer, pl_module: pl.LightningModule, name: str, example: Any) -> None:
        network = pl_module.get_submodule(name) if name else pl_module
        prefix = f"{name}." if name else ""
        graph = build_dependency_graph(
            network,
            example,
            placement=self.gate_placement,
            ignored_modules=self.ignored_modules,
            leaf_modules=self.leaf_modules,
            prune_residual=self.prune_residual,
            prefix=prefix,
        )
        if self.compact_when_done or self.distill_weight:
            self._network_path = name or _network_of(pl_module, list(graph.gates))[1].removesuffix(".")
            if not self._network_path:
                raise PruningConfigurationError(
                    "compact_when_done and distillation work on the network inside the LightningModule, so they "
                    f"need it in one attribute of {type(pl_module).__name__} (self.net = ...) holding every "
                    "parameter, or module_name= naming it"
                )
        if self.distill_weight:
            student = pl_module.get_submodule(self._network_path)
            self._distiller = Distiller(student, self.distill_weight, self.distill_temperature)
            self._attach_distiller(trainer, student)
        self.criterion.setup(graph)
        self._selector = NeuronSelector(graph, self.min_channels)
        self._masks = NeuronMasks(graph)
        self._cost = CostModel(network, example, graph, prefix)
        self.graph = graph
        all_alive = torch.ones(graph.num_neurons, dtype=torch.bool)
        self._alive = all_alive.clone()
        self._initial_prunable = graph.num_prunable
        self.initial_flops, self.initial_params = self._cost.flops(all_alive), self._cost.params(all_alive)
        if self.target_latency_ratio is not None:
            self.latency_table = self._measured_table(trainer, network, example)
            self._latency_selector = LatencySelector(graph, self.latency_table, self.min_channels)
            self.initial_latency = self.latency_table.predict(all_alive)
            self._latency_input = example
            self._check_latency_target(all_alive)
        self._plan(self._selector.max_removable(all_alive), trainer)
        if self._pending_state is not None:
            self._restore(self._pending_state)
            self._pending_state = None
        if self.criterion.data_driven and not self.done:
            self._grads = GateGradients(
                graph.gates.values(), per_sample=self.criterion.per_sample, force_hooks=self.gate_gradient == "hooks"
            )
            self._grads.attach()
        self._last_step = trainer.global_step
        summary, _, causes = graph.describe().partition("\n")  # then why neurons are kept, one line per cause
        plan = f"{self._describe_plan()} ({self.criterion.name})"
        rank_zero_info(f"TaylorPruningCallback: {summary}; {plan}.\n{causes}".rstrip())

    def _measured_table(self, trainer: pl.Trainer, network: nn.Module, example: Any) -> LatencyTable:
        """The latency table: the one given, else the one in a checkpoint being resumed, else measured on rank
        zero and sent to every rank (each rank then takes the same decisions)."""
        saved = (self._pending_state or {}).get("latency_table")
        if self.latency_table is not None or saved is not None:
            return self.latency_table if self.latency_table is not None else LatencyTable.from_state_dict(saved)
        table = None
        if trainer.is_global_zero:
            rank_zero_info("TaylorPruningCallback: measuring the latency table (cached for the next runs)...")
            parameter = next(network.parameters())
            table = LatencyTable.build(network, example, self.graph, batch_size=self.latency_batch_size,
                                       dtype=self.latency_dtype or parameter.dtype, device=parameter.device,
                                       memory_format=self.latency_memory_format,
                                       width_step=self.latency_width_step)  # fmt: skip
        return trainer.strategy.broadcast(table, src=0)

    def _check_latency_target(self, all_alive: torch.Tensor) -> None:
        """Refuse a latency target that even the narrowest widths the table allows do not reach (layers that
        cannot shrink and per-op overhead stay), rather than removing everything prunable and missing it."""
        assert self._latency_selector is not None and self.initial_latency
        fastest = self._latency_selector.select(torch.zeros(all_alive.numel()), all_alive, 0.0)
        floor = self.latency_table.predict(fastest) / self.initial_latency
        if self.target_latency_ratio < floor:
            env = self.latency_table.env
            raise PruningConfigurationError(
                f"target_latency_ratio={self.target_latency_ratio:g} is out of reach: with every layer at the "
                f"narrowest width allowed (min_channels={self.min_channels}, width step "
                f"{self.latency_table.width_step}) the latency table predicts {floor:.3f} of the network's "
                f"{self.initial_latency * 1e3:.2f} ms at batch {env['batch']} on {env['device']} (the rest is "
                f"layers that cannot shrink and per-op overhead). Give target_latency_ratio >= "
                f"{math.ceil(floor * 100) / 100:g}, or a larger latency_batch_size (overhead then weighs less)."
            )

    def _measure_latency(self, trainer: pl.Trainer) -> tuple[float, float]:
        """Seconds of the full-width network and of its compact version, timed in turn as the table times
        (:meth:`LatencyTable.measure`; rank zero, every rank gets rank zero's figures)."""
        alive = self.graph.alive_from_masks(self.compact_masks)
        if self._measured is None or not torch.equal(self._measured[0], alive):
            figures = None
            if trainer.is_global_zero:
                traced = self.graph.modules[self.graph.prefix]  # masked: full width
                small = compact(traced, self.compact_masks, graph=self.graph)
                figures = tuple(self.latency_table.measure([traced, small], self._latency_input))
            self._measured = (alive, *trainer.strategy.broadcast(figures, src=0))
        return self._measured[1], self._measured[2]

    def _latency_missed(self, trainer: pl.Trainer) -> bool:
        """See ``latency_feedback``: True when the measured latency misses the target and pruning goes on with
        the table calibrated on the measurements."""
        if self._latency_input is None or self._feedback_rounds >= self.latency_feedback:
            return False
        self._feedback_rounds += 1
        full, small = self._measure_latency(trainer)
        if small <= (self.target_latency_ratio + 0.02) * full:
            return False
        predicted = self._calibrate(full, small)
        rank_zero_info(
            f"TaylorPruningCallback: measured latency {small / full:.3f} of the full network's (predicted "
            f"{predicted:.3f}, target {self.target_latency_ratio:g}): table calibrated on the measurements, pruning "
            f"goes on (feedback {self._feedback_rounds} of {self.latency_feedback})."
        )
        return True

    def _calibrate_on_the_way(self, trainer: pl.Trainer) -> None:
        """See ``latency_feedback``: when the predicted latency falls halfway from the last measurement (at
        first the full network) to the target, measure; if the network is faster than predicted, calibrate
        the table on the measurements, so that the remaining steps do not remove too much. The next
        measurement comes halfway from there."""
        if self._latency_input is None or len(self._approach) >= self.latency_feedback:
            return
        target = self.target_latency_ratio
        halfway = target + (1 - target) / 2 ** (len(self._approach) + 1)
        predicted = self.latency_table.predict(self._alive) / self.initial_latency
        if predicted > halfway or predicted <= target:  # reaching the target is checked by _latency_missed
            return
        full, small = self._measure_latency(trainer)
        self._approach.append(small / full)
        faster = small / full < predicted
        if faster:
            self._calibrate(full, small)
        rank_zero_info(
            f"TaylorPruningCallback: on the way to the latency target, measured {small / full:.3f} of the full "
            f"network's (predicted {predicted:.3f}): "
            + ("table calibrated on the measurements." if faster else "left to the check at the target.")
        )

    def _calibrate(self, full: float, small: float) -> float:
        """Calibrate the table through the measured seconds of the full-width and the compact network; the
        predicted latency ratio before."""
        assert self._measured is not None
        predicted = self.latency_table.predict(self._measured[0]) / self.initial_latency
        self.latency_table = self.latency_table.calibrated(self._measured[0], small, full)
        self._latency_selector = LatencySelector(self.graph, self.latency_table, self.min_channels)
        self.initial_latency = self.latency_table.predict(torch.ones_like(self._alive))
        return predicted

    def _log_measured_latency(self, trainer: pl.Trainer) -> None:
        """With a latency target, when pruning ends: log the compact network's measured latency beside the
        prediction."""
        if self._latency_input is None or self.latency_table is None:
            return
        full, small = self._measure_latency(trainer)
        self.measured_latency = small
        predicted = self.latency_table.predict(self._measured[0])
        rank_zero_info(
            f"TaylorPruningCallback: compact network latency at batch {self.latency_table.env['batch']}: measured "
            f"{small * 1e3:.2f} ms, predicted {predicted * 1e3:.2f} ms; {small / full:.3f} of the full-width "
            f"network's {full * 1e3:.2f} ms measured with it (target {self.target_latency_ratio:g})."
        )
        if trainer.is_global_zero:
            metrics = {"pruning/latency_measured_s": small, "pruning/latency_measured_kept": small / full}
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=trainer.global_step)

    def _attach_distiller(self, trainer: pl.Trainer, network: nn.Module) -> None:
        """The distillation gradient on ``network``'s output, scaled like the loss' gradient (AMP scale,
        accumulation)."""
        if self._distiller is not None:
            self._distiller.attach(network, lambda: _loss_scale(trainer) / trainer.accumulate_grad_batches)

    def _describe_plan(self) -> str:
        costs = [f"{r:g}x the {what}" for r, what in ((self.target_flops_ratio, "FLOPs"),
                 (self.target_latency_ratio, "predicted latency")) if r is not None]  # fmt: skip
        what = (f"down to {' and '.join(costs)}" if costs and self.keep_ratio is None and self.num_to_prune is None
                else f"{self._target} neurons")  # fmt: skip
        if self._num_pruning_steps:
            return (f"removing {what} in {self._num_pruning_steps} pruning steps, one every "
                    f"{self.prune_every_n_batches} optimizer steps ({self.schedule} schedule)")  # fmt: skip
        return f"removing {what}, {self._step_size} neurons every {self.prune_every_n_batches} optimizer steps"

    def _plan(self, max_removable: int, trainer: pl.Trainer) -> None:
        prunable = self._initial_prunable
        if self.keep_ratio is not None:
            self._target = prunable - round(self.keep_ratio * prunable)
        elif self.num_to_prune is not None:
            self._target = self.num_to_prune
        else:  # the FLOPs target alone: as far as the per-layer floor allows
            self._target = max_removable
        if isinstance(self.neurons_per_step, float):
            self._step_size = max(1, round(self.neurons_per_step * prunable))
        else:
            self._step_size = self.neurons_per_step
        if self._target < 1:
            raise PruningConfigurationError(
                f"impossible target: keep_ratio={self.keep_ratio} of {prunable} prunable neurons removes none"
            )
        if self._target > max_removable:
            raise PruningConfigurationError(
                f"impossible target: {self._target} neurons to remove, but at most {max_removable} of the "
                f"{prunable} prunable neurons can go while every layer keeps min_channels={self.min_channels}"
            )
        if self.pruning_steps is not None:
            self._num_pruning_steps = _pruning_step_count(self.pruning_steps, self.prune_every_n_batches, trainer)

    def _goal(self) -> tuple[int, float | None, float | None]:
        """What the next pruning step removes up to: neurons, and the FLOPs and latency ratios (None: no such
        target)."""
        latency = self.target_latency_ratio
        if not self._num_pruning_steps:
            if latency is not None:  # falls by the step's fraction of the prunable neurons
                latency = max(latency, 1 - (self._pruning_step + 1) * self._step_size / self._initial_prunable)
            return min(self.num_pruned + self._step_size, self._target), self.target_flops_ratio, latency
        share = schedule_share(self.schedule, self._pruning_step + 1, self._num_pruning_steps)
        neurons = self._target if share >= 1 else math.floor(share * self._target)  # the target at step P
        if self.keep_ratio is None and self.num_to_prune is None and self._cost_targets():
            neurons = self._target  # as many as the FLOPs and latency shares take
        if share >= 1:  # the targets themselves (1 - (1 - r) need not give r back in floating point)
            return neurons, self.target_flops_ratio, latency
        flops = None if self.target_flops_ratio is None else 1 - share * (1 - self.target_flops_ratio)
        latency = None if latency is None else 1 - share * (1 - latency)
        return neurons, flops, latency

    def _cost_targets(self) -> bool:
        return self.target_flops_ratio is not None or self.target_latency_ratio is not None

    # -- importance accumulation -----------------------------------------------------------------------------
    @override
    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._grads is not None and not self.done:
            self._grads.collect(scale=_loss_scale(trainer), world_size=trainer.world_size)

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if self._grads is not None and not self.done and self._grads.finish(trainer.world_size):
            scores = self.criterion.step_scores(self._grads)
            finite = torch.stack([s.isfinite().all() for s in scores.values()]).all()
            for name, value in scores.items():
                value = torch.where(finite, value, torch.zeros_like(value))
                self._interval_sum[name] = self._interval_sum[name] + value if name in self._interval_sum else value
            self._interval_count = self._interval_count + finite.long()
        if self._grads is not None:
            self._grads.reset()
        if self.num_pruned and not self.compacted:
            self._masks.zero_gradients()

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.graph is None:
            return
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if isinstance(loss, torch.Tensor):
            self._loss = self._smoothed_loss(loss.detach().float())
        if trainer.global_step != self._last_step:  # else accumulating gradients: no optimizer step yet
            self._last_step = trainer.global_step
            if self.num_pruned and not self.compacted:
                self._masks.zero_parameters()  # any optimizer, any update rule: removed weights stay zero
            if not self.done:
                self._steps_in_interval += 1
                if self._steps_in_interval >= self.prune_every_n_batches:
                    self._prune_step(trainer, pl_module)
        self._log_state(trainer, pl_module)

    def _smoothed_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """The moving average with ``loss`` in it, unless it is not finite (then unchanged: one ``inf`` must
        not poison every later value); a non-finite average restarts from the next finite loss. No sync."""
        if self._loss is None:
            return loss
        past = self._loss.to(loss.device)
        blended = torch.where(past.isfinite(), self.loss_smoothing * past + (1 - self.loss_smoothing) * loss, loss)
        return torch.where(loss.isfinite(), blended, past)

    # -- pruning ---------------------------------------------------------------------------------------------
    def _prune_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        assert self.graph is not None and self._alive is not None
        steps, self._steps_in_interval = self._steps_in_interval, 0
        if self.criterion.data_driven:
            counted = int(self._interval_count)
            if counted < steps:
                rank_zero_warn(f"{steps - counted} of the last {steps} steps had a non-finite importance; skipped them.")
            if counted == 0:
                return
            average = {n: (s / counted).cpu() for n, s in self._interval_sum.items()}
            self._interval_sum, self._interval_count = {}, 0
            self.importance = (
                {n: self.ema * self.importance[n] + (1 - self.ema) * average[n] for n in average}
                if self.importance
                else average
            )
        else:
            self.importance = self.criterion.static_scores(self.graph)
        if self._loss is not None and trainer.world_size > 1:
            # the smoothed loss of the global batch (the moving average is linear: mean over ranks)
            self._loss = mean_over_ranks(trainer, self._loss)
        loss = None if self._loss is None else float(self._loss)
        if loss is not None and not math.isfinite(loss):
            loss = None  # no finite loss seen yet (on some rank): unknown, max_loss can't judge it
        goal_neurons, goal_flops, goal_latency = self._goal()
        self._pruning_step += 1
        count = goal_neurons - self.num_pruned
        if count <= 0:  # a schedule's share that rounds to no new neuron: importance keeps accumulating
            return
        if self.max_loss is not None and loss is not None and loss > self.max_loss:
            stop = True
            chosen = torch.empty(0, dtype=torch.long)
        else:
            chosen = self._choose(neuron_scores(self.graph, self.importance), count, goal_flops, goal_latency)
            stop = False
        # one decision for every rank (rank zero's), even if floating point ever differed between them
        chosen, stop = broadcast_decision(trainer, chosen, stop, count)
        if stop:
            self._finish(trainer, f"smoothed training loss {loss:.4f} exceeded max_loss={self.max_loss}")
            return
        if chosen.numel():
            self._remove(trainer, chosen, loss)
            self._calibrate_on_the_way(trainer)
        if self.num_pruned >= self._target:
            self._finish(trainer, "target reached")
            return
        reached = self._cost_targets_reached()
        if reached and self._latency_missed(trainer):
            reached = None  # the table, calibrated on measurements, says the target is not met yet
        if reached:
            self._finish(trainer, reached)
        elif not chosen.numel() and goal_latency == self.target_latency_ratio and goal_flops == self.target_flops_ratio:
            self._finish(trainer, "no neuron can go without emptying a layer below min_channels: target not reached")

    def _choose(self, scores: torch.Tensor, count: int, goal_flops: float | None, goal_latency: float | None) -> torch.Tensor:
        """The neurons this step removes, lowest scores first: at most ``count``, the most important kept
        under the latency goal, then as few more as the FLOPs goal takes."""
        assert self._alive is not None
        if goal_latency is None or self._latency_selector is None or self.initial_latency is None:
            return self._trim_to_flops_target(self._selector.select(scores, self._alive, count), goal_flops)
        keep = self._latency_selector.select(scores, self._alive, goal_latency * self.initial_latency)
        chosen = torch.nonzero(self._alive & ~keep).flatten()
        chosen = chosen[torch.sort(scores[chosen], stable=True).indices][:count]
        if goal_flops is None or len(chosen) >= count:
            return chosen
        left = self._alive.clone()
        left[chosen] = False
        if self._cost.flops(left) <= goal_flops * self.initial_flops:
            return chosen
        more = self._selector.select(scores, left, count - len(chosen))
        return self._trim_to_flops_target(torch.cat([chosen, more]), goal_flops, len(chosen))

    def _cost_targets_reached(self) -> str | None:
        """Why pruning is over when every FLOPs and latency target given is met, else None."""
        if not self._cost_targets() or not self.history:
            return None
        names, parts = [], []
        if self.target_flops_ratio is not None:
            ratio = self.history[-1].flops / self.initial_flops
            if ratio > self.target_flops_ratio:
                return None
            names.append("FLOPs")
            parts.append(f"{ratio:.3f} <= {self.target_flops_ratio}")
        if self.target_latency_ratio is not None:  # the table now (calibrated perhaps since the last record)
            ratio = self.latency_table.predict(self._alive) / self.initial_latency
            if ratio > self.target_latency_ratio:
                return None
            names.append("latency")
            parts.append(f"predicted {ratio:.3f} <= {self.target_latency_ratio}")
        return f"{' and '.join(names)} target{'s' if len(names) > 1 else ''} reached ({', '.join(parts)})"

    def _trim_to_flops_target(self, chosen: torch.Tensor, ratio: float | None, least: int = 0) -> torch.Tensor:
        """The shortest prefix of ``chosen`` (lowest scores first, the first ``least`` always) that brings the
        FLOPs down to ``ratio`` of the initial FLOPs, or all of it: the target is met, not overshot by the rest
        of a step."""
        if ratio is None or not self.initial_flops or chosen.numel() <= max(1, least):
            return chosen
        budget = ratio * self.initial_flops
        priority = self._revival_priority()
        priority[chosen] = len(self.history) + 1  # as the record of this step will say

        def flops(k: int) -> float:
            alive = self._alive.clone()
            alive[chosen[:k]] = False
            if self.compact_round_to is not None:
                alive = round_alive(self.graph, alive, self.compact_round_to, priority)
            return self._cost.flops(alive)

        return chosen[: least + fewest_reaching(lambda k: flops(least + k), chosen.numel() - least, budget)]

    def _remove(self, trainer: pl.Trainer, chosen: torch.Tensor, loss: float | None) -> None:
        assert self.graph is not None and self._alive is not None
        self._alive[chosen] = False
        self.num_pruned += chosen.numel()
        self._masks.update(~self._alive)
        self._masks.zero_parameters()
        self._masks.zero_gradients()  # those of this step's backward, which held them still
        self._masks.zero_optimizer_state(trainer.optimizers)
        removed_set = set(chosen.tolist())
        removed = [
            {"layer": name, "index": c}
            for name, gate in self.graph.gates.items()
            for c, n in enumerate(gate.neurons.tolist())
            if n in removed_set
        ]
        record = PruningRecord(
            step=trainer.global_step,
            epoch=trainer.current_epoch,
            neurons_removed=chosen.numel(),
            neurons_pruned=self.num_pruned,
            neurons_remaining=self.neurons_remaining,
            loss=loss,
            flops=0,
            params=0,
            removed=removed,
        )
        self.history.append(record)  # first: rounding widths reads the removal order from the history
        compact_alive = self._compact_alive()
        record.flops, record.params = self._cost.flops(compact_alive), self._cost.params(compact_alive)
        if self.latency_table is not None and self.initial_latency is not None:
            record.latency = self.latency_table.predict(compact_alive)
        self._log(trainer, record)

    def _compact_alive(self) -> torch.Tensor:
        """The neurons the compact model keeps: the alive ones, plus those ``compact_round_to`` revives."""
        assert self.graph is not None and self._alive is not None
        if self.compact_round_to is None:
            return self._alive
        return round_alive(self.graph, self._alive, self.compact_round_to, self._revival_priority())

    def _revival_priority(self) -> torch.Tensor:
        """Per neuron, the pruning step that removed it: rounding widths up revives the neurons removed last
        (the most important when they went) first. Built from the history, so every rank agrees."""
        assert self.graph is not None
        priority = torch.zeros(self.graph.num_neurons, dtype=torch.float64)
        for step, record in enumerate(self.history, start=1):
            for entry in record.removed:
                priority[self.graph.gates[entry["layer"]].neurons[entry["index"]]] = step
        return priority

    def _finish(self, trainer: pl.Trainer, reason: str) -> None:
        self.done = True
        self.stop_reason = reason
        if self.reset_momentum:
            reset_optimizer_state(trainer.optimizers)
        if self._grads is not None:
            self._grads.detach()
        self.criterion.detach()  # hooks of criteria that record activations are no longer needed
        self._interval_sum, self._interval_count = {}, 0
        rank_zero_info(f"TaylorPruningCallback: pruning finished ({reason}) with {self.num_pruned} neurons removed.")
        if self.compact_when_done:
            self._compact_in_fit(trainer)
        self._log_measured_latency(trainer)

    def _compact_in_fit(self, trainer: pl.Trainer) -> None:
        """Replace the masked network by the compact one for the rest of the fit (on every rank)."""
        pl_module = trainer.lightning_module
        masked = pl_module.get_submodule(self._network_path)
        sources = parameter_sources(masked, self.compact)
        small = self.compact()
        replace_network(trainer, pl_module, self._network_path, small, sources)
        self.compacted, self.compact_model = True, small
        self._attach_distiller(trainer, small)
        before, after = (sum(p.numel() for p in m.parameters()) for m in (masked, small))
        rank_zero_info(f"TaylorPruningCallback: training the compact network from here ({before:,} -> {after:,} parameters).")

    def _compact_for_checkpoint(self, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        """Before a checkpoint saved after ``compact_when_done`` loads: compact this (new) network the same way."""
        state = checkpoint.get("callbacks", {}).get(self.state_key) or {}
        if not state.get("compacted") or self.compacted:
            return
        if self.distill_weight and state.get("teacher") is not None:  # the new network is the teacher's shape
            self._distiller = Distiller(pl_module.get_submodule(state["network_path"]), self.distill_weight, self.distill_temperature)
            self._distiller.teacher.load_state_dict(state["teacher"])
        small = compact(pl_module, PruningMasks(state["compact_masks"], state["trace"]))
        put_network(pl_module, state["network_path"], small)
        self.compacted, self.compact_model, self._network_path = True, small, state["network_path"]

    # -- logging ---------------------------------------------------------------------------------------------
    def _log_state(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """The network's size after this batch, through ``self.log`` (so a logger row holds it beside the
        training loss) and, as a whole number, in the progress bar."""
        record = self.history[-1] if self.history else None
        flops = record.flops if record else self.initial_flops
        metrics = {
            "pruning/neurons_pruned": self.num_pruned,
            "pruning/neurons_remaining": self.neurons_remaining,
            "pruning/flops": flops,
            "pruning/params": record.params if record else self.initial_params,
            "pruning/flops_kept": flops / self.initial_flops if self.initial_flops else 1.0,
        }
        if self.initial_latency:
            latency = record.latency if record and record.latency is not None else self.initial_latency
            metrics["pruning/latency_kept"] = latency / self.initial_latency
        pl_module.log_dict(metrics, on_step=True, on_epoch=False, batch_size=1)
        trainer.progress_bar_metrics["neurons"] = self.neurons_remaining  # self.log would make it a float

    def _log(self, trainer: pl.Trainer, record: PruningRecord) -> None:
        """At a pruning step: the channels left in every gated layer (straight to the loggers: too many
        values to log at every step), and the history files."""
        if not trainer.is_global_zero:
            return
        metrics = {f"pruning/channels/{name}": int(mask.sum()) for name, mask in self.masks.items()}
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
        self._write_history(trainer)

    def _write_history(self, trainer: pl.Trainer) -> None:
        if trainer.is_global_zero:
            write_history(self.history, self.history_dir or self._output_dir(trainer))

    def _output_dir(self, trainer: pl.Trainer) -> str:
        """The trainer's log dir, as resolved on every rank in ``setup``."""
        return self._log_dir or trainer.default_root_dir

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.history:
            self._write_history(trainer)
        if self.compact_on_fit_end and self.graph is not None:
            self._compact(trainer)

    def compact(self, model: nn.Module | None = None) -> nn.Module:
        """The compact network: ``model`` (by default the network this callback pruned) without the removed
        neurons, widths rounded as :attr:`compact_masks`. Where the callback traced the LightningModule and
        its parameters all live in one child (``self.net``), the compact model is that child, which fits
        back in as ``lit.net`` for a fine-tuning stage (see :func:`lightning_prune.compact`)."""
        if self.compacted and model is None:
            return self.compact_model  # already the network being trained
        if self.graph is None:
            raise PruningConfigurationError("nothing to compact: the callback has not analysed the network yet")
        traced = self.graph.modules[self.graph.prefix]
        model = traced if model is None else model
        if model is traced and not isinstance(model, pl.LightningModule):
            return compact(model, self.compact_masks, graph=self.graph)
        return compact(model, self.compact_masks)

    def _compact(self, trainer: pl.Trainer) -> None:
        """Cut the removed neurons out of the network (every rank), write it on rank zero."""
        self.compact_model = self.compact()
        if trainer.is_global_zero:
            path = self.compact_path or os.path.join(self._output_dir(trainer), "compact_model.pt")
            self.compact_file = str(save_compact(self.compact_model, path))
            rank_zero_info(f"TaylorPruningCallback: compact model written to {self.compact_file}")

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._distiller is not None:
            self._distiller.detach()
        if self._hook_wrapped:  # the wrapper set in setup
            vars(pl_module).pop("on_load_checkpoint", None)
            self._hook_wrapped = False
        if self._grads is not None:
            self._grads.detach()
        for handle in self._capture_handles:
            handle.remove()
        self._capture_handles.clear()

    # -- checkpointing ---------------------------------------------------------------------------------------
    @override
    def state_dict(self) -> dict[str, Any]:
        if self.graph is None:
            return dict(self._pending_state or {})
        return {
            "alive": self._alive.clone(),
            "importance": {n: v.clone() for n, v in self.importance.items()},
            "interval_sum": {n: v.detach().cpu().clone() for n, v in self._interval_sum.items()},
            "interval_count": int(self._interval_count),
            "steps_in_interval": self._steps_in_interval,
            "pruning_step": self._pruning_step,
            "num_pruned": self.num_pruned,
            "initial_prunable": self._initial_prunable,
            "done": self.done,
            "stop_reason": self.stop_reason,
            "loss": None if self._loss is None else float(self._loss),
            "history": [r.as_dict() for r in self.history],
            "criterion": self.criterion.state_dict(),
            # for a process that loads this state without fitting (ddp_spawn's launcher, an analysis script)
            "masks": {n: m.cpu() for n, m in self.masks.items()},
            "compact_masks": {n: m.cpu() for n, m in self.compact_masks.items()},
            "trace": self.masks.trace,
            "compacted": self.compacted,
            "network_path": self._network_path,
            "latency_table": None if self._latency_selector is None else self.latency_table.state_dict(),
            "feedback_rounds": self._feedback_rounds,
            "latency_approach": list(self._approach),
            # the teacher is the network before pruning: a resumed run must not distil from a pruned one
            "teacher": None if self._distiller is None else {k: v.cpu() for k, v in self._distiller.teacher.state_dict().items()},
        }

    @override
    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        """Warn when the checkpoint's pruning state belongs to another criterion or gate placement: its state
        key differs, so Lightning would silently hand this callback nothing and pruning would restart."""
        states = checkpoint.get("callbacks", {})
        others = [k for k in states if k.startswith(type(self).__qualname__) and k != self.state_key]
        if others and self.state_key not in states:
            rank_zero_warn(
                f"the checkpoint holds the pruning state of {', '.join(others)}, not of this callback "
                f"({self.state_key}): pruning restarts from scratch with this criterion and placement. The "
                "neurons pruned before are zero in the weights but no longer tracked; resume with the same "
                "criterion and gate_placement to continue where the run stopped."
            )

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict:
            return
        if state_dict.get("compacted"):  # the network is compact already: keep the state as a record
            self._pending_state = dict(state_dict)
            self.num_pruned, self.done, self.stop_reason = state_dict["num_pruned"], True, state_dict["stop_reason"]
            self.history = [PruningRecord(**r) for r in state_dict["history"]]
            self.importance = dict(state_dict["importance"])
            return
        if self.graph is None:
            self._pending_state = dict(state_dict)
        else:
            self._restore(state_dict)

    def _restore(self, state: dict[str, Any]) -> None:
        assert self.graph is not None
        alive = state["alive"]
        if alive.numel() != self.graph.num_neurons or state["initial_prunable"] != self._initial_prunable:
            raise PruningConfigurationError(
                f"checkpoint pruning state has {alive.numel()} neurons but this network has "
                f"{self.graph.num_neurons}: it was saved for a different model or callback configuration"
            )
        device = next(iter(self.graph.gates.values())).module.weight.device
        self._alive = alive.clone().bool()
        self.importance = {n: v.clone() for n, v in state["importance"].items()}
        self._interval_sum = {n: v.to(device) for n, v in state["interval_sum"].items()}
        self._interval_count = state["interval_count"]
        self._steps_in_interval = state["steps_in_interval"]
        self._pruning_step = state.get("pruning_step", len(self.history))
        self._feedback_rounds = state.get("feedback_rounds", 0)
        self._approach = list(state.get("latency_approach", []))
        self.num_pruned = state["num_pruned"]
        self.done = state["done"]
        self.stop_reason = state["stop_reason"]
        self._loss = None if state["loss"] is None else torch.tensor(state["loss"])
        self.history = [PruningRecord(**r) for r in state["history"]]
        self.criterion.load_state_dict(state["criterion"])
        if self._distiller is not None and state.get("teacher") is not None:
            self._distiller.teacher.load_state_dict(state["teacher"])
        self._masks.update(~self._alive)
        self._masks.zero_parameters()


def schedule_share(schedule: str, step: int, steps: int) -> float:
    """The share of the target removed after pruning step ``step`` of ``steps`` (1 from the last on)."""
    t = min(step / steps, 1.0)
    return 1 - (1 - t) ** 3 if schedule == "cubic" else t


def _pruning_step_count(pruning_steps: int | float, every: int, trainer: pl.Trainer) -> int:
    """P, the pruning steps that fit in ``pruning_steps`` optimizer steps (a fraction of the fit's)."""
    if isinstance(pruning_steps, float):
        total = trainer.estimated_stepping_batches
        if not math.isfinite(total):
            raise PruningConfigurationError(
                "pruning_steps as a fraction needs a finite training length: set max_steps or max_epochs, or "
                "give pruning_steps as a number of optimizer steps"
            )
        pruning_steps = max(1, round(pruning_steps * total))
    return max(1, pruning_steps // every)


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise PruningConfigurationError(message)


def _torch_attribute(value: Any, kind: type, argument: str, example: str) -> Any:
    """``value`` if it is a ``kind`` (``torch.dtype``, ``torch.memory_format``), else the ``torch`` attribute it
    names (``"channels_last"``, ``"torch.bfloat16"``: what a Hydra config holds)."""
    if isinstance(value, kind):
        return value
    resolved = getattr(torch, value.removeprefix("torch."), None) if isinstance(value, str) else None
    _check(isinstance(resolved, kind),
           f"{argument} must be a {kind.__module__}.{kind.__name__} or its name (e.g. {example!r}), got {value!r}")
    return resolved


def _has_module(pl_module: pl.LightningModule, network: str, name: str) -> bool:
    """Whether ``name`` is a module of the network at ``network`` (with or without that prefix)."""
    root = pl_module.get_submodule(network) if network else pl_module
    prefix = f"{network}." if network else ""
    try:
        module_names(root, [name], prefix)
    except PruningConfigurationError:
        return False
    return True


def _forward_redirected(module: nn.Module) -> bool:
    """Whether ``module.forward`` is Lightning's redirection of a ``*_step`` call (DDP and other wrapping
    strategies call ``training_step`` through the wrapped LightningModule's patched ``forward``)."""
    return getattr(module.forward, "__func__", None) is not type(module).forward


def _loss_scale(trainer: pl.Trainer) -> float:
    """The AMP loss scale the gradients carry right after backward (1 without a grad scaler)."""
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    if scaler is None or not scaler.is_enabled():
        return 1.0
    scale = scaler.get_scale()
    return scale if math.isfinite(scale) and scale > 0 else 1.0
