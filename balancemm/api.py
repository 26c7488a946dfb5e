"""The Python entry points, for notebooks and scripts (re-exported by ``balancemm``)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from balancemm.config import RunConfig, deep_merge, resolve_config
from balancemm.errors import ConfigError
from balancemm.files import PARTIAL
from balancemm.layout import CONFIG_FILE, ENTRIES, RunFiles, default_out

if TYPE_CHECKING:
    from balancemm.engine.trainer import Trainer
    from balancemm.models import MultimodalClassifier

__all__ = ["check_run_out", "create_model", "default_out", "list_datasets", "train"]


def check_run_out(out: str | Path) -> None:
    """Refuse to train into a directory that holds files of its own and no run (a run holds its
    ``config.json``): the run's files would land among someone else's. A new or empty directory, or the
    run's own (it resumes, or the trainer refuses a different config), is fine."""
    if not str(out).strip():  # Path("") would be the current directory
        raise ConfigError("the run directory is an empty path; give a directory, or none for the default")
    path = Path(out)
    if not path.is_dir() or RunFiles(path).config.is_file():
        return
    # What a run directory holds (balancemm.layout.ENTRIES): a folder with nothing else is a run's own
    # even without its config.json, e.g. one whose first training was killed before writing it.
    foreign = sorted(p.name for p in path.iterdir() if p.name not in ENTRIES and PARTIAL not in p.name)
    if foreign:
        shown = ", ".join(foreign[:3]) + (", …" if len(foreign) > 3 else "")
        raise ConfigError(
            f"{path} holds no run (no {CONFIG_FILE}) but other files ({shown}); choose a new or empty directory"
        )


def train(
    method: str,
    dataset: str | None = None,
    *,
    seed: int | None = None,
    config: str | Path | None = None,
    sets: Iterable[str] = (),
    overrides: Mapping[str, Any] | None = None,
    out: str | Path | None = None,
    device: str = "auto",
    progress: bool = False,
    **hparams: Any,
) -> dict[str, Any]:
    """Train one method, select on validation, test once; return the run's summary dict.

    Example::

        import balancemm
        s = balancemm.train("ogm_ge", seed=1, alpha=0.3, overrides={"train": {"epochs": 10}})
        s["test"]["accuracy"], s["shapley"], s["imbalance"], s["flops"]["total"]

    ``device`` is ``auto`` (a GPU if there is one, else the CPU), ``cpu``, ``cuda`` or ``cuda:N``.
    ``hparams`` are the method's hyper-parameters (``method.*`` keys); ``overrides`` is a nested
    mapping with the same sections as a config file; ``sets`` takes ``"a.b=v"`` strings like ``--set``.
    The run directory defaults to ``runs/<method>-<dataset>-seed<N>-<hash8>``; calling again with the
    same arguments resumes an interrupted run or returns the finished one.
    """
    extra = {"method": {k: v for k, v in hparams.items() if v is not None}} if hparams else {}
    cfg = resolve_config(
        method, dataset, config_file=config, sets=sets, overrides=deep_merge(overrides or {}, extra), seed=seed
    )
    out = default_out(cfg) if out is None else out
    with trainer_for(cfg, out, device=device, progress=progress) as trainer:
        return trainer.fit()


@contextmanager
def trainer_for(cfg: RunConfig, out: str | Path, *, device: str = "auto", progress: bool = False) -> Iterator[Trainer]:
    """The trainer of a run, in the process group torchrun started if there is one (``balancemm train
    --nproc N`` and ``torchrun ... -m balancemm train``); the group is left when the block ends."""
    from balancemm.device import resolve_device
    from balancemm.distributed import start, stop
    from balancemm.engine.trainer import Trainer

    world = start(resolve_device(device).type)
    try:
        if world.main:  # the other ranks would see rank 0's run directory being made
            check_run_out(out)
        yield Trainer(cfg, out, device=device, progress=progress, world=world)
    finally:
        stop(world)


def create_model(dataset: str = "embedded", method: str = "baseline", **resolve: Any) -> MultimodalClassifier:
    """The model a run of ``method`` on ``dataset`` would train (a ``MultimodalClassifier``).

    ``resolve`` takes the keyword arguments of :func:`balancemm.config.resolve_config`
    (``sets``, ``overrides``, ``config_file``, ``seed``).
    """
    from balancemm.data import create_dataset
    from balancemm.methods import METHODS
    from balancemm.models import ModelSpec, build_model

    cfg = resolve_config(method, dataset, **resolve)
    data = create_dataset(cfg.run.dataset, cfg.data)
    spec = ModelSpec.from_config(cfg.model, data.input_shapes, data.num_classes)
    return build_model(METHODS.get(cfg.run.method).model_spec(spec, cfg.method))


def list_datasets() -> list[str]:
    from balancemm.data import DATASETS

    return DATASETS.names()
