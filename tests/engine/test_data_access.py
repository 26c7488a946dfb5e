"""Methods cannot reach the test split; validation only when declared, and the summary says so."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, ClassVar

import pytest

import balancemm
from balancemm.context import DataAccessError
from balancemm.data import DATASETS
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


@dataclass(frozen=True)
class NoOptions:
    pass


class Registered(TinyDataset):
    """TinyDataset under a registered name, so that ``balancemm.train`` runs on it in a fraction of a second."""

    Options: ClassVar[type] = NoOptions
    name: ClassVar[str] = "registered_tiny"

    def __init__(self, options: NoOptions = NoOptions()) -> None:
        super().__init__()


@pytest.fixture
def tiny_name() -> Iterator[str]:
    encoders = {m: {"name": "cnn", "channels": [4, 6]} for m in ("audio", "visual")}
    with DATASETS.temporary(), METHODS.temporary():
        DATASETS.register(Registered.name, modalities=("audio", "visual"), protocol={"model": {"encoders": encoders}})(
            Registered
        )
        METHODS.register("peeks_at_val", group="reference")(PeeksAtVal)
        yield Registered.name


def test_summary_records_validation_use(tmp_path: Path, tiny_name: str) -> None:
    sets = ["train.epochs=1", "train.batch_size=8"]
    plain = balancemm.train("baseline", tiny_name, out=tmp_path / "a", sets=sets)
    assert plain["used_validation_in_training"] is False
    peek = balancemm.train("peeks_at_val", tiny_name, out=tmp_path / "b", sets=sets)
    assert peek["used_validation_in_training"] is True
