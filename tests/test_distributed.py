"""Data-parallel runs: shards, collectives, and two gloo processes that train as one process on the global batch."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from balancemm.config import resolve_config
from balancemm.data.loader import Batches
from balancemm.distributed import World, all_gather_rows, all_sum, launched_world, shard_bounds
from balancemm.engine.trainer import Trainer
from balancemm.errors import ConfigError
from balancemm.methods import list_methods
from tests.conftest import TinyDataset, build_method


def test_shards_are_contiguous_and_the_first_ranks_hold_the_remainder() -> None:
    assert [shard_bounds(10, r, 3) for r in range(3)] == [(0, 4), (4, 7), (7, 10)]
    assert [shard_bounds(8, r, 2) for r in range(2)] == [(0, 4), (4, 8)]
    assert [shard_bounds(1, r, 2) for r in range(2)] == [(0, 1), (1, 1)]
    for n in range(12):
        for size in (1, 2, 3, 5):
            parts = [torch.arange(n)[slice(*shard_bounds(n, r, size))] for r in range(size)]
            assert [len(p) for p in parts] == [len(p) for p in torch.tensor_split(torch.arange(n), size)]
            assert torch.equal(torch.cat(parts), torch.arange(n))


def test_the_ranks_batches_together_are_the_one_process_batches() -> None:
    split = TinyDataset(n=29).split("train")

    def batches(shard: tuple[int, int], shuffle: bool) -> Batches:
        order = torch.Generator().manual_seed(5)
        return Batches(split, 8, shuffle=shuffle, generator=order, shard=shard)

    whole = list(batches((0, 1), True))
    ranks = [list(batches((r, 2), True)) for r in range(2)]
    assert len(whole) == len(ranks[0]) == len(ranks[1]) == 4
    for k, batch in enumerate(whole):
        assert torch.equal(torch.cat([ranks[0][k].index, ranks[1][k].index]), batch.index)
        assert torch.equal(torch.cat([ranks[0][k].inputs["audio"], ranks[1][k].inputs["audio"]]), batch.inputs["audio"])
        assert ranks[0][k].share + ranks[1][k].share == 1.0 and batch.share == 1.0
    assert [b.share for b in ranks[0]] == [0.5, 0.5, 0.5, 0.6]  # the last global batch of 5 rows: 3 + 2
    # A pass in split order gives each rank one contiguous part of the split.
    parts = [torch.cat([b.index for b in batches((r, 2), False)]) for r in range(2)]
    assert torch.equal(parts[0], torch.arange(15)) and torch.equal(parts[1], torch.arange(15, 29))


def test_a_last_global_batch_smaller_than_the_ranks_is_left_out_on_every_rank() -> None:
    split = TinyDataset(n=17).split("train")
    shards = [Batches(split, 8, shuffle=True, generator=torch.Generator(), shard=(r, 2)) for r in range(2)]
    assert [len(s) for s in shards] == [2, 2] and [s.dropped for s in shards] == [1, 1]
    assert Batches(split, 8, shuffle=True, generator=torch.Generator()).dropped == 0


def test_on_one_process_the_collectives_return_their_input() -> None:
    t = torch.arange(6.0).view(3, 2)
    assert all_sum(t, World()) is t and all_gather_rows(t, World()) is t
    assert not World().distributed and World().main and World(1, 2).distributed and not World(1, 2).main


def test_the_launch_environment_is_read_and_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    assert launched_world() == (0, 1, 0)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert launched_world() == (1, 2, 1)
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(ConfigError, match=r"inconsistent launch environment: RANK=2, WORLD_SIZE=2, LOCAL_RANK=1"):
        launched_world()
    monkeypatch.setenv("RANK", "one")
    with pytest.raises(ConfigError, match="must be integers"):
        launched_world()


# -- two processes ------------------------------------------------------------------------------------


SMALL = ["train.epochs=2", "model.encoders.audio.channels=[4,6]", "model.encoders.visual.channels=[4,6]"]
TRAIN_ON_TWO = [sys.executable, "-m", "balancemm", "train", "--method", "ogm_ge", "--nproc", "2", "--quiet"]


def test_two_ranks_through_the_cli_write_one_run_directory_and_count_every_test_sample_once(tmp_path: Path) -> None:
    out = tmp_path / "r"
    done = subprocess.run([*TRAIN_ON_TWO, "--out", str(out), "--set", *SMALL], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("ogm_ge on embedded") == 1  # rank 0 alone prints the summary
    summary = json.loads((out / "summary.json").read_text())
    assert summary["distributed"] == {"world_size": 2, "backend": "gloo"}
    assert summary["test"]["num_samples"] == summary["dataset_info"]["sizes"]["test"] == 360
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [(r["split"], r["epoch"]) for r in records] == [("val", 0), ("val", 1), ("test", summary["selected_epoch"])]
    assert records[0]["num_samples"] == 359  # validation too: every sample once, none twice
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r"]

    # Killed with SIGKILL (every process) after its first checkpoint, the same command resumes it and ends
    # where the uninterrupted run ended.
    cut = tmp_path / "cut"
    command = [*TRAIN_ON_TWO, "--out", str(cut), "--set", *SMALL]
    running = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    last = cut / "checkpoints" / "last.pt"
    while not last.is_file() and running.poll() is None:
        time.sleep(0.05)
    os.killpg(running.pid, signal.SIGKILL)
    running.wait()
    assert last.is_file() and not (cut / "done").exists()
    again = subprocess.run(command, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-3000:]
    resumed = json.loads((cut / "summary.json").read_text())
    for key in ("test", "shapley", "selected_epoch", "flops"):
        assert resumed[key] == summary[key], key
    records = [json.loads(line) for line in (cut / "results.jsonl").read_text().splitlines()]
    assert [(r["split"], r["epoch"]) for r in records] == [("val", 0), ("val", 1), ("test", summary["selected_epoch"])]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_torchrun_on_one_node_and_on_two_nodes_trains_the_same_run(tmp_path: Path) -> None:
    # torchrun itself (the console script beside this interpreter, or its module), not our --nproc launcher:
    # 2 workers on one node, then 2 "nodes" of 1 worker each on this machine, rendezvous over TCP. The
    # run directory is on a filesystem both nodes see, as on a cluster. torchrun gives each worker one
    # thread only when a node runs several; the same thread count on both sides keeps the sums' order.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    script = Path(sys.executable).with_name("torchrun")
    torchrun = [str(script)] if script.is_file() else [sys.executable, "-m", "torch.distributed.run"]
    train = ["-m", "balancemm", "train", "--method", "ogm_ge", "--quiet", "--set", *SMALL, "--out"]
    one = subprocess.run(
        [*torchrun, "--standalone", "--nproc-per-node", "2", *train, str(tmp_path / "one")],
        capture_output=True,
        text=True,
        env=env,
    )
    assert one.returncode == 0, one.stderr[-3000:]
    assert one.stdout.count("ogm_ge on embedded") == 1
    port = str(_free_port())
    nodes = [
        subprocess.Popen(
            [
                *torchrun,
                *("--nnodes", "2", "--node-rank", str(rank), "--nproc-per-node", "1"),
                *("--master-addr", "127.0.0.1", "--master-port", port, *train, str(tmp_path / "two")),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for rank in (0, 1)
    ]
    outputs = [node.communicate(timeout=300) for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], [err[-3000:] for _, err in outputs]
    assert [out.count("ogm_ge on embedded") for out, _ in outputs] == [1, 0]  # global rank 0 alone reports
    runs = [json.loads((tmp_path / name / "summary.json").read_text()) for name in ("one", "two")]
    assert runs[0]["distributed"] == runs[1]["distributed"] == {"world_size": 2, "backend": "gloo"}
    for key in ("test", "shapley", "selected_epoch", "flops"):
        assert runs[0][key] == runs[1][key], key


def test_what_cannot_run_distributed_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    from balancemm.cli import main

    assert main(["train", "--method", "baseline", "--nproc", "0"]) == 2
    assert capsys.readouterr().err == "balancemm: error: --nproc 0: the number of processes must be at least 1\n"
    cfg = resolve_config("baseline", sets=["train.batch_size=63"])
    with pytest.raises(ConfigError) as err:
        Trainer(cfg, "unused", world=World(0, 2, 0, "gloo"), dataset=TinyDataset())
    assert str(err.value) == (
        "train.batch_size=63 is the global batch and must divide by the 2 processes; choose a multiple of 2"
    )
    with pytest.raises(ConfigError, match=r"train\.sync_bn synchronises BatchNorm across GPUs; on a CPU set"):
        Trainer(resolve_config("baseline", sets=["train.sync_bn=true"]), "unused", device="cpu", dataset=TinyDataset())
    assert not Path("unused").exists()


# Hyper-parameters under which every method acts within two short epochs (schedules start at once).
ACTING: dict[str, dict[str, Any]] = {
    "unimodal": {"modality": "audio"},
    "gblending": {"super_epoch": 1},
    "reconboost": {"epochs_per_stage": 1, "correct_epoch": 1},
    "aug": {"margin": 0.0},  # a learner at the first check, whatever the score ratio
    "remix": {"warmup": 1},
    "greedy": {"starting_epoch": 0, "epsilon": 0.0},
    "modality_valuation": {"warmup": 0},
    "opm": {"modulation_starts": 0},
    "relearning": {"reinit_epoch": 1, "n_init": 1},
}


#: Rows where 29 would leave a last global batch of one row out on two ranks: modality valuation's copies make
#: its first epoch 105 rows (13 batches of 8 and 1); with 35 rows its epochs end in 7 (4 + 3) and 3 (2 + 1) rows.
ROWS: dict[str, int] = {"modality_valuation": 35}


def _two_epochs(name: str, world: World) -> dict[str, torch.Tensor]:
    """Two epochs of ``name`` acting, on 29 rows (or ``ROWS``) in global batches of 8 (last: 3 + 2 on two ranks)."""
    data = TinyDataset(n=ROWS.get(name, 29))
    method = build_method(name, data, world=world, **ACTING.get(name, {}))
    ctx = method.ctx
    method.on_fit_start()
    for epoch in range(2):
        ctx.epoch = epoch
        method.train()
        plan = method.on_epoch_start(epoch)
        order = torch.Generator().manual_seed(epoch)
        method.train_epoch(epoch, ctx.batching(data.split("train"), shuffle=True, generator=order, plan=plan))
        method.on_epoch_end(epoch)
    return {k: v.detach().clone() for k, v in method.state_dict().items()}


def _every_method(rank: int, rendezvous: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=2)
    try:
        states = {name: _two_epochs(name, World(rank, 2, rank, "gloo")) for name in list_methods()}
        torch.save(states, f"{out}/{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_rank_states(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    where = tmp_path_factory.mktemp("ranks")
    mp.spawn(_every_method, args=(str(where / "rendezvous"), str(where)), nprocs=2)
    return [torch.load(where / f"{r}.pt", weights_only=False) for r in range(2)]


@pytest.mark.parametrize("name", list_methods())
def test_every_method_keeps_its_replicas_identical_on_two_ranks(name: str, two_rank_states: list[Any]) -> None:
    # Parameters, buffers and method state after two epochs of the method acting: the same on both ranks,
    # bit for bit; a statistic computed from a rank's own shard would make them drift apart.
    first, second = (states[name] for states in two_rank_states)
    assert first.keys() == second.keys()
    drifted = [k for k in first if not torch.equal(first[k], second[k])]
    assert not drifted, f"{name}: {drifted[:5]}"


def _plain_normalisation() -> None:
    # BatchNorm normalises each shard by its own statistics, which no data-parallel run can avoid (short of
    # train.sync_bn on GPUs): it is switched off here, in place, so that state dicts keep their keys.
    nn.modules.batchnorm._BatchNorm.forward = lambda self, x: x  # type: ignore[method-assign,assignment]


def _every_method_without_batch_statistics(rank: int, rendezvous: str, out: str) -> None:
    _plain_normalisation()
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=2)
    try:
        states = {name: _two_epochs(name, World(rank, 2, rank, "gloo")) for name in list_methods()}
        if rank == 0:
            torch.save(states, f"{out}/states.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks_and_one(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], dict[str, Any]]:
    where = tmp_path_factory.mktemp("parity")
    mp.spawn(_every_method_without_batch_statistics, args=(str(where / "rendezvous"), str(where)), nprocs=2)
    forward = nn.modules.batchnorm._BatchNorm.forward
    try:
        _plain_normalisation()
        one = {name: _two_epochs(name, World()) for name in list_methods()}
    finally:
        nn.modules.batchnorm._BatchNorm.forward = forward  # type: ignore[method-assign]
    return torch.load(where / "states.pt", weights_only=False), one


@pytest.mark.parametrize("name", list_methods())
def test_every_method_on_two_ranks_is_the_one_process_algorithm(
    name: str, two_ranks_and_one: tuple[dict[str, Any], dict[str, Any]]
) -> None:
    two, one = (states[name] for states in two_ranks_and_one)
    for key, value in one.items():
        if value.is_floating_point():
            torch.testing.assert_close(two[key], value, rtol=1e-5, atol=1e-6, msg=key)
        else:
            assert torch.equal(two[key], value), key
