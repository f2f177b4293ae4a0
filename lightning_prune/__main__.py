"""``lightning-prune`` / ``python -m lightning_prune``: the Hydra app over ``conf/`` and ``recipes/``.

    lightning-prune                                   # the small default recipe, a few minutes on a CPU
    lightning-prune recipe=cifar10_resnet56           # a recipe from recipes/
    lightning-prune recipe=cifar10_lenet3 --cfg job   # show the composed configuration (resolved)
    lightning-prune --help                            # config groups, recipes and the default configuration
    lightning-prune -m recipe=cifar10_lenet3 pruning.criterion=taylor_fo_bn,weight_norm,random seed=0,1,2
    lightning-prune-report multirun/cifar10_lenet3/<date>   # aggregate a sweep
"""

from __future__ import annotations

import sys

import hydra
from hydra._internal.utils import get_args_parser
from omegaconf import DictConfig

from lightning_prune.app.config import CONFIG_NAME, config_dir, register_resolvers


def _app(cfg: DictConfig) -> float | None:
    from hydra.core.hydra_config import HydraConfig

    from lightning_prune.app.run import run

    metrics = run(cfg, HydraConfig.get().runtime.output_dir)
    final = metrics.get("final", {})
    return final.get("top1")


def _prints_job_config(argv: list[str]) -> bool:
    """Whether Hydra will print the job's configuration (``--help``, ``--cfg job|all``) without resolving
    it. ``--cfg hydra`` is left alone: Hydra cannot resolve that section without the job's keys."""
    args = get_args_parser().parse_args(argv)
    return (args.help or args.cfg in ("job", "all")) and not args.resolve


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "report":  # `lightning-prune report DIR` == lightning-prune-report DIR
        from lightning_prune.app.report import main as report_main

        sys.argv = [f"{sys.argv[0]} report", *sys.argv[2:]]
        report_main()
        return
    if _prints_job_config(sys.argv[1:]):
        sys.argv.append("--resolve")  # show the real paths, not ${lp.data_dir:}
    register_resolvers()
    hydra.main(version_base="1.3", config_path=str(config_dir()), config_name=CONFIG_NAME)(_app)()


if __name__ == "__main__":
    main()
