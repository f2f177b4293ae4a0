"""Real two-process DDP on the CPU (gloo): importance, decisions and resume against a single process.

The DDP runs happen in subprocesses (``tests/ddp_worker.py``): one Lightning ``strategy="ddp"`` launch
fits every configuration in turn, and ``ddp_spawn``, two emulated nodes (SLURM environment) and a
``torchrun`` two-node launch get one fit each. Every rank writes, after each pruning step, its masks,
importance and hashes of masks, weights and optimizer state. The single-process references run here,
on the doubled batch in the order the two ranks read it, with models in float64 so that reduction
order stays far below the 1e-5 tolerance (observed ~1e-14; in float32 it is ~7e-7 of a layer's
largest score and up to ~1e-5 elementwise, where ``sum(p * dE/dp)`` cancels, so near-ties could
flip). BatchNorm is synchronised with ``CPUSyncBatchNormPlugin`` (the CPU stand-in for
``sync_batchnorm=True``, whose ``torch.nn.SyncBatchNorm`` refuses CPU tensors).
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import ddp_worker
import pytest
import torch

WORKER = Path(__file__).with_name("ddp_worker.py")
PATTERNS = ["no_forward", "module_name", "forward_only"]  # the LightningModules users write
EXACT = ["fo", "fg", "accum", "accum_fg", "hooks", *PATTERNS, "schedule", "compact"]  # compared with a float64 single-process run
# latency: rank zero's table on every rank; distill: the teacher's gradient, then compaction inside the fit
DDP_CONFIGS = [*EXACT, "bf16", "fp16", "resume", "stop", "latency", "distill"]
REFERENCE_OF = {"hooks": "fo", "resume": "fo", **dict.fromkeys(PATTERNS, "fo")}  # same training problem
RTOL = 1e-5
STALL = 120  # seconds without any output of a launch: it hangs (a healthy rank writes every batch)

pytestmark = pytest.mark.timeout(3600)  # a last resort: hangs fail after STALL seconds of silence


def _clean_env(**extra: str) -> dict[str, str]:
    """This environment without any launcher's variables (pytest may itself run under SLURM or torchrun)."""
    drop = ("SLURM_", "TORCHELASTIC_", "PL_")
    keys = {"LOCAL_RANK", "RANK", "GROUP_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "NODE_RANK"}
    keys |= {"MASTER_ADDR", "MASTER_PORT"}
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop) and k not in keys}
    env.update(OMP_NUM_THREADS="1", **extra)
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(out: Path, *commands: list[str], env: list[dict[str, str]] | None = None):
    out.mkdir(parents=True, exist_ok=True)
    logs = [out / f"launch{i}.log" for i in range(len(commands))]
    procs = [
        subprocess.Popen(cmd, env=(env[i] if env else _clean_env()), stdout=logs[i].open("w"), stderr=subprocess.STDOUT)
        for i, cmd in enumerate(commands)
    ]
    return procs, logs


def _exit_codes(procs: list[subprocess.Popen], logs: list[Path], stall: float = STALL) -> list[int]:
    """Wait for the launch. Once a process fails the others get 10 s, then are killed (they may wait for it
    forever). A launch whose folder (logs, heartbeats, results) has not changed for ``stall`` seconds hangs
    and fails the test: a loaded machine makes a run slower, not silent, so no deadline depends on load."""
    folder = logs[0].parent
    last_change, newest = time.monotonic(), _newest_change(folder)
    deadline = math.inf
    try:
        while any(p.poll() is None for p in procs):
            if any(p.returncode for p in procs):
                deadline = min(deadline, time.monotonic() + 10)
                if time.monotonic() > deadline:
                    break
            elif (changed := _newest_change(folder)) != newest:
                last_change, newest = time.monotonic(), changed
            elif time.monotonic() - last_change > stall:
                tails = "\n".join(f"--- {log.name}\n" + log.read_text()[-2000:] for log in logs)
                pytest.fail(f"DDP launch silent for {stall:.0f} s (hung):\n{tails}")
            time.sleep(0.5)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return [p.returncode for p in procs]


def _newest_change(folder: Path) -> float:
    """The latest modification time of anything under ``folder``."""
    return max((f.stat().st_mtime for f in folder.rglob("*") if f.exists()), default=0.0)


