"""Studies from the command line, configured with Hydra overrides.

    python -m lightning_prune.study correlation model=resnet20 images=1024
    python -m lightning_prune.study curve model=lenet3 'criteria=[oracle,taylor_fo_bn,random]' seeds=[0,1]
    python -m lightning_prune.study curve --config-name label_free
    python -m lightning_prune.study layer model=lenet3 layer=conv1

The defaults live in ``lightning_prune/study/conf/<study>.yaml``; outputs (JSON, Markdown, PNG) go to
``out_dir``.
"""

from __future__ import annotations

import sys

import torch
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

STUDIES = ("correlation", "curve", "layer")
HELP = ("-h", "--help")
USAGE = f"usage: python -m lightning_prune.study {{{','.join(STUDIES)}}} [--config-name NAME] [key=value ...]"


def main(argv: list[str] | None = None) -> dict:
    """Run a study; with ``-h``/``--help``, print the usage and the study's configuration and exit."""
    argv = list(sys.argv[1:] if argv is None else argv)
    show_help = any(arg in HELP for arg in argv)
    argv = [arg for arg in argv if arg not in HELP]  # the rest are Hydra overrides: compose() knows no flags
    if not argv or argv[0] not in STUDIES:
        print(__doc__)
        raise SystemExit(0 if show_help else USAGE)
    study, overrides = argv[0], argv[1:]
    config_name = study
    for arg in list(overrides):  # --config-name NAME: another config of the study (e.g. label_free)
        if arg.startswith("--config-name"):
            i = overrides.index(arg)
            config_name = arg.split("=", 1)[1] if "=" in arg else overrides.pop(i + 1)
            overrides.remove(arg)
    with initialize_config_module(config_module="lightning_prune.study.conf", version_base=None):
        cfg = compose(config_name=config_name, overrides=overrides)
    if show_help:
        print(f"{USAGE}\n\nThe `{config_name}` configuration of the {study} study (override any key with key=value):\n")
        print(OmegaConf.to_yaml(cfg, resolve=True))
        raise SystemExit(0)
    print(OmegaConf.to_yaml(cfg), flush=True)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    if study == "correlation":
        from lightning_prune.study.correlation import run_correlation

        report = run_correlation(cfg)
    elif study == "layer":
        from lightning_prune.study.layer import run_layer

        report = run_layer(cfg)
    else:
        from lightning_prune.study.curve import run_curve

        report = run_curve(cfg)
    print(f"wrote {cfg.out_dir}/{study}.json, .md and .png", flush=True)
    return report


if __name__ == "__main__":
    main()
