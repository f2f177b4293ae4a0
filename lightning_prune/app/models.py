"""Model factories the recipes build with ``_target_``: the CIFAR models of ``lightning_prune.models`` with
their shared pretrained weights, and torchvision ImageNet models whose weights come from a local file
or the torchvision cache (never downloaded)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import torch
import torchvision
from torch import nn

from lightning_prune import models as lp_models
from lightning_prune.data import shared_data_dir

TORCHVISION_ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "vgg11_bn", "densenet201")


def _pretrained_dir(pretrained_dir: str | os.PathLike | None) -> Path:
    return Path(pretrained_dir) if pretrained_dir is not None else shared_data_dir() / "pretrained"


def find_cifar_resnet_weights(depth: int, pretrained_dir: str | os.PathLike | None = None) -> Path:
    """The shared checkpoint ``resnet{depth}-<hash>.th`` under ``pretrained_dir`` (default: shared data)."""
    folder = _pretrained_dir(pretrained_dir)
    matches = sorted(folder.glob(f"resnet{depth}-*.th"))
    if not matches:
        raise FileNotFoundError(
            f"no pretrained CIFAR ResNet-{depth} weights (resnet{depth}-*.th) in {folder}. Set "
            "LIGHTNING_PRUNE_DATA (or paths.data_dir=...) to the folder holding pretrained/, give "
            f"model.pretrained=/path/to/resnet{depth}.th, or train from scratch with model.pretrained=false."
        )
    return matches[0]


def cifar_resnet(
    depth: int = 20,
    pretrained: bool | str | os.PathLike | None = True,
    pretrained_dir: str | os.PathLike | None = None,
    num_classes: int = 10,
) -> nn.Module:
    """CIFAR ResNet-``depth`` (20/32/44/56/...). ``pretrained``: ``True`` loads the shared checkpoint of
    that depth from ``pretrained_dir``, a path loads that file, ``False``/``None`` keeps random weights."""
    model = lp_models.CifarResNet(depth, num_classes)
    if pretrained is True:
        pretrained = find_cifar_resnet_weights(depth, pretrained_dir)
    if pretrained:
        lp_models.load_cifar_resnet_weights(model, pretrained)
    return model


def lenet3(num_classes: int = 10, pretrained: str | os.PathLike | None = None) -> nn.Module:
    model = lp_models.LeNet3(num_classes)
    if pretrained:
        load_state_dict_file(model, pretrained)
    return model


def preact_resnet18(num_classes: int = 10, pretrained: str | os.PathLike | None = None) -> nn.Module:
    model = lp_models.preact_resnet18(num_classes)
    if pretrained:
        load_state_dict_file(model, pretrained)
    return model


def load_state_dict_file(model: nn.Module, path: str | os.PathLike, strict: bool = True) -> nn.Module:
    """Load a ``state_dict`` (or a checkpoint holding ``state_dict``, Lightning's included) into ``model``.
    Prefixes ``module.`` (DataParallel) and ``model.`` (our LightningModule) are stripped."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    model.load_state_dict(_read_state_dict(path), strict=strict)
    return model


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The ``state_dict`` in ``path`` (unwrapped from a checkpoint), with wrapper prefixes stripped."""
    state = torch.load(path, map_location="cpu", weights_only=False)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    return {_strip(k): v for k, v in state.items()}


def _strip(key: str) -> str:
    for prefix in ("module.", "model."):
        key = key.removeprefix(prefix)
    return key


# ---------------------------------------------------------------------------------------------------- ImageNet
def vgg11_bn_no_dropout(num_classes: int = 1000) -> nn.Module:
    """torchvision ``vgg11_bn`` with the classifier's dropout replaced by BatchNorm, as in Molchanov et al.
    (2019): ``Linear-BN-ReLU, Linear-BN-ReLU, Linear``. The Linear layers keep torchvision's names
    (``classifier.0``, ``classifier.3``, ``classifier.6``) so torchvision weights load into them."""
    model = torchvision.models.vgg11_bn(num_classes=num_classes)
    model.classifier = nn.Sequential(
        nn.Linear(512 * 7 * 7, 4096),  # 0
        nn.BatchNorm1d(4096),  # 1
        nn.ReLU(inplace=True),  # 2
        nn.Linear(4096, 4096),  # 3
        nn.BatchNorm1d(4096),  # 4
        nn.ReLU(inplace=True),  # 5
        nn.Linear(4096, num_classes),  # 6
    )
    return model


_BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "vgg11_bn": vgg11_bn_no_dropout,
}


def _torchvision_weights(arch: str):
    """torchvision's default (V1: the weights the paper started from) ImageNet weights enum entry."""
    return torchvision.models.get_model_weights(arch)["IMAGENET1K_V1"]


def torchvision_cache_file(arch: str) -> Path:
    """Where torchvision keeps ``arch``'s ImageNet weights once downloaded (``$TORCH_HOME/hub/checkpoints``)."""
    url = _torchvision_weights(arch).url
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)


def torchvision_model(
    arch: str,
    weights: str | os.PathLike | None = None,
    num_classes: int = 1000,
) -> nn.Module:
    """A torchvision ImageNet classifier (``vgg11_bn`` without dropout, see :func:`vgg11_bn_no_dropout`).

    ``weights``: ``None`` for random initialisation; ``"torchvision"`` for the ImageNet weights already in
    the torchvision cache (an error, never a download, if they are not there); or the path of a
    ``state_dict`` file. Weights with another class count load all but the last layer.
    """
    if arch not in TORCHVISION_ARCHS:
        raise ValueError(f"unknown architecture {arch!r}; choose from {', '.join(TORCHVISION_ARCHS)}")
    builder = _BUILDERS.get(arch, getattr(torchvision.models, arch))
    model = builder(num_classes=num_classes)
    if weights is None or weights is False:
        return model
    if str(weights) == "torchvision":
        path = torchvision_cache_file(arch)
        if not path.is_file():
            raise FileNotFoundError(
                f"torchvision's ImageNet weights for {arch} are not in the cache ({path}); nothing is downloaded. "
                f"Fetch them once with: python -c \"import torchvision; torchvision.models.{arch}"
                f"(weights='IMAGENET1K_V1')\", or give model.weights=/path/to/{os.path.basename(path)}."
            )
    else:
        path = Path(weights)
        if not path.is_file():
            raise FileNotFoundError(f"weights file not found: {path} (model.weights)")
    state = _read_state_dict(path)
    if arch == "densenet201":
        state = _densenet_legacy_keys(state)
    own = model.state_dict()
    mismatched = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    for k in mismatched:  # e.g. a 1000-class head into a 10-class model
        del state[k]
    missing, unexpected = model.load_state_dict(state, strict=False)
    allowed_missing = set(mismatched) | ({k for k in own if k.startswith(("classifier.1.", "classifier.4."))}
                                         if arch == "vgg11_bn" else set())  # fmt: skip
    bad = [k for k in missing if k not in allowed_missing]
    if bad or unexpected:
        raise RuntimeError(f"{path} does not fit {arch}: missing {bad[:5]}, unexpected {list(unexpected)[:5]}")
    return model


def _densenet_legacy_keys(state: dict) -> dict:
    """Old torchvision DenseNet checkpoints name ``norm.1`` what the model calls ``norm1``."""
    import re

    pattern = re.compile(r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$")
    out = {}
    for key, value in state.items():
        m = pattern.match(key)
        out[m.group(1) + m.group(2) if m else key] = value
    return out