def _wait(procs: list[subprocess.Popen], logs: list[Path], stall: float = STALL) -> None:
    codes = _exit_codes(procs, logs, stall)
    if any(codes):
        tails = "\n".join(f"--- {log.name}\n" + log.read_text()[-4000:] for log in logs)
        pytest.fail(f"DDP worker failed with exit codes {codes}:\n{tails}")


def _launch(out: Path, *commands: list[str], env: list[dict[str, str]] | None = None, stall: float = STALL) -> Path:
    _wait(*_start(out, *commands, env=env), stall=stall)
    return out


def _launch_on_a_free_port(out: Path, launch: Callable[[str], tuple[list[list[str]], list[dict] | None]]) -> None:
    """Launch ``launch(port)``'s commands on a port free a moment ago; another process may bind it before
    the ranks do, so a launch that fails with the address in use is retried on a new port (3 tries)."""
    for attempt in range(3):
        commands, envs = launch(str(_free_port()))
        procs, logs = _start(out, *commands, env=envs)
        codes = _exit_codes(procs, logs)
        in_use = any("address already in use" in log.read_text().lower() for log in logs)
        if not (any(codes) and in_use and attempt < 2):
            break
    _wait(procs, logs)  # all ended: fails with the logs on a non-zero exit


def _worker(out: Path, *args: str) -> list[str]:
    return [sys.executable, str(WORKER), str(out), *args]


def _load(directory: Path, name: str) -> list[dict]:
    """What each rank recorded for config ``name``, rank order."""
    files = sorted(directory.glob(f"{name}_rank*.pt"))
    assert files, f"no results for {name} in {directory}"
    return [torch.load(f, weights_only=False) for f in files]


# -- runs ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def _ddp_started(tmp_path_factory):
    """The two-process launch of every configuration, started first: the references run meanwhile."""
    out = tmp_path_factory.mktemp("ddp")
    procs, logs = _start(out, _worker(out, "--configs", ",".join(DDP_CONFIGS), "--launch", "ddp"))
    yield out, procs, logs
    for p in procs:
        if p.poll() is None:
            p.kill()


@pytest.fixture(scope="module")
def reference_dir(tmp_path_factory, _ddp_started) -> Path:
    out = tmp_path_factory.mktemp("single")
    for name in sorted({REFERENCE_OF.get(n, n) for n in EXACT} | {"fo32"}):
        ddp_worker.run(name, out)
    return out


@pytest.fixture(scope="module")
def ddp_dir(_ddp_started, reference_dir) -> Path:
    out, procs, logs = _ddp_started
    _wait(procs, logs)
    return out


def _reference(reference_dir: Path, name: str) -> dict:
    return _load(reference_dir, REFERENCE_OF.get(name, name))[0]


# -- assertions ---------------------------------------------------------------------------------------------


def _assert_ranks_agree(ranks: list[dict], pruning_steps: bool = True) -> None:
    """Masks, weights (parameters and BatchNorm buffers) and optimizer state hash the same on every rank."""
    assert len(ranks) == 2
    first, second = ranks
    assert len(first["steps"]) == len(second["steps"])
    assert bool(first["steps"]) == pruning_steps
    for a, b in [*zip(first["steps"], second["steps"]), (first["final"], second["final"])]:
        assert a["global_step"] == b["global_step"]
        for key in ("hash_masks", "hash_weights", "hash_optimizer"):
            assert a[key] == b[key], f"{key} differs between ranks at step {a['global_step']}"


def _assert_matches(steps: list[dict], ref_steps: list[dict], rtol: float = RTOL, loss_rtol: float = 1e-5) -> None:
    """Same pruning steps, equal masks, importance equal within ``rtol`` (of each layer's largest score)."""
    assert [s["global_step"] for s in steps] == [s["global_step"] for s in ref_steps]
    for got, ref in zip(steps, ref_steps):
        step = ref["global_step"]
        assert got["masks"].keys() == ref["masks"].keys()
        for layer, mask in ref["masks"].items():
            assert torch.equal(got["masks"][layer], mask), f"mask of {layer} differs at step {step}"
        for layer, value in ref["importance"].items():
            scale = value.abs().max()
            error = (got["importance"][layer] - value).abs().max()
            assert error <= rtol * scale, f"importance of {layer} at step {step}: {error / scale:.2e} relative"
        if ref["loss"] is not None:  # the recorded (smoothed) loss is the global batch's
            assert got["loss"] == pytest.approx(ref["loss"], rel=loss_rtol)


