"""Epoch schedules given relative to the protocol's length, and the record of when a method acted.

A schedule written for a 100-epoch original can fall outside a 30-epoch protocol (Relearning's first
re-initialisation after epoch 20 comes after the epoch selected on validation), so every epoch
hyper-parameter also takes a share of ``train.epochs`` (``"30%"``), and each run records the epochs
in which its method acted.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

import balancemm
from balancemm.config import resolve_config
from balancemm.errors import ConfigError
from balancemm.methods import METHODS
from balancemm.schema import resolve_epoch, to_dict
from tests.conftest import TinyDataset, build_method


@pytest.mark.parametrize(
    ("value", "total", "ge", "expected"),
    [
        (7, 30, 0, 7),  # absolute values are the original codes' unit and stay as they are
        ("50%", 30, 0, 15),
        ("22%", 30, 1, 7),  # 6.6 rounds half up to 7
        ("22%", 70, 1, 15),  # 15.4
        ("25%", 2, 0, 1),  # 0.5 rounds up
        ("0%", 30, 0, 0),
        ("1%", 30, 1, 1),  # a period never resolves to 0 epochs
        ("100%", 30, 0, 30),
        ("33.3%", 30, 0, 10),  # 9.99
    ],
)
def test_epoch_values_resolve_against_the_protocol(value: Any, total: int, ge: int, expected: int) -> None:
    assert resolve_epoch(value, total, ge=ge) == expected


@pytest.mark.parametrize("bad", ["130%", "-5%", "30", "abc", "%", True, 2.5])
def test_bad_epoch_values_are_one_clear_error(bad: Any) -> None:
    with pytest.raises(ConfigError, match=r"^method.modulation_ends: expected an epoch number or a share"):
        resolve_config("ogm_ge", "embedded", overrides={"method": {"modulation_ends": bad}})


def test_relative_values_parse_from_the_command_line_and_keep_their_form_in_the_config() -> None:
    cfg = resolve_config("relearning", "embedded", sets=["method.reinit_epoch=22%"])
    assert cfg.method.reinit_epoch == "22%" and cfg.to_dict()["method"]["reinit_epoch"] == "22%"
    with pytest.raises(ConfigError, match=r"modulation_ends must be >= .*modulation_starts"):
        resolve_config("ogm_ge", "embedded", sets=["method.modulation_starts=60%", "method.modulation_ends=50%"])
    with pytest.raises(ConfigError, match="out of range"):
        resolve_config("relearning", "embedded", sets=["method.reinit_epoch=0"])
    # Mixed units can only be compared once the protocol's length is known: accepted here.
    resolve_config("ogm_ge", "embedded", sets=["method.modulation_starts=5", "method.modulation_ends=10%"])


# (method, hyper-parameters, protocol epochs, the epochs in which it acts)
SCHEDULES = [
    ("ogm_ge", {}, 8, set(range(8))),  # the official window 0–50 covers a short protocol
    ("ogm_ge", {"modulation_ends": "50%"}, 8, {0, 1, 2, 3, 4}),
    ("ogm_ge", {"modulation_starts": "25%", "modulation_ends": "50%"}, 8, {2, 3, 4}),
    ("agm", {"modulation_ends": 2}, 8, {0, 1, 2}),
    ("agm", {"modulation_ends": "25%"}, 8, {0, 1, 2}),
    ("pmr", {"modulation_ends": "67%"}, 6, {0, 1, 2, 3, 4}),  # 4.02
    ("amco", {"modulation_starts": "50%"}, 4, {2, 3}),
    ("opm", {}, 8, {6, 7}),  # the official warm-up: epochs 0–5
    ("opm", {"modulation_starts": "6%"}, 30, set(range(2, 30))),  # 1.8
    ("greedy", {"starting_epoch": "50%"}, 4, {2, 3}),
    ("modality_valuation", {"warmup": "8%"}, 30, set(range(2, 30))),  # 2.4
    ("modality_valuation", {"warmup": 5}, 4, set()),
    ("relearning", {}, 30, {21}),  # reinit_epoch 20: only after epoch 20 of 30
    ("relearning", {"reinit_epoch": "22%"}, 30, {8, 15, 22}),  # every 7 epochs, at most 3 times
    ("relearning", {"reinit_epoch": "22%", "reinit_num": 2}, 30, {8, 15}),
    ("baseline", {}, 4, set()),
    ("unimodal", {"modality": "audio"}, 4, set()),
    ("lfm", {}, 4, {0, 1, 2, 3}),  # its α changes the loss in every epoch
]


@pytest.mark.parametrize(("name", "hp", "epochs", "active"), SCHEDULES, ids=[f"{s[0]}-{s[1]}" for s in SCHEDULES])
def test_each_schedule_acts_in_the_epochs_it_resolves_to(
    name: str, hp: dict[str, Any], epochs: int, active: set[int]
) -> None:
    method = build_method(name, TinyDataset(), **hp)
    method.ctx.num_epochs = epochs
    assert {e for e in range(epochs) if method.acts_in(e)} == active


def test_ogm_ge_stops_modulating_after_a_relative_window() -> None:
    data = TinyDataset()
    method = build_method("ogm_ge", data, modulation_ends="50%", ge=False)
    method.ctx.num_epochs = 4
    batch = next(iter(method.ctx.batches("train")))
    changed = {}
    for epoch in (2, 3):  # "50%" of 4 epochs: the window is epochs 0–2
        method.ctx.epoch = epoch
        method.zero_grad()
        out = method.forward(batch)
        method.backward(method.losses(out, batch))
        before = [p.grad.clone() for m in method.modulated for p in method.modulated[m]]
        method.after_backward(out, batch)
        after = [p.grad for m in method.modulated for p in method.modulated[m]]
        changed[epoch] = any(not torch.equal(a, b) for a, b in zip(after, before, strict=True))
    assert changed == {2: True, 3: False}


def test_lfm_halves_its_step_on_a_relative_period() -> None:
    method = build_method("lfm", TinyDataset(), halve_every="50%")
    method.ctx.num_epochs = 4
    method.on_fit_start()
    etas = []
    for epoch in range(4):
        method.on_epoch_start(epoch)
        etas.append(float(method.lr_alpha))
    assert etas == [1e-4, 1e-4, 5e-5, 5e-5]


def test_gblending_estimates_on_a_relative_super_epoch(monkeypatch: pytest.MonkeyPatch) -> None:
    method = build_method("gblending", TinyDataset(), super_epoch="50%")
    method.ctx.num_epochs = 4
    windows: list[tuple[int, int]] = []
    monkeypatch.setattr(method, "estimate", lambda epochs: windows.append((method.ctx.epoch, epochs)))
    for epoch in range(4):
        method.ctx.epoch = epoch
        method.on_epoch_start(epoch)
    assert windows == [(0, 2), (2, 2)]


def test_benchmark_adaptations_are_valid_and_make_each_method_act_within_short_protocols() -> None:
    adapted = {name: METHODS.get(name).adapted for name in METHODS.names() if METHODS.get(name).adapted}
    assert set(adapted) == {
        "ogm_ge",
        "pmr",
        "opm",
        "modality_valuation",
        "lfm",
        "relearning",
        "inforeg",
        "g2d",
        "remix",
    }
    for name, values in adapted.items():
        for epochs in (10, 30, 70):
            cfg = resolve_config(name, "embedded", overrides={"method": dict(values)}, sets=[f"train.epochs={epochs}"])
            method = build_method(name, TinyDataset(), **to_dict(cfg.method))
            method.ctx.num_epochs = epochs
            acting = [e for e in range(epochs) if method.acts_in(e)]
            # Acting in the first half means acting before any epoch validation could select late.
            assert acting and acting[0] < epochs // 2, (name, epochs, acting)


def _train(tmp_path: Path, method: str, *sets: str) -> dict[str, Any]:
    return balancemm.train(method, out=tmp_path / method / str(len(sets)), sets=["train.epochs=4", *sets])


def test_summary_records_interventions_and_predictions_that_equal_the_baseline(tmp_path: Path) -> None:
    base = _train(tmp_path, "baseline")
    late = _train(tmp_path, "relearning")  # first re-initialisation after epoch 20: never, in 4 epochs
    early = _train(tmp_path, "relearning", "method.reinit_epoch=25%")  # after epoch 1, 2 and 3
    assert base["intervention"] == {"epochs": [], "first": None, "before_selected": False}
    assert late["intervention"] == {"epochs": [], "first": None, "before_selected": False}
    # A method that never acted is the baseline under another name, down to every test prediction.
    assert late["test"]["predictions_sha256"] == base["test"]["predictions_sha256"]
    assert late["test"]["accuracy"] == base["test"]["accuracy"]
    assert early["intervention"]["epochs"] == [2, 3]  # reinit_num 3, but epoch 4 is past the protocol
    assert early["intervention"]["before_selected"] == (early["selected_epoch"] >= 2)
    assert early["test"]["predictions_sha256"] != base["test"]["predictions_sha256"]
    assert base["per_modality_heads"] == "unimodal" and base["concurrent_jobs"] == 1
