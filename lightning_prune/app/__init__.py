"""The ``lightning-prune`` Hydra application: data modules, model factories, the LightningModule,
the pipeline (``run``), plots and the sweep report."""

from lightning_prune.app.datamodules import (
    CIFAR10DataModule,
    CIFAR10JPEGDataModule,
    DataNotFoundError,
    ImageFolderDataModule,
    ImageNetDataModule,
    SyntheticDataModule,
)
from lightning_prune.app.lightning_module import ClassificationModule
from lightning_prune.app.run import Pipeline, run

__all__ = [
    "CIFAR10DataModule",
    "CIFAR10JPEGDataModule",
    "ClassificationModule",
    "DataNotFoundError",
    "ImageFolderDataModule",
    "ImageNetDataModule",
    "Pipeline",
    "SyntheticDataModule",
    "run",
]