# -- tests --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", EXACT)
def test_ddp_equals_single_process_with_doubled_batch(name, ddp_dir, reference_dir):
    """sync BatchNorm + the same data order: every pruning step's masks equal, importance within 1e-5.

    fo: taylor_fo_bn from DDP-averaged parameter gradients (no communication); fg: the per-sample
    criterion through explicit gates and one all_reduce; accum/accum_fg: accumulate_grad_batches=2, where
    DDP skips synchronisation between micro-batches; hooks: the group criterion through explicit gates;
    schedule: ``pruning_steps`` (the cubic schedule's per-step counts on every rank); compact:
    ``compact_when_done``, the last steps on the compact network, its weights equal to the reference's.
    """
    ranks = _load(ddp_dir, name)
    ref = _reference(reference_dir, name)
    assert ranks[0]["info"]["strategy"] == "DDPStrategy" and ranks[0]["info"]["world_size"] == 2
    assert ranks[0]["info"]["sync_bn"] == ["CPUSyncBatchNorm"]
    assert len(ref["steps"]) >= 3 and ref["final"]["num_pruned"] == 8
    if name == "schedule":  # pruning_steps=6, every 2: floor(8 (1 - (1 - i/3)^3)) neurons after step i
        assert [(s["global_step"], s["num_pruned"]) for s in ref["steps"]] == [(2, 5), (4, 7), (6, 8)]
    if name == "compact":  # compact_when_done: DDP wrapped the compact network again and trained it as one process
        final = ref["final"]["weights"]
        masked = _reference(reference_dir, "fo")["final"]["weights"]
        assert sum(v.numel() for v in final.values()) < sum(v.numel() for v in masked.values())
        for rank in ranks:
            assert rank["final"]["weights"].keys() == final.keys()
            for key, value in final.items():
                assert torch.allclose(rank["final"]["weights"][key], value, rtol=1e-8, atol=1e-10), key
    for rank in ranks:
        _assert_matches(rank["steps"], ref["steps"])
        for layer, mask in ref["final"]["masks"].items():
            assert torch.equal(rank["final"]["masks"][layer], mask)


@pytest.mark.parametrize("name", DDP_CONFIGS)
def test_ranks_hold_identical_masks_weights_and_optimizer_state(name, ddp_dir):
    ranks = _load(ddp_dir, name)
    if name == "resume":
        _assert_ranks_agree(_load(ddp_dir, "resume_first"))
    _assert_ranks_agree(ranks, pruning_steps=name != "stop")


def test_history_goes_to_the_trainers_log_dir(ddp_dir):
    """Without ``history_dir`` rank zero writes the history to ``trainer.log_dir``, which is itself a
    collective (a broadcast): read on rank zero alone it left rank one a collective behind, a hang."""
    ranks = _load(ddp_dir, "no_forward")
    history = json.loads((ddp_dir / "root_no_forward" / "pruning_history.json").read_text())
    assert [r["step"] for r in history] == [s["global_step"] for s in ranks[0]["steps"]]


@pytest.mark.parametrize("module_name, shuffle", [(None, False), ("net", False), (None, True)])
def test_users_small_network_without_forward(module_name, shuffle, tmp_path):
    """Issue 11's script: a plain network in ``self.net``, no forward, no example input, the default
    logger, no synchronised BatchNorm, and (last case) Lightning's default shuffling sampler. Under 2-process
    DDP it used to hang (and without ``module_name`` to trace the wrapped LightningModule); now it ends,
    both ranks hold the same masks and weights, the target is reached, rank zero wrote the history."""
    script = Path(__file__).with_name("ddp_user_script.py")
    cmd = [sys.executable, str(script), str(tmp_path)] + (["--module-name", module_name] if module_name else [])
    cmd += ["--shuffle"] if shuffle else []
    _launch(tmp_path, cmd)
    ranks = [torch.load(tmp_path / f"user_rank{r}.pt", weights_only=False) for r in range(2)]
    assert ranks[0]["num_pruned"] == ranks[1]["num_pruned"] == 19  # 48 neurons, keep_ratio 0.6
    assert ranks[0]["masks"].keys() == {"net.bn1", "net.bn2"}
    for layer, mask in ranks[0]["masks"].items():
        assert torch.equal(ranks[1]["masks"][layer], mask)
    assert ranks[0]["hash_params"] == ranks[1]["hash_params"]
    history = json.loads((Path(ranks[0]["log_dir"]) / "pruning_history.json").read_text())
    assert [r["step"] for r in history] == ranks[0]["history_steps"]


