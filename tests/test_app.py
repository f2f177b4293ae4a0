"""The Hydra app: every recipe composes, the ImageNet recipes run a few steps on synthetic ImageNet-shaped
data with their real architectures, the default and cifar10_lenet3 recipes run end to end on a small real
subset, multirun + report, data modules, model factories and error messages."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
import hydra
from hydra import compose, initialize_config_dir
from PIL import Image
from helpers import fake_cifar_archive
from torch import nn

from lightning_prune.__main__ import main
from lightning_prune.app import (
    CIFAR10DataModule,
    CIFAR10JPEGDataModule,
    DataNotFoundError,
    ImageNetDataModule,
    Pipeline,
    SyntheticDataModule,
)
from lightning_prune.app.config import available_recipes, config_dir, register_resolvers
from lightning_prune.app.models import cifar_resnet, torchvision_model, vgg11_bn_no_dropout
from lightning_prune.app.report import load_runs, report_figure, run_labels
from lightning_prune.app.report import main as report_main
from lightning_prune.study.__main__ import main as study_main

IMAGENET_RECIPES = {
    "imagenet_resnet50_taylor_fo_bn_56": ("resnet50", 0.56),
    "imagenet_resnet50_taylor_fo_bn_72": ("resnet50", 0.72),
    "imagenet_resnet50_taylor_fo_bn_81": ("resnet50", 0.81),
    "imagenet_resnet50_taylor_fo_bn_91": ("resnet50", 0.91),
    "imagenet_resnet101_taylor_fo_bn_40": ("resnet101", 0.40),
    "imagenet_resnet101_taylor_fo_bn_50": ("resnet101", 0.50),
    "imagenet_resnet101_taylor_fo_bn_55": ("resnet101", 0.55),
    "imagenet_resnet101_taylor_fo_bn_75": ("resnet101", 0.75),
    "imagenet_resnet34_taylor_fo_bn_82": ("resnet34", 0.82),
    "imagenet_vgg11_bn_taylor_fo_bn_50": ("vgg11_bn", 0.50),
    "imagenet_densenet201_taylor_fo_bn_36": ("densenet201", 0.36),
    "imagenet_densenet201_taylor_fo_bn_60": ("densenet201", 0.60),
}
CIFAR_RECIPES = ("default", "cifar10_lenet3", "cifar10_preact_resnet18", "cifar10_resnet56")
QUIET = ["trainer.enable_progress_bar=false", "trainer.log_every_n_steps=1"]


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread: these runs are many small ops, where a second thread mostly waits at barriers
    (3-4x slower on a loaded 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _cli(argv: list[str], capsys: pytest.CaptureFixture | None = None) -> str:
    """Run ``lightning-prune argv`` in this process; returns its stdout."""
    old = sys.argv
    sys.argv = ["lightning-prune", *argv]
    try:
        main()
    finally:
        sys.argv = old
    return capsys.readouterr().out if capsys is not None else ""


def _compose(overrides: list[str]):
    register_resolvers()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


# -------------------------------------------------------------------------------------------- composition
def test_recipe_names() -> None:
    assert set(available_recipes()) == set(CIFAR_RECIPES) | set(IMAGENET_RECIPES)


@pytest.mark.parametrize("recipe", [*CIFAR_RECIPES, *IMAGENET_RECIPES])
def test_recipe_composes_with_cfg_job(recipe: str, capsys: pytest.CaptureFixture) -> None:
    cfg = yaml.safe_load(_cli([f"recipe={recipe}", "--cfg", "job"], capsys))
    assert cfg["name"] == recipe
    for group in ("model", "data", "optimizer", "pruning", "trainer", "stages", "loss"):
        assert group in cfg, group
    assert "_target_" in cfg["model"] and "_target_" in cfg["data"] and "_target_" in cfg["optimizer"]
    lr = {"cifar10_preact_resnet18": 0.1}.get(recipe, 0.01)
    assert cfg["optimizer"]["lr"] == pytest.approx(lr)
    assert cfg["optimizer"]["momentum"] == 0.9
    assert cfg["pruning"]["criterion"] == "taylor_fo_bn"
    if recipe in IMAGENET_RECIPES:
        arch, keep = IMAGENET_RECIPES[recipe]
        assert cfg["model"]["arch"] == arch and cfg["model"]["weights"] == "torchvision"
        assert cfg["pruning"]["keep_ratio"] == pytest.approx(keep)
        assert cfg["pruning"]["prune_every_n_batches"] == 30 and cfg["pruning"]["neurons_per_step"] == 100
        assert cfg["pruning"]["reset_momentum"] is True
        assert cfg["data"]["batch_size"] == 256 and cfg["data"]["image_size"] == 224
        assert cfg["data"]["_target_"].endswith("ImageNetDataModule")
        assert cfg["scheduler"]["step_size"] == 10 and cfg["scheduler"]["gamma"] == 0.1
        assert cfg["stages"]["prune"]["max_epochs"] + cfg["stages"]["finetune"]["max_epochs"] >= 25
    else:  # cifar10_resnet56: the settings that won the 1,500-step side-by-side
        assert cfg["pruning"]["prune_every_n_batches"] == (2 if recipe == "cifar10_resnet56" else 10)


def test_default_recipe_prunes_gently_and_fine_tunes_to_a_lower_rate() -> None:
    """The demo users run first: small pruning steps, fine-tuning longer than pruning, ending at a lower rate
    (20 neurons every 10 minibatches and 30 fine-tuning steps lost about 10 points of top-1)."""
    cfg = _compose([])
    p, finetune = cfg.pruning, cfg.stages.finetune
    pruned = round(400 * (1 - p.keep_ratio))  # ResNet-20: 400 prunable neurons
    prune_batches = -(-pruned // p.neurons_per_step) * p.prune_every_n_batches
    assert p.neurons_per_step <= 0.025 * 400 and finetune.max_steps > prune_batches
    assert finetune.max_epochs * (10 * cfg.data.train_per_class // cfg.data.batch_size) >= finetune.max_steps
    from hydra.utils import instantiate

    optimizer = torch.optim.SGD(nn.Linear(1, 1).parameters(), lr=cfg.optimizer.lr)
    scheduler = instantiate(cfg.scheduler)(optimizer)
    assert cfg.module.scheduler_interval == "step"
    for _ in range(finetune.max_steps):
        optimizer.step()
        scheduler.step()
    assert optimizer.param_groups[0]["lr"] < 0.5 * cfg.optimizer.lr  # the last steps at a lower rate


def test_ddp_settings_compose() -> None:
    cfg = _compose(["recipe=imagenet_resnet50_taylor_fo_bn_72", "trainer.strategy=ddp", "trainer.devices=4",
                    "trainer.num_nodes=2"])  # fmt: skip
    assert (cfg.trainer.strategy, cfg.trainer.devices, cfg.trainer.num_nodes) == ("ddp", 4, 2)
    dm = SyntheticDataModule(batch_size=cfg.data.batch_size)
    assert dm.set_world_size(cfg.trainer.devices * cfg.trainer.num_nodes) == 32
    with pytest.raises(ValueError, match="not divisible"):
        dm.set_world_size(3)


def test_user_target_swaps_in(tmp_path: Path) -> None:
    """Any _target_ works: a torchvision model and another loss without touching the package."""
    cfg = _compose(["recipe=default", "model._target_=torchvision.models.resnet18", "~model.depth",
                    "~model.pretrained", "~model.pretrained_dir", "data=synthetic", "loss._target_=torch.nn.NLLLoss"])  # fmt: skip
    from hydra.utils import instantiate

    assert type(instantiate(cfg.model)).__name__ == "ResNet"
    assert isinstance(instantiate(cfg.loss), nn.NLLLoss)


# ---------------------------------------------------------------------------------------- command lines
def _run(module: str, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``python -m module args`` in a fresh process, as a user types it; fails the test on a crash."""
    done = subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})})  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_app_help_names_the_app(tmp_path: Path) -> None:
    out = _run("lightning_prune", "--help", env={"LIGHTNING_PRUNE_DATA": str(tmp_path)}).stdout
    assert out.startswith("lightning-prune: ") and "__main__" not in out
    assert "recipe=cifar10_resnet56" in out and "cifar10_lenet3" in out  # examples, and the recipes as a group
    assert "${" not in out and f"data_dir: {tmp_path}" in out  # the configuration, resolved


