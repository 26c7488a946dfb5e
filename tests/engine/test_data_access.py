"""Methods cannot reach the test split; validation only when declared, and the summary says so."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any, ClassVar

import pytest

import balancemm
from balancemm.context import DataAccessError
from balancemm.methods import METHODS, Needs, RunContext
from balancemm.methods.baseline import Baseline
from tests.conftest import TinyDataset


def test_test_split_is_unreachable_and_val_needs_declaring() -> None:
    data = TinyDataset()
    ctx = RunContext(data.modalities, dataset=data)
    with pytest.raises(DataAccessError, match="test split"):
        ctx.batches("test")
    with pytest.raises(DataAccessError, match=r"needs\.val"):
        ctx.batches("val")
    assert len(ctx.batches("train")) > 0
    ctx = RunContext(data.modalities, dataset=data, needs=Needs(val=True))
    assert len(ctx.batches("val")) > 0 and ctx.used_val


class PeeksAtVal(Baseline):
    needs: ClassVar[Needs] = replace(Baseline.needs, val=True)

    def on_epoch_start(self, epoch: int) -> Any:
        next(iter(self.ctx.batches("val")))
        return None


def test_summary_records_validation_use(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    plain = balancemm.train("baseline", out=tmp_path / "a", sets=["train.epochs=1"])
    assert plain["used_validation_in_training"] is False
    with METHODS.temporary():
        METHODS.register("peeks_at_val", group="reference")(PeeksAtVal)
        peek = balancemm.train("peeks_at_val", out=tmp_path / "b", sets=["train.epochs=1"])
    assert peek["used_validation_in_training"] is True