@pytest.mark.parametrize(("network", "heads"), [("vit", 8), ("swin", 12), ("encoder", 8)])
def test_users_transformer_loses_heads_identically_on_every_rank(tmp_path, network, heads):
    """A tiny timm ViT / torchvision Swin / ``nn.TransformerEncoder`` in ``self.net`` (no forward): under
    2-process DDP both ranks remove the same heads and MLP neurons, reach 0.3x the FLOPs (out of reach without removing heads) and train the
    same compact network after ``compact_when_done``."""
    if network == "vit":
        pytest.importorskip("timm")
    script = Path(__file__).with_name("ddp_user_script.py")
    _launch(tmp_path, [sys.executable, str(script), str(tmp_path), f"--{network}"])
    ranks = [torch.load(tmp_path / f"user_rank{r}.pt", weights_only=False) for r in range(2)]
    assert ranks[0]["heads"] == ranks[1]["heads"] and sum(ranks[0]["heads"]) < heads, ranks[0]["heads"]
    assert ranks[0]["flops_kept"] <= 0.3
    for layer, mask in ranks[0]["masks"].items():
        assert torch.equal(ranks[1]["masks"][layer], mask)
    assert ranks[0]["hash_params"] == ranks[1]["hash_params"]


def test_communication_is_one_flat_tensor_where_needed(ddp_dir):
    """What the callback sends, counted by wrapping torch.distributed during the run (rank 1's view).

    taylor_fo_bn reads DDP-averaged parameter gradients: nothing between pruning steps, then the smoothed
    loss (4 bytes) and rank zero's decision (int64 [stop, n, 2 ids] = 32 bytes) per pruning step. The
    per-sample criterion adds one all_reduce per optimizer step of exactly the squared per-sample sums
    (one float64 per gate channel; the totals come from parameter gradients), and "hooks" the totals.
    """
    channels = sum(m.numel() for m in _load(ddp_dir, "fo")[0]["final"]["masks"].values())
    per_step = {"fo": 0, "accum": 0, "fg": channels * 8, "accum_fg": channels * 8, "hooks": channels * 8}
    decision = [("all_reduce", 4, "_prune_step"), ("broadcast", 32, "_prune_step")]
    for name, step_bytes in per_step.items():
        ranks = _load(ddp_dir, name)
        pruned_at = {s["global_step"] for s in ranks[1]["steps"]}
        last = 0
        for global_step, calls in ranks[1]["comm"]:
            calls = [(op, size, caller.rsplit(".", 1)[1]) for op, size, caller in calls]
            stepped, last = global_step != last, global_step
            collecting = stepped and step_bytes and global_step <= max(pruned_at)  # none once pruning is done
            expected = [("all_reduce", step_bytes, "finish")] if collecting else []
            expected += decision if stepped and global_step in pruned_at else []
            assert calls == expected, f"{name}, step {global_step}"


def test_max_loss_stops_every_rank(ddp_dir):
    """max_loss compares the global batch's smoothed loss; rank zero's stop reaches every rank at once."""
    ranks = _load(ddp_dir, "stop")
    for rank in ranks:
        assert rank["steps"] == [] and rank["final"]["num_pruned"] == 0 and rank["final"]["done"]
        assert "exceeded max_loss=1.0" in rank["final"]["stop_reason"]
    assert ranks[0]["final"]["stop_reason"] == ranks[1]["final"]["stop_reason"]  # same (global) loss in it


def test_accumulation_reads_the_synchronised_step(ddp_dir):
    """With accumulate_grad_batches=2 pruning counts optimizer steps, not micro-batches."""
    ranks = _load(ddp_dir, "accum")
    assert [s["global_step"] for s in ranks[0]["steps"]] == [2, 4, 6, 8]
    assert len(ranks[0]["labels"]) == 12  # micro-batches per rank: 4 epochs x 3