def test_cfg_job_shows_the_real_data_dir(tmp_path: Path) -> None:
    out = _run("lightning_prune", "--cfg", "job", env={"LIGHTNING_PRUNE_DATA": str(tmp_path)}).stdout
    cfg = yaml.safe_load(out)
    assert cfg["paths"]["data_dir"] == str(tmp_path) and cfg["data"]["data_dir"] == str(tmp_path)
    assert cfg["model"]["pretrained_dir"] == str(tmp_path / "pretrained") and "${" not in out


def test_study_help() -> None:
    out = _run("lightning_prune.study", "correlation", "--help").stdout
    assert out.startswith("usage: python -m lightning_prune.study") and "images: 1024" in out
    with pytest.raises(SystemExit) as info:
        study_main(["--help"])
    assert info.value.code == 0


# -------------------------------------------------------------------------- ImageNet recipes, a few steps
def _tiny_imagenet_overrides(recipe: str, out: Path) -> list[str]:
    return [
        f"recipe={recipe}",
        "data=synthetic_imagenet",
        "data.image_size=32",  # the real architectures; 32x32 keeps every stride-2 stage at >= 1 pixel
        "data.batch_size=2",
        "data.eval_batch_size=2",
        "data.train_size=4",
        "data.val_size=2",
        "model.weights=null",
        "pruning.prune_every_n_batches=1",
        "pruning.curve.samples=0",
        "stages.prune.max_steps=2",
        "stages.finetune.max_steps=1",
        "stages.evaluate.limit_batches=1",
        "stages.compact=false",
        "plots=false",
        "trainer.accelerator=cpu",
        *QUIET,
    ]


