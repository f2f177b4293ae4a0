"""Where the Hydra configuration lives, and the resolvers the configs use."""

from __future__ import annotations

import os
from pathlib import Path

from omegaconf import OmegaConf

import lightning_prune
from lightning_prune.data import default_cache_dir, shared_data_dir

CONFIG_NAME = "config"


def config_dir() -> Path:
    """The ``conf/`` folder: ``$LIGHTNING_PRUNE_CONFIG_DIR`` if set, else the one next to the package
    (the repository checkout, as installed with ``pip install -e .``). ``conf/recipe`` links to ``recipes/``."""
    env = os.environ.get("LIGHTNING_PRUNE_CONFIG_DIR")
    candidates = [Path(env)] if env else []
    candidates.append(Path(lightning_prune.__file__).resolve().parents[1] / "conf")
    for path in candidates:
        if (path / f"{CONFIG_NAME}.yaml").is_file():
            return path
    raise FileNotFoundError(
        f"lightning-prune's Hydra configuration not found (looked in {', '.join(map(str, candidates))}). "
        "Install the project from its repository with `pip install -e .`, or set LIGHTNING_PRUNE_CONFIG_DIR "
        "to the repository's conf/ folder."
    )


def recipes_dir() -> Path:
    return config_dir() / "recipe"


def available_recipes() -> list[str]:
    return sorted(p.stem for p in recipes_dir().glob("*.yaml"))


def _data_dir() -> str:
    """``$LIGHTNING_PRUNE_DATA``, else ``../shared/data`` from the working directory, else from the repository."""
    path = shared_data_dir()
    if "LIGHTNING_PRUNE_DATA" not in os.environ and not path.is_dir():
        repo_relative = Path(lightning_prune.__file__).resolve().parents[2] / "shared" / "data"
        if repo_relative.is_dir():
            return str(repo_relative)
    return str(path)


def register_resolvers() -> None:
    """``${lp.data_dir:}`` and ``${lp.cache_dir:}`` for the configs."""
    if not OmegaConf.has_resolver("lp.data_dir"):
        OmegaConf.register_new_resolver("lp.data_dir", _data_dir)
    if not OmegaConf.has_resolver("lp.cache_dir"):
        OmegaConf.register_new_resolver("lp.cache_dir", lambda: str(default_cache_dir()))