@pytest.mark.parametrize("name,precision", [("bf16", "bf16-mixed"), ("fp16", "16-mixed")])
def test_mixed_precision_one_decision_and_close_importance(name, precision, ddp_dir, reference_dir):
    """bf16-mixed, and 16-mixed with a CPU GradScaler: one decision on both ranks (hash test above), the
    target reached, and the first importance close to the float32 single-process reference: channel by
    channel (rounding moves single scores by ~10%), and in scale, where rounding averages out: the ratio
    of the sums catches a wrong overall factor above 3%, which the norm of the difference would accept."""
    ranks = _load(ddp_dir, name)
    info = ranks[0]["info"]
    assert info["precision"] == precision
    if precision == "16-mixed":  # really float16 with loss scaling, not Lightning's CPU bf16 substitute
        assert info["scaler"] == "GradScaler" and info["max_scale"] > 1
    assert ranks[0]["final"]["num_pruned"] == ranks[1]["final"]["num_pruned"] == 8
    got, ref = ranks[0]["steps"][0], _load(reference_dir, "fo32")[0]["steps"][0]
    assert got["global_step"] == ref["global_step"]
    a = torch.cat([got["importance"][k] for k in sorted(ref["importance"])])
    b = torch.cat([ref["importance"][k] for k in sorted(ref["importance"])])
    assert (a - b).norm() / b.norm() < 0.15  # measured: bf16 0.10-0.11, fp16 0.05-0.06
    assert float(a.sum() / b.sum()) == pytest.approx(1.0, abs=0.03)  # measured: bf16 0.994, fp16 0.999
    assert torch.nn.functional.cosine_similarity(a, b, dim=0) > 0.99  # measured: bf16 0.995, fp16 0.9985


def test_resume_mid_pruning_under_ddp(ddp_dir):
    """Checkpoint after 1 of 4 pruning steps, mid-interval; the resumed DDP run reaches the uninterrupted
    run's masks at every later pruning step, and the same final masks and weights."""
    (first, _), (resumed, _) = _load(ddp_dir, "resume_first"), _load(ddp_dir, "resume")
    (full, _) = _load(ddp_dir, "fo")
    assert [s["global_step"] for s in first["steps"]] == [2] and first["final"]["global_step"] == 3
    assert 0 < first["final"]["num_pruned"] < 8  # the checkpoint is mid-pruning
    # the smoothed loss restarts from rank zero's value (its past is per rank): close, not equal
    _assert_matches(first["steps"] + resumed["steps"], full["steps"], rtol=1e-12, loss_rtol=1e-2)
    assert resumed["final"]["hash_masks"] == full["final"]["hash_masks"]
    assert resumed["final"]["hash_weights"] == full["final"]["hash_weights"]


def test_ddp_spawn(tmp_path, reference_dir):
    _launch(tmp_path, _worker(tmp_path, "--configs", "fo", "--launch", "ddp_spawn"))
    ranks = _load(tmp_path, "fo")
    assert ranks[0]["info"]["strategy"] == "DDPStrategy" and ranks[0]["info"]["world_size"] == 2
    _assert_ranks_agree(ranks)
    _assert_matches(ranks[1]["steps"], _reference(reference_dir, "fo")["steps"])
    # docs/distributed.md: in the launching process, the masks come from the checkpoint's callback state
    launcher = torch.load(tmp_path / "fo_launcher.pt", weights_only=False)
    assert launcher["masks_before_loading"] == {}  # the launcher's callback saw nothing of the fit
    final = ranks[0]["final"]["masks"]
    assert launcher["masks"].keys() == final.keys()
    assert all(torch.equal(launcher["masks"][k], final[k]) for k in final)
    assert sum(int((~m).sum()) for m in final.values()) >= 8  # 8 neurons (some tied across layers)
    assert launcher["relative_difference"] < 1e-12  # float64: compact == the weights handed back
    assert launcher["parameters"][1] < launcher["parameters"][0]