@pytest.mark.timeout(600)
@pytest.mark.parametrize("recipe", list(IMAGENET_RECIPES))
def test_imagenet_recipe_steps_on_synthetic_data(recipe: str, tmp_path: Path) -> None:
    cfg = _compose(_tiny_imagenet_overrides(recipe, tmp_path))
    metrics = Pipeline(cfg, tmp_path).run()
    arch = IMAGENET_RECIPES[recipe][0]
    assert metrics["fit_steps"] == {"prune": 2, "finetune": 1}
    p = metrics["pruning"]
    assert p["pruning_steps"] == 2 and p["neurons_pruned"] == 200 and p["criterion"] == "taylor_fo_bn"
    stages = metrics["stages"]
    assert set(stages) == {"initial", "pruned", "finetuned"}
    assert stages["pruned"]["flops"] < stages["initial"]["flops"]
    assert stages["pruned"]["neurons_kept"] == p["neurons_prunable"] - 200
    assert (tmp_path / "pruning_history.csv").is_file() and (tmp_path / "metrics.json").is_file()
    assert cfg.model.arch == arch  # the recipe builds the paper's architecture...
    built = hydra.utils.instantiate(cfg.model)
    assert stages["initial"]["params"] == sum(p.numel() for p in built.parameters())  # ...and the run used it
    assert json.loads((tmp_path / "metrics.json").read_text())["model"] == metrics["model"]


# ------------------------------------------------------------------------------ end to end on real data
def _files(run_dir: Path) -> set[str]:
    return {p.name for p in run_dir.iterdir()}


