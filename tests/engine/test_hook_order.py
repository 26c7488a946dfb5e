"""The trainer calls the hooks in exactly the documented order (Lightning's hook-order test)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from balancemm.config import resolve_config
from balancemm.engine.trainer import Trainer
from balancemm.methods import METHODS, Method
from balancemm.methods.baseline import Baseline
from tests.conftest import TinyDataset

CALLS: list[str] = []


class Recording(Baseline):
    @classmethod
    def model_spec(cls, spec: Any, hp: Any) -> Any:
        CALLS.append("model_spec")
        return spec

    def on_fit_start(self) -> None:
        CALLS.append("on_fit_start")

    def on_epoch_start(self, epoch: int) -> None:
        CALLS.append(f"on_epoch_start:{epoch}")

    def forward(self, batch: Any) -> Any:
        CALLS.append("forward")
        return super().forward(batch)

    def losses(self, out: Any, batch: Any) -> Any:
        CALLS.append("losses")
        return super().losses(out, batch)

    def backward(self, losses: Any) -> None:
        CALLS.append("backward")
        super().backward(losses)

    def after_backward(self, out: Any, batch: Any) -> None:
        CALLS.append(f"after_backward:{self.ctx.step}")

    def on_epoch_end(self, epoch: int) -> None:
        CALLS.append(f"on_epoch_end:{epoch}")

    def predict(self, batch: Any) -> Any:
        CALLS.append(f"predict:{'train' if self.training else 'eval'}")
        return super().predict(batch)


def test_hook_order(tmp_path: Path) -> None:
    CALLS.clear()
    # 24 train rows / batch 8 = 3 steps; val and test (24 rows each) fit in one eval batch each.
    with METHODS.temporary():
        METHODS.register("recording", group="reference")(Recording)
        sets = ["train.epochs=2", "train.batch_size=8", "train.eval_batch_size=24"]
        sets += [f"model.encoders.{m}.channels=[4,6]" for m in ("audio", "visual")]
        Trainer(resolve_config("recording", sets=sets), tmp_path / "r", progress=False, dataset=TinyDataset()).fit()
    step = ["forward", "losses", "backward"]

    def epoch(e: int, s0: int) -> list[str]:
        steps = [x for k in range(3) for x in [*step, f"after_backward:{s0 + k}"]]
        return [f"on_epoch_start:{e}", *steps, f"on_epoch_end:{e}"]

    # with a custom predict, evaluation runs it for the full batch and once per other coalition (∅, a, v)
    evaluation = ["predict:eval"] * 4
    # The test split is scored twice: under the run's masking rule and under the other (shapley_by_mask).
    test = [*evaluation, *evaluation]
    assert ["model_spec", "on_fit_start", *epoch(0, 0), *evaluation, *epoch(1, 3), *evaluation, *test] == CALLS
    assert Method.train_epoch is Recording.train_epoch  # the default loop was used