def test_two_nodes_slurm_environment(tmp_path, reference_dir):
    """num_nodes=2 x devices=1, started the way SLURM's srun starts tasks (Lightning's SLURMEnvironment)."""
    cmd = _worker(tmp_path, "--configs", "fo", "--launch", "external", "--num-nodes", "2", "--devices", "1")

    def launch(port: str):
        envs = [
            _clean_env(
                SLURM_NTASKS="2", SLURM_NTASKS_PER_NODE="1", SLURM_NNODES="2", SLURM_PROCID=str(r),
                SLURM_LOCALID="0", SLURM_NODEID=str(r), SLURM_JOB_ID="4242", SLURM_JOB_NAME="prune",
                SLURM_NODELIST="127.0.0.1", MASTER_ADDR="127.0.0.1", MASTER_PORT=port,
            )  # fmt: skip
            for r in range(2)
        ]
        return [cmd, cmd], envs

    _launch_on_a_free_port(tmp_path, launch)
    ranks = _load(tmp_path, "fo")
    assert [r["info"]["cluster"] for r in ranks] == ["SLURMEnvironment"] * 2
    assert [(r["info"]["num_nodes"], r["info"]["node_rank"]) for r in ranks] == [(2, 0), (2, 1)]
    _assert_ranks_agree(ranks)
    _assert_matches(ranks[0]["steps"], _reference(reference_dir, "fo")["steps"])


@pytest.mark.skipif(os.environ.get("LP_TEST_TORCHRUN", "1") == "0", reason="LP_TEST_TORCHRUN=0")
def test_two_nodes_torchrun(tmp_path, reference_dir):
    """Two ``torchrun --nnodes 2 --node_rank i`` agents on one machine (scripts/torchrun.sh's launch)."""
    worker = _worker(tmp_path, "--configs", "fo", "--launch", "external", "--num-nodes", "2", "--devices", "1")

    def launch(port: str):
        return [
            [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(r),
             "--nproc_per_node", "1", "--master_addr", "127.0.0.1", "--master_port", port, *worker[1:]]
            for r in range(2)
        ], None  # fmt: skip

    _launch_on_a_free_port(tmp_path, launch)
    ranks = _load(tmp_path, "fo")
    assert [r["info"]["cluster"] for r in ranks] == ["TorchElasticEnvironment"] * 2
    assert [(r["info"]["num_nodes"], r["info"]["node_rank"]) for r in ranks] == [(2, 0), (2, 1)]
    _assert_ranks_agree(ranks)
    _assert_matches(ranks[0]["steps"], _reference(reference_dir, "fo")["steps"])


def test_all_reduce_tensors_helper(ddp_dir):
    """``all_reduce_tensors``: one flat all_reduce of a dict, dtypes and shapes kept (run after the fits)."""
    for rank in range(2):
        got = torch.load(ddp_dir / f"helpers_rank{rank}.pt")
        assert torch.equal(got["sum"]["a"], torch.full((3,), 3.0, dtype=torch.float64))
        assert torch.equal(got["mean"]["a"], torch.full((3,), 1.5, dtype=torch.float64))
        assert got["sum"]["b"].dtype == torch.int64 and got["sum"]["b"].tolist() == [1]


def test_cpu_sync_batchnorm_equals_batchnorm_on_the_whole_batch(ddp_dir):
    """CPUSyncBatchNorm on each rank's half: outputs, input and weight gradients, running statistics equal
    those of one BatchNorm2d on the concatenated batch (float64)."""
    for rank in range(2):
        got = torch.load(ddp_dir / f"helpers_rank{rank}.pt")
        assert got["bn_type"] == "CPUSyncBatchNorm"
        for key in ("bn_out", "bn_input_grad", "bn_weight_grad", "bn_running_var", "bn_running_mean"):
            assert got[key] < 1e-12, (key, got[key])


def test_a_silent_launch_fails_and_a_slow_one_does_not(tmp_path):
    """The hang rule of every launch here: silence fails, slowness (a loaded machine) does not."""
    slow = [sys.executable, "-c", "import time\nfor i in range(6):\n    print(i, flush=True)\n    time.sleep(1)"]
    assert _exit_codes(*_start(tmp_path / "slow", slow), stall=3) == [0]  # 6 s in all, never 3 s silent
    silent = [sys.executable, "-c", "import time; time.sleep(60)"]
    started = time.monotonic()
    with pytest.raises(pytest.fail.Exception, match="silent for 3 s"):
        _exit_codes(*_start(tmp_path / "silent", silent), stall=3)
    assert time.monotonic() - started < 20
