"""The run directory's checkpoints: the torch half of a run directory.

The layout, the JSON files, the lock and the markers are :class:`balancemm.layout.RunFiles` (torch-free, so
the report and a sweep's parent read run directories without torch); :class:`RunDir` adds the checkpoints.
They are written to a temporary name and renamed into place, so a restarted run never loads a half-written
one, and carry a checksum (``balancemm/files.py``): a damaged one stops the run with one line naming it and
what to do, never with different numbers (docs/robustness.md).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from balancemm.files import DamagedFile, load_checked, save_checked
from balancemm.layout import RunFiles, Schema, check_fields

# What a checkpoint must hold, key by key: ``best.pt``'s; the trainer gives ``last.pt``'s.
BEST: Schema = {"epoch": int, "method": dict, "config_hash": str}


class RunDir(RunFiles):
    """A run directory's files (:class:`RunFiles`) with its checkpoints, verified when loaded."""

    def remedy(self, checkpoint: Path) -> str:
        """What to do about a damaged checkpoint of this run."""
        if checkpoint == self.last:
            return "delete it to restart this run from its first epoch"
        return f"the selected epoch's weights are lost: {self._retrain()}"

    def load(self, path: Path, schema: Schema = BEST) -> dict[str, Any]:
        """A checkpoint of this run, verified: its checksum, the keys of ``schema``, and this run's config."""
        try:
            state = load_checked(path)
        except DamagedFile as exc:
            raise DamagedFile(path, exc.problem, self.remedy(path)) from None
        problem = check_fields(state, schema)
        if problem is not None:
            raise DamagedFile(path, f"is not a BalanceMM checkpoint of this kind ({problem})", self.remedy(path))
        own = self.config_hash()
        if own is not None and state["config_hash"] != own:
            raise DamagedFile(
                path, f"belongs to another run (config hash {state['config_hash'][:12]})", self.remedy(path)
            )
        return dict(state)

    def save(self, path: Path, state: dict[str, Any]) -> None:
        save_checked(state, path)
