"""The run directory's layout: the one module that names a run's files, and reads and writes its JSON.

Layout::

    config.json          resolved config + its hash, the dataset's facts (written before training starts)
    results.jsonl        one self-describing JSON line per evaluation (val each epoch, test once)
    summary.json         the final numbers (see README "Run directory")
    probe.json           linear-probe results of the selected weights (``balancemm probe``), if probed
    eval.json            evaluations of the selected weights under corruptions (``balancemm eval``), by key
    checkpoints/last.pt  full training state after the latest epoch (resume point)
    checkpoints/best.pt  weights of the epoch selected on validation
    tb/                  TensorBoard scalars
    done | failed        completion marker; ``failed`` holds the reason
    .lock                locked by the one process training (or probing) the run

Beside the run directory a sweep worker holds the job's own lock (:func:`job_lock`).

Torch-free (``json``, ``fcntl`` and ``pathlib``): the report and a sweep's parent process read run
directories through :class:`RunFiles` without importing torch. The checkpoints are read and written by
``balancemm/engine/rundir.py``'s ``RunDir``, which adds their torch half to :class:`RunFiles`.

Every JSON file is written to a temporary name and renamed into place (``balancemm/files.py``), so a
reader never sees a half-written file; every file read back is checked, so a damaged one stops the run
with one line naming it and what to do, never with different numbers (docs/robustness.md).
"""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from balancemm.errors import BalanceMMError, ConfigError
from balancemm.files import DamagedFile, remove_partials, write_atomic

if TYPE_CHECKING:
    from balancemm.config import RunConfig

CONFIG_FILE = "config.json"
RESULTS_FILE = "results.jsonl"
SUMMARY_FILE = "summary.json"
PROBE_FILE = "probe.json"
EVAL_FILE = "eval.json"
CHECKPOINTS_DIR = "checkpoints"
LAST_CHECKPOINT = f"{CHECKPOINTS_DIR}/last.pt"
BEST_CHECKPOINT = f"{CHECKPOINTS_DIR}/best.pt"
TENSORBOARD_DIR = "tb"
DONE_MARKER = "done"
FAILED_MARKER = "failed"
LOCK_FILE = ".lock"
#: Every name at the top of a run directory. A folder with nothing else is a run's own even without its
#: config.json, e.g. one whose first training was killed before writing it.
ENTRIES = frozenset(
    {
        CONFIG_FILE,
        RESULTS_FILE,
        SUMMARY_FILE,
        PROBE_FILE,
        EVAL_FILE,
        CHECKPOINTS_DIR,
        TENSORBOARD_DIR,
        DONE_MARKER,
        FAILED_MARKER,
        LOCK_FILE,
    }
)
#: The ``schema`` version written into summary.json and into every record of results.jsonl.
SCHEMA_VERSION = 1

# What a JSON object (or a checkpoint's dict) must hold, key by key.
Schema = Mapping[str, type | tuple[type, ...]]
# What the summary of a finished run must hold to be returned again (read by ``balancemm train``'s table).
SUMMARY_FIELDS: Schema = {
    "config_hash": str,
    "method": str,
    "dataset": str,
    "seed": int,
    "modalities": list,
    "selected_epoch": int,
    "selection": dict,
    "test": dict,
    "shapley": dict,
    "coalition_values": dict,
    "imbalance": (float, int, type(None)),
    "flops": dict,
    "params": dict,
    "train_time_s": (float, int),
    "peak_memory_mb": (float, int, type(None)),
}


#: The exit status of a command whose run or sweep job another live process holds (EX_TEMPFAIL): the
#: same command works once that process is done.
BUSY = 75


class RunInUse(BalanceMMError):
    """Another live process holds the run directory's lock: it is training or probing that run."""

    exit_code = BUSY


def default_out(cfg: RunConfig, root: str | Path = "runs") -> Path:
    """``runs/<method>-<dataset>-seed<N>-<hash8>``: the same command always finds the same directory."""
    return Path(root) / f"{cfg.run.method}-{cfg.run.dataset}-seed{cfg.run.seed}-{cfg.digest()[:8]}"


