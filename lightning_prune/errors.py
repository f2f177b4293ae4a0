"""Exceptions raised for invalid pruning set-ups, before any training step runs."""


class PruningConfigurationError(ValueError):
    """The callback's arguments, the model or the trainer cannot be pruned as asked."""


class UnsupportedModelError(PruningConfigurationError):
    """The model cannot be analysed (not traceable, no prunable layer...)."""


class UnsupportedStrategyError(PruningConfigurationError):
    """The trainer's strategy shards parameters in a way the callback does not support."""
