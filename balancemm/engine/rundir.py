"""The run directory: everything a run writes, written so that a kill at any moment is harmless.

Layout::

    config.json          resolved config + its hash, the dataset's facts (written before training starts)
    results.jsonl        one self-describing JSON line per evaluation (val each epoch, test once)
    summary.json         the final numbers (see README "Run directory")
    checkpoints/last.pt  full training state after the latest epoch (resume point)
    checkpoints/best.pt  weights of the epoch selected on validation
    tb/                  TensorBoard scalars
    done | failed        completion marker; ``failed`` holds the reason

Every JSON file and checkpoint is written to a temporary name and renamed into place, so a reader
never sees a half-written file and a restarted run never loads one.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from balancemm.errors import ConfigError
from balancemm.files import atomic_file, write_atomic


def write_json(path: Path, obj: Any) -> None:
    write_atomic(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())


class RunDir:
    """Paths and atomic writers of one run directory."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.config = self.path / "config.json"
        self.results = self.path / "results.jsonl"
        self.summary = self.path / "summary.json"
        self.checkpoints = self.path / "checkpoints"
        self.last = self.checkpoints / "last.pt"
        self.best = self.checkpoints / "best.pt"
        self.tensorboard = self.path / "tb"
        self.done = self.path / "done"
        self.failed = self.path / "failed"

    def config_hash(self) -> str | None:
        """The hash of the config already saved here, if any."""
        if not self.config.is_file():
            return None
        return str(read_json(self.config).get("config_hash"))

    def create(self, config: dict[str, Any]) -> None:
        """Create the directory (or reopen it to resume); an unusable path is a user error."""
        try:
            self.checkpoints.mkdir(parents=True, exist_ok=True)
            if not self.config.is_file():
                write_json(self.config, config)
            self.failed.unlink(missing_ok=True)
        except OSError as exc:
            raise ConfigError(
                f"cannot create the run directory {self.path} ({exc.strerror or exc}); choose another --out"
            ) from None

    def append_record(self, record: dict[str, Any]) -> None:
        with open(self.results, "a") as fh:
            fh.write(json.dumps(record, sort_keys=True) + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    def truncate_records(self, last_epoch: int) -> None:
        """Drop records beyond the resume point (an epoch redone after a kill is written again)."""
        if not self.results.is_file():
            return
        keep = []
        for line in self.results.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a kill
            if rec.get("split") == "val" and rec.get("epoch", -1) <= last_epoch:
                keep.append(line)
        write_atomic(self.results, "".join(k + "\n" for k in keep).encode())

    def save(self, path: Path, state: dict[str, Any]) -> None:
        with atomic_file(path) as fh:
            torch.save(state, fh)

    def load(self, path: Path) -> dict[str, Any]:
        return torch.load(path, map_location="cpu", weights_only=True)

    def mark_failed(self, reason: str) -> None:
        self.done.unlink(missing_ok=True)
        write_atomic(self.failed, (reason + "\n").encode())

    def mark_done(self) -> None:
        write_atomic(self.done, b"")