def job_lock(out: Path) -> Path:
    """The lock a sweep worker holds beside the run directory ``out`` while it trains that job."""
    return out.parent / f".{out.name}{LOCK_FILE}"


def parse_json(path: Path) -> Any:
    """The JSON in ``path``, read as UTF-8 whatever the locale's encoding; the caller handles ``OSError``,
    ``UnicodeDecodeError`` and ``json.JSONDecodeError`` (both ``ValueError``)."""
    return json.loads(path.read_bytes().decode("utf-8"))


def write_json(path: Path, obj: Any) -> None:
    write_atomic(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def read_json(path: Path, remedy: str = "delete it and run the same command again") -> Any:
    """The JSON in ``path``; unreadable bytes or invalid JSON are a :class:`DamagedFile` saying ``remedy``."""
    try:
        return parse_json(path)
    except UnicodeDecodeError:
        raise DamagedFile(path, "is not UTF-8 text", remedy) from None
    except json.JSONDecodeError as exc:
        raise DamagedFile(
            path, f"is not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})", remedy
        ) from None


def check_fields(obj: Any, schema: Schema) -> str | None:
    """Why ``obj`` does not fit ``schema`` (a JSON object or dict with those keys and types), or None."""
    if not isinstance(obj, dict):
        return f"holds a {type(obj).__name__}, not a mapping"
    for key, kind in schema.items():
        if key not in obj:
            return f"has no {key!r}"
        if not isinstance(obj[key], kind):
            return f"has a {type(obj[key]).__name__} as {key!r}"
    return None


def read_record(line: bytes) -> dict[str, Any] | None:
    """One line of results.jsonl as a record (a JSON object with a split and an epoch), or None."""
    try:
        rec = json.loads(line.decode())
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    ok = isinstance(rec, dict) and isinstance(rec.get("split"), str) and isinstance(rec.get("epoch"), int)
    return rec if ok else None


def standard_eval(run: RunFiles) -> dict[str, Any] | None:
    """The run's standard evaluation under corruptions (``balancemm eval RUN_DIR`` with its defaults, as
    ``sweep --robustness`` runs it) from eval.json, or None when it has none."""
    if not run.eval.is_file():
        return None
    stored = read_json(run.eval, "delete it and evaluate again")
    if not isinstance(stored, dict):
        raise DamagedFile(run.eval, "is not a BalanceMM evaluation file", "delete it and evaluate again")
    return next((v for v in stored.values() if isinstance(v, dict) and v.get("standard") is True), None)


class RunFiles:
    """Paths of one run directory, and the torch-free readers and writers of its files."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.config = self.path / CONFIG_FILE
        self.results = self.path / RESULTS_FILE
        self.summary = self.path / SUMMARY_FILE
        self.probe = self.path / PROBE_FILE
        self.eval = self.path / EVAL_FILE
        self.checkpoints = self.path / CHECKPOINTS_DIR
        self.last = self.path / LAST_CHECKPOINT
        self.best = self.path / BEST_CHECKPOINT
        self.tensorboard = self.path / TENSORBOARD_DIR
        self.done = self.path / DONE_MARKER
        self.failed = self.path / FAILED_MARKER
        self.lock = self.path / LOCK_FILE

    def _retrain(self) -> str:
        return f"delete {self.path} and train it again"

    # -- reading ---------------------------------------------------------------------------------

    def read_config(self) -> dict[str, Any]:
        """config.json: the resolved config (``config``) and its hash (``config_hash``)."""
        saved = read_json(self.config, self._retrain())
        problem = check_fields(saved, {"config": dict, "config_hash": str})
        if problem is not None:
            raise DamagedFile(self.config, f"is not a run's config ({problem})", self._retrain())
        return dict(saved)

    def config_hash(self) -> str | None:
        """The hash of the config already saved here, if any."""
        if not self.config.is_file():
            return None
        return str(self.read_config()["config_hash"])

    def read_summary(self) -> dict[str, Any]:
        """summary.json of a finished run; a damaged one can be rebuilt from the checkpoints."""
        remedy = "delete it and run the same command again: the test evaluation is redone from the checkpoints"
        summary = read_json(self.summary, remedy)
        problem = check_fields(summary, SUMMARY_FIELDS)
        if problem is None and summary["config_hash"] != self.config_hash():
            problem = f"config hash {summary['config_hash'][:12]}, not this run's"
        if problem is not None:
            raise DamagedFile(self.summary, f"is not this run's summary ({problem})", remedy)
        return dict(summary)

    # -- writing ---------------------------------------------------------------------------------

    def create(self, config: dict[str, Any]) -> None:
        """Create the directory (or reopen it to resume); an unusable path is a user error.

        config.json comes first, so (but for a kill while it is written) the directory never holds other
        files without it: ``train --out`` refuses such a directory as someone else's.
        """
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            if not self.config.is_file():
                write_json(self.config, config)
            self.checkpoints.mkdir(exist_ok=True)
        except OSError as exc:
            raise ConfigError(
                f"cannot create the run directory {self.path} ({exc.strerror or exc}); choose another --out"
            ) from None

    @contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the directory's exclusive lock inside: another process that wants it is refused
        (:class:`RunInUse`) rather than writing every record a second time.

        The kernel releases the lock when its process dies, however it dies. It is a file of its own, not
        the job lock a sweep worker holds beside the directory, so a worker can train its job. Whoever
        holds it is the only writer here, so the partial files left by a killed writer are removed.
        """
        try:
            fd = os.open(self.lock, os.O_CREAT | os.O_RDWR, 0o644)
        except OSError as exc:
            raise ConfigError(f"cannot lock the run directory {self.path} ({exc.strerror or exc})") from None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 32).decode(errors="replace").strip()
                pid = f" (pid {holder})" if holder.isdigit() else ""
                raise RunInUse(
                    f"{self.path} is in use by another balancemm process{pid} training or probing it; "
                    "wait for it to finish, then run the command again"
                ) from None
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
            remove_partials(self.path, all_of_them=True)
            remove_partials(self.checkpoints, all_of_them=True)
            yield
        finally:
            os.close(fd)

    def append_record(self, record: dict[str, Any]) -> None:
        with open(self.results, "a") as fh:
            fh.write(json.dumps(record, sort_keys=True) + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    def truncate_records(self, last_epoch: int) -> None:
        """Keep the validation records of epochs 0 to ``last_epoch`` (the resume point; -1 when there is
        no checkpoint yet), dropping what a killed run wrote after its last checkpoint: an epoch redone is
        written again. Those records must be there, each once; a line cut short by a kill can only be
        the last."""
        if not self.results.is_file():
            if last_epoch >= 0:
                raise DamagedFile(
                    self.results, f"is missing, yet the checkpoint is at epoch {last_epoch}", self._retrain()
                )
            return
        lines = self.results.read_bytes().split(b"\n")
        lines.pop()  # what follows the last newline: nothing, or a line cut short by a kill
        keep, epochs = [], []
        for number, line in enumerate(lines, 1):
            rec = read_record(line)
            if rec is None:
                raise DamagedFile(self.results, f"line {number} is not a JSON record", self._retrain())
            if rec["split"] == "val" and rec["epoch"] <= last_epoch:
                keep.append(line)
                epochs.append(rec["epoch"])
        if epochs != list(range(last_epoch + 1)):
            raise DamagedFile(
                self.results,
                f"does not hold one validation record for each epoch up to the checkpoint's ({last_epoch})",
                self._retrain(),
            )
        write_atomic(self.results, b"".join(line + b"\n" for line in keep))

    def mark_failed(self, reason: str) -> None:
        self.done.unlink(missing_ok=True)
        write_atomic(self.failed, (reason + "\n").encode())

    def mark_done(self) -> None:
        write_atomic(self.done, b"")