@pytest.mark.timeout(600)
def test_default_recipe_end_to_end(data_dir: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    _cli([f"hydra.run.dir={run_dir}", "data.train_per_class=8", "data.val_per_class=4",
          "data.batch_size=16", "pruning.prune_every_n_batches=2", "pruning.neurons_per_step=40",
          "stages.finetune.max_steps=2", *QUIET])  # fmt: skip
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["recipe"] == "default"
    assert metrics["pruning"]["target_reached"] and metrics["pruning"]["neurons_pruned"] == 120
    stages = metrics["stages"]
    assert stages["initial"]["top1"] > 0.5  # the shared pretrained ResNet-20 on 40 real test images
    assert stages["initial"]["flops"] == pytest.approx(metrics["pruning"]["initial_flops"])
    assert stages["finetuned"]["flops"] < 0.9 * stages["initial"]["flops"]
    assert stages["finetuned"]["neurons_kept"] == 280
    final = metrics["final"]
    for key in ("top1", "loss", "flops", "params", "neurons_kept", "wall_time_s"):
        assert final[key] is not None, key
    files = _files(run_dir)
    assert {"pruning_history.csv", "pruning_curve.csv", "metrics.json", "accuracy_loss_vs_neurons_pruned.png",
            "flops_vs_accuracy.png"} <= files  # fmt: skip
    assert (run_dir / ".hydra" / "config.yaml").is_file()
    assert "compact_model.pt" in files
    compact = stages["compact"]
    assert compact["top1"] == pytest.approx(stages["finetuned"]["top1"], abs=1e-6)
    assert compact["params"] < stages["initial"]["params"]
    assert compact["flops"] == pytest.approx(stages["finetuned"]["flops"], rel=0.02)
    assert final["top1"] == compact["top1"]


@pytest.mark.timeout(600)
def test_pipeline_trains_the_compact_network_after_a_pruning_window(data_dir: Path, tmp_path: Path) -> None:
    """The cifar10_resnet56 recipe's settings on the default recipe: pruning over a window of steps, then the
    compact network is trained (fine-tune stage) and is the run's compact model."""
    run_dir = tmp_path / "run"
    _cli([f"hydra.run.dir={run_dir}", "data.train_per_class=8", "data.val_per_class=4", "data.batch_size=16",
          "pruning.prune_every_n_batches=2", "pruning.keep_ratio=null", "pruning.target_flops_ratio=0.7",
          "pruning.pruning_steps=6", "pruning.compact_when_done=true", "stages.finetune.max_steps=2",
          *QUIET])  # fmt: skip
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["pruning"]["target_reached"] and metrics["pruning"]["pruning_steps"] == 3
    assert metrics["fit_steps"]["prune"] == 6 and metrics["fit_steps"]["finetune"] == 2
    stages = metrics["stages"]
    assert stages["finetuned"]["params"] < stages["initial"]["params"]  # the compact network was trained
    assert stages["compact"]["flops"] <= 0.7 * stages["initial"]["flops"]
    assert stages["compact"]["top1"] == pytest.approx(stages["finetuned"]["top1"], abs=1e-6)


@pytest.mark.timeout(600)
def test_lenet3_recipe_end_to_end(data_dir: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    _cli(["recipe=cifar10_lenet3", f"hydra.run.dir={run_dir}", "data.train_per_class=20", "data.val_per_class=10",
          "data.batch_size=50", "stages.train.max_epochs=2", "pruning.prune_every_n_batches=2",
          "pruning.neurons_per_step=21", "stages.finetune.max_epochs=1", *QUIET])  # fmt: skip
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["recipe"] == "cifar10_lenet3"
    assert metrics["fit_steps"]["train"] == 8  # 2 epochs of 200 images at batch 50
    assert set(metrics["stages"]) >= {"initial", "trained", "pruned", "finetuned"}
    assert metrics["pruning"]["neurons_pruned"] == 126 and metrics["pruning"]["target_reached"]
    assert metrics["fit_steps"]["prune"] == 12  # 6 pruning steps x 2 minibatches
    assert metrics["final"]["neurons_kept"] == 126
    assert (run_dir / "pruning_history.csv").read_text().count("\n") == 7  # header + 6 steps


@pytest.mark.timeout(600)
def test_multirun_sweep_and_report(data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    sweep = tmp_path / "sweep"
    _cli(["-m", "recipe=cifar10_lenet3", "pruning.criterion=taylor_fo_bn,weight_norm,random", "seed=0,1",
          f"hydra.sweep.dir={sweep}", "data.train_per_class=10", "data.val_per_class=5", "data.batch_size=50",
          "stages.train.max_epochs=1", "pruning.prune_every_n_batches=1", "pruning.neurons_per_step=63",
          "stages.finetune.max_steps=1", "plots=false", *QUIET])  # fmt: skip
    runs = sorted(p for p in sweep.iterdir() if (p / "metrics.json").is_file())
    assert len(runs) == 6
    criteria = {json.loads((r / "metrics.json").read_text())["criterion"] for r in runs}
    assert criteria == {"taylor_fo_bn", "weight_norm", "random"}
    capsys.readouterr()
    report_main([str(sweep)])
    text = (sweep / "report.md").read_text()
    assert (sweep / "report.png").stat().st_size > 0
    assert text.count("| weight_norm |") >= 1 and "Mean ± std over seed" in text
    per_run, summary = text.split("Mean ± std over seed")
    assert len([line for line in per_run.splitlines() if line.startswith("| ")]) == 1 + 6  # header + runs
    assert len([line for line in summary.splitlines() if line.startswith("| ")]) == 1 + 3  # header + criteria
    assert "pruning.criterion" in per_run and "`recipe=cifar10_lenet3`" in per_run
    # the subcommand form works too
    _cli(["report", str(sweep), "--out", str(tmp_path / "again")])
    assert (tmp_path / "again" / "report.md").read_text() == text


def _fake_run(run_dir: Path, overrides: list[str], top1: float, flops: float) -> None:
    """A run folder as the app writes it: overrides, metrics.json, pruning_curve.csv."""
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    metrics = {"recipe": "cifar10_lenet3", "final": {"top1": top1, "flops": flops}}
    (run_dir / "metrics.json").write_text(json.dumps(metrics))
    (run_dir / "pruning_curve.csv").write_text(f"neurons_pruned,flops,val_top1\n0,4e6,0.6\n63,{flops},{top1}\n")


def test_report_labels_are_the_differing_overrides() -> None:
    common = {"recipe": "cifar10_lenet3", "data.batch_size": "50", "data.train_per_class": "10"}
    runs = [
        {"overrides": {**common, "pruning.criterion": c, "seed": s}, "metrics": {"recipe": "cifar10_lenet3"},
         "dir": Path(f"{i}")}
        for i, (c, s) in enumerate([("taylor_fo_bn", "0"), ("taylor_fo_bn", "1"), ("random", "0")])
    ]  # fmt: skip
    assert run_labels(runs) == ["pruning.criterion=taylor_fo_bn"] * 2 + ["pruning.criterion=random"]
    assert run_labels(runs, group_out=()) == [
        "pruning.criterion=taylor_fo_bn, seed=0", "pruning.criterion=taylor_fo_bn, seed=1",
        "pruning.criterion=random, seed=0"]  # fmt: skip
    assert run_labels(runs[:1]) == ["cifar10_lenet3"]  # nothing differs: the recipe


def test_report_png_has_a_legend_on_each_panel(tmp_path: Path) -> None:
    common = ["recipe=cifar10_lenet3", "data.train_per_class=10", "data.val_per_class=5", "data.batch_size=50"]
    jobs = [(c, s) for c in ("taylor_fo_bn", "weight_norm", "random") for s in (0, 1)]
    for i, (criterion, seed) in enumerate(jobs):
        overrides = [*common, f"pruning.criterion={criterion}", f"seed={seed}"]
        _fake_run(tmp_path / str(i), overrides, top1=0.5 + i / 20, flops=2e6 - i * 1e5)
    runs = load_runs(tmp_path)
    fig = report_figure(runs)
    fig.canvas.draw()
    expected = [f"pruning.criterion={c}" for c in ("taylor_fo_bn", "weight_norm", "random")]
    assert len(fig.axes) == 2
    for ax in fig.axes:
        legend = ax.get_legend()
        assert legend is not None, ax.get_title()
        assert [t.get_text() for t in legend.get_texts()] == expected
        box = legend.get_window_extent()  # inside the figure: no label cut off
        assert fig.bbox.x0 <= box.x0 and box.x1 <= fig.bbox.x1 and fig.bbox.y0 <= box.y0 and box.y1 <= fig.bbox.y1
    report_main([str(tmp_path)])
    assert (tmp_path / "report.png").stat().st_size > 0


# ------------------------------------------------------------------------------------------- data modules

def _jpeg_archive(path: Path, per_class: int) -> Path:
    return fake_cifar_archive(path, per_class, image_format="JPEG")



@pytest.mark.parametrize("mode", ["memory", "folder"])
def test_cifar10_jpeg_modes(mode: str, tmp_path: Path) -> None:
    archive = _jpeg_archive(tmp_path / "fake.tar.gz", per_class=3)
    dm = CIFAR10JPEGDataModule(archive=archive, mode=mode, train_per_class=2, val_per_class=1,
                               cache_dir=tmp_path / "cache", batch_size=4)  # fmt: skip
    dm.prepare_data()
    dm.setup("fit")
    assert len(dm.train_set) == 20 and len(dm.val_set) == 10
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    xs, ys = next(iter(dm.val_dataloader()))
    assert ys.tolist() == [0, 1, 2, 3]  # one image per class, in class order, unshuffled
    if mode == "folder":
        assert (tmp_path / "cache" / "cifar10-jpeg" / "train" / "airplane").is_dir()


def test_missing_data_errors_say_where_and_how(tmp_path: Path) -> None:
    with pytest.raises(DataNotFoundError, match="LIGHTNING_PRUNE_DATA") as info:
        CIFAR10JPEGDataModule(data_dir=tmp_path / "nowhere").setup("fit")
    assert str(tmp_path / "nowhere" / "cifar10-jpeg.tar.gz") in str(info.value)
    with pytest.raises(DataNotFoundError, match="data.download=true") as info:
        CIFAR10DataModule(root=tmp_path / "cifar").setup("fit")
    assert str(tmp_path / "cifar") in str(info.value)
    with pytest.raises(DataNotFoundError, match="data.root=") as info:
        ImageNetDataModule(root=tmp_path / "imagenet").setup("fit")
    assert str(tmp_path / "imagenet" / "train") in str(info.value)
    with pytest.raises(FileNotFoundError, match="model.pretrained"):
        cifar_resnet(56, pretrained=True, pretrained_dir=tmp_path)


def test_missing_data_through_the_app(tmp_path: Path) -> None:
    # the data is checked first: the error names the archive, not the (also missing) pretrained weights
    cfg = _compose(["paths.data_dir=" + str(tmp_path / "nowhere")])
    with pytest.raises(DataNotFoundError, match="cifar10-jpeg.tar.gz"):
        Pipeline(cfg, tmp_path / "run").run()


def test_imagenet_preprocessing(tmp_path: Path) -> None:
    for split in ("train", "val"):
        for cls in ("n01", "n02"):
            (tmp_path / split / cls).mkdir(parents=True)
            Image.new("RGB", (300, 280), (10, 200, 30)).save(tmp_path / split / cls / "a.JPEG")
    dm = ImageNetDataModule(root=tmp_path, batch_size=2, num_classes=None)
    dm.setup("fit")
    assert dm.num_classes == 2 and dm.input_shape == (3, 224, 224)
    assert next(iter(dm.train_dataloader()))[0].shape == (2, 3, 224, 224)
    assert next(iter(dm.val_dataloader()))[0].shape == (2, 3, 224, 224)
    names = [type(t).__name__ for t in dm.train_transform.transforms]
    assert names[:2] == ["RandomResizedCrop", "RandomHorizontalFlip"]
    names = [type(t).__name__ for t in dm.val_transform.transforms]
    assert names[:2] == ["Resize", "CenterCrop"] and dm.val_transform.transforms[0].size == 256


def test_synthetic_any_shape() -> None:
    dm = SyntheticDataModule(num_classes=7, image_size=20, channels=1, train_size=10, val_size=6, batch_size=5)
    dm.setup("fit")
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (5, 1, 20, 20) and int(y.max()) < 7
    # deterministic: the same item from a second module with the same seed, others differ
    again = SyntheticDataModule(num_classes=7, image_size=20, channels=1, train_size=10, val_size=6, batch_size=5)
    again.setup("fit")
    other = SyntheticDataModule(num_classes=7, image_size=20, channels=1, train_size=10, val_size=6, seed=1)
    other.setup("fit")
    assert torch.equal(dm.train_set[3][0], again.train_set[3][0])
    assert not torch.equal(dm.train_set[3][0], dm.train_set[4][0])
    assert not torch.equal(dm.train_set[3][0], other.train_set[3][0])


# ------------------------------------------------------------------------------------------------- models
def test_vgg11_bn_dropout_replaced_by_batchnorm(tmp_path: Path) -> None:
    model = vgg11_bn_no_dropout(num_classes=10)
    assert not any(isinstance(m, nn.Dropout) for m in model.modules())
    assert sum(isinstance(m, nn.BatchNorm1d) for m in model.classifier) == 2
    import torchvision

    reference = torchvision.models.vgg11_bn(num_classes=10)
    torch.save(reference.state_dict(), tmp_path / "vgg.pth")
    loaded = torchvision_model("vgg11_bn", weights=tmp_path / "vgg.pth", num_classes=10)
    assert torch.equal(loaded.classifier[3].weight, reference.classifier[3].weight)
    assert torch.equal(loaded.features[0].weight, reference.features[0].weight)


def test_torchvision_weights_never_downloaded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", lambda *a, **k: pytest.fail("download attempted"))
    with pytest.raises(FileNotFoundError, match="not in the cache"):
        torchvision_model("resnet34", weights="torchvision")
    # once in the cache, they load (here: a state_dict saved where torchvision would keep it)
    from lightning_prune.app.models import torchvision_cache_file

    import torchvision

    reference = torchvision.models.resnet34()
    path = torchvision_cache_file("resnet34")
    path.parent.mkdir(parents=True)
    torch.save(reference.state_dict(), path)
    model = torchvision_model("resnet34", weights="torchvision", num_classes=10)  # head left fresh
    assert torch.equal(model.conv1.weight, reference.conv1.weight) and model.fc.out_features == 10


def test_cifar_resnet_loads_shared_weights(data_dir: Path) -> None:
    model = cifar_resnet(20, pretrained=True, pretrained_dir=data_dir / "pretrained")
    fresh = cifar_resnet(20, pretrained=False)
    assert model.state_dict().keys() == fresh.state_dict().keys()
    assert not torch.equal(model.linear.weight, fresh.linear.weight)
    # trained statistics, not a fresh BatchNorm's (running mean 0, variance 1)
    assert not torch.equal(model.bn1.running_var, torch.ones_like(model.bn1.running_var))


def test_flops_target_stops_pruning(tmp_path: Path) -> None:
    cfg = _compose(["data=synthetic", "data.batch_size=8", "data.train_size=64", "data.val_size=8",
                    "model.pretrained=false", "pruning.prune_every_n_batches=1", "pruning.neurons_per_step=10",
                    "pruning.keep_ratio=0.3", "pruning.target_flops_ratio=0.9", "pruning.curve.samples=8",
                    "stages.finetune.max_epochs=0", "stages.evaluate.initial=false", "stages.compact=false",
                    "plots=false", "trainer.accelerator=cpu", *QUIET])  # fmt: skip
    metrics = Pipeline(cfg, tmp_path).run()
    p = metrics["pruning"]
    assert p["target_reached"] and "FLOPs target" in p["stop_reason"]
    ratio = metrics["stages"]["pruned"]["flops"] / p["initial_flops"]
    assert 0.8 < ratio <= 0.9
    assert metrics["fit_steps"]["prune"] == p["pruning_steps"] < 28
    curve = (tmp_path / "pruning_curve.csv").read_text().splitlines()
    assert len(curve) == 1 + 1 + p["pruning_steps"]  # header, the unpruned point, one per pruning step
