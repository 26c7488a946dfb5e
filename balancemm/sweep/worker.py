"""One sweep job in its own process: ``python -m balancemm.sweep.worker JOB.json``.

The worker holds an exclusive lock on the job for as long as it trains, so a job is never trained
twice at once: not when a sweep is restarted while the workers of a killed sweep still run, and not
when two sweeps share jobs. The lock is released by the kernel when the process dies, however it dies;
the run itself then resumes from its last checkpoint the next time the job is started.

The job description names the device (``cpu``, or ``cuda`` when the launcher gave this process one GPU
through ``CUDA_VISIBLE_DEVICES``; ``auto`` when it names none).

Exit codes: 0 done, 75 the job is locked by another live process, 3 training diverged, 2 user error,
1 anything else (the run directory holds a ``failed`` marker with the reason).
"""

from __future__ import annotations

import fcntl
import json
import os
import sys
from pathlib import Path

from balancemm.layout import BUSY, RunFiles, job_lock


def main(argv: list[str]) -> int:
    try:
        job = json.loads(Path(argv[0]).read_text())
    except (OSError, ValueError, IndexError) as exc:  # written by the launcher: only a broken sweep folder
        print(
            f"balancemm: error: cannot read the sweep job file {argv[:1]} ({exc}); run the sweep again", file=sys.stderr
        )
        return 2
    out = Path(job["out"])
    out.parent.mkdir(parents=True, exist_ok=True)
    lock = os.open(job_lock(out), os.O_CREAT | os.O_RDWR, 0o644)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return BUSY
    from balancemm.config import RunConfig
    from balancemm.engine.trainer import Trainer
    from balancemm.errors import BalanceMMError

    try:
        cfg = RunConfig.from_dict(job["config"])
        trainer = Trainer(
            cfg, out, device=job.get("device", "auto"), progress=False, concurrent_jobs=job.get("concurrent_jobs")
        )
        summary = trainer.fit()
        if job.get("probe") and len(summary["modalities"]) > 1 and not RunFiles(out).probe.is_file():
            from balancemm.engine.probe import probe_run

            # The unimodal counterparts of the paper's Fig. 2, for the report, on the job's device.
            probe_run(out, device=job.get("device", "auto"))
        if job.get("robustness") and len(summary["modalities"]) > 1:
            from balancemm.engine.corrupted import eval_run

            # The report's robustness table and curves: computed once (eval.json), on the job's device.
            eval_run(out, device=job.get("device", "auto"))
    except BalanceMMError as exc:
        print(f"balancemm: error: {exc}", file=sys.stderr)
        return exc.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
