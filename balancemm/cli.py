"""The ``balancemm`` command: ``train``, ``eval``, ``config``, ``list``, ``sweep``, ``bench``, ``probe``, ``report``,
``data``.

Any user error is printed as one line (``balancemm: error: …``) with a nonzero exit and no traceback.
Heavy imports happen inside the subcommands, so ``balancemm --help`` is instant.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from balancemm import __version__
from balancemm.errors import BalanceMMError, ConfigError, SweepFailed

SHOWN = 5  # problems named one by one on the terminal; the rest are counted


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # argparse prints the usage block too; one line is easier to read and to grep.
        self.exit(2, f"balancemm: error: {message} (see {self.prog} --help)\n")


def _path(value: str) -> str:
    """A path argument. An empty one (``--out ''``, often an unset shell variable) is refused: read as
    "not given" it would silently mean the default, and as a path it would mean the current directory."""
    if not value.strip():
        raise argparse.ArgumentTypeError("empty path; give a file or directory name")
    return value


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="balancemm", description="Multimodal imbalance learning: methods, datasets, metrics.")
    p.add_argument("--version", action="version", version=f"balancemm {__version__}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    t = sub.add_parser("train", help="train one method, select on validation, test once")
    c = sub.add_parser("config", help="print the resolved config as YAML (method defaults + protocol + overrides)")
    for cmd in (t, c):
        cmd.add_argument("--method", help="registry name or alias, e.g. ogm_ge (or run.method in --config)")
        cmd.add_argument("--dataset", default=None, help="registry name (default: embedded, needs no download)")
        cmd.add_argument(
            "--config", type=_path, default=None, help="YAML file with sections run/method/data/model/train"
        )
        cmd.add_argument(
            "--set",
            dest="sets",
            nargs="+",
            action="extend",
            default=[],
            metavar="KEY=VALUE",
            help="override config keys, e.g. --set train.epochs=5 method.alpha=0.3",
        )
        cmd.add_argument("--seed", type=int, default=None)
    t.add_argument(
        "--out",
        type=_path,
        default=None,
        help="run directory: new, empty or the run's own (default: runs/<method>-<dataset>-seed<N>-<hash>)",
    )
    t.add_argument("--device", default="auto", help="auto (a GPU if there is one), cpu, cuda or cuda:N")
    t.add_argument("--quiet", action="store_true", help="no progress bars")
    t.add_argument(
        "--nproc",
        type=int,
        default=None,
        metavar="N",
        help="data-parallel training on N processes of this machine (one per GPU; gloo on CPUs), started "
        "through torch's launcher; train.batch_size stays the global batch",
    )

    ls = sub.add_parser("list", help="list registered methods or datasets")
    ls.add_argument("what", choices=["methods", "datasets"])
    ls.add_argument("--group", default=None, help="only methods of this taxonomy group")

    sw = sub.add_parser("sweep", help="train a grid of methods × datasets × seeds × trials; reruns skip finished jobs")
    sw.add_argument(
        "spec", nargs="?", type=_path, default=None, help="YAML file with methods/datasets/seeds/trials/search/sets"
    )
    sw.add_argument("--methods", default=None, help="comma-separated keys, or 'all' (default: all)")
    sw.add_argument("--datasets", default=None, help="comma-separated keys (default: embedded)")
    sw.add_argument("--seeds", type=int, default=None, help="number of seeds 0..N-1 (default: 3)")
    sw.add_argument("--trials", type=int, default=None, help="hyper-parameter trials per method (default: 1)")
    sw.add_argument("--adapt", action="store_true", help="start every job from its method's protocol adaptation")
    sw.add_argument("--set", dest="sets", nargs="+", action="extend", default=[], metavar="KEY=VALUE")
    sw.add_argument(
        "--root", type=_path, default="runs/sweep", help="where the job directories go (default: runs/sweep)"
    )
    sw.add_argument("--jobs", type=int, default=None, help="jobs at once (default: one per core or GPU slot; ray: all)")
    sw.add_argument("--launcher", choices=["local", "ray"], default="local", help="where jobs run (default: local)")
    sw.add_argument(
        "--address", default=None, help="Ray cluster address, e.g. auto, head:6379 or ray://head:10001 (ray only)"
    )
    sw.add_argument("--probe", action="store_true", help="linear-probe each multimodal run's encoders (Fig. 2)")
    sw.add_argument(
        "--robustness", action="store_true", help="evaluate each multimodal run with modalities missing or corrupted"
    )
    sw.add_argument("--dry-run", action="store_true", help="list the jobs, their settings and status; train none")
    sw.add_argument("--quiet", action="store_true", help="no progress output")

    be = sub.add_parser(
        "bench", help="every method, baseline and unimodal on a dataset with 3 seeds, then the report (sweep --adapt)"
    )
    be.add_argument("--dataset", default="embedded", help="registry name (default: embedded)")
    be.add_argument("--seeds", type=int, default=3)
    be.add_argument("--trials", type=int, default=3, help="hyper-parameter trials per tuned method (default: 3)")
    be.add_argument(
        "--set", dest="sets", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
        help="config keys for every job, e.g. --set data.root=data/cremad",
    )  # fmt: skip
    be.add_argument(
        "--root", type=_path, default="runs/bench", help="where the job directories go (default: runs/bench)"
    )
    be.add_argument("--jobs", type=int, default=None, help="jobs at once (default: one per CPU core or GPU slot)")
    be.add_argument(
        "--report", type=_path, default="reports/bench", help="where the report goes (default: reports/bench)"
    )
    be.add_argument(
        "--robustness", action="store_true", help="also evaluate every run with modalities missing or corrupted"
    )
    be.add_argument("--quiet", action="store_true", help="no progress output")
    be.add_argument("--dry-run", action="store_true", help="list the jobs, their settings and status; train none")
    for cmd in (sw, be):
        cmd.add_argument(
            "--device",
            default="auto",
            help="auto (the GPUs if any, under Ray the cluster's; else the CPU), cpu, cuda, cuda:N (all on GPU N)",
        )
        cmd.add_argument(
            "--gpus-per-job",
            type=float,
            default=None,
            metavar="F",
            help="share of a GPU each job takes, at most 1: 0.5 puts two jobs on each GPU (default: 1)",
        )

    pr = sub.add_parser("probe", help="linear-probe each encoder of a finished run (Fig. 2's counterparts)")
    pr.add_argument("run_dir", type=_path)
    pr.add_argument("--modality", default=None)
    pr.add_argument("--device", default="auto", help="where features are extracted: auto, cpu, cuda or cuda:N")

    ev = sub.add_parser(
        "eval", help="evaluate a finished run's selected weights, clean and with a modality missing or corrupted"
    )
    ev.add_argument("run_dir", type=_path)
    ev.add_argument("--split", default="test", help="val or test (default: test)")
    ev.add_argument("--dataset", default=None, help="another dataset with the run's modalities (default: the run's)")
    ev.add_argument("--set", nargs="+", default=[], metavar="data.KEY=VALUE", help="data options, e.g. data.root=…")
    ev.add_argument(
        "--corrupt",
        nargs="+",
        default=["all"],
        metavar="SPEC",
        help="MODALITY:KIND (kinds: missing, gaussian, time_mask, blur, token_drop), MODALITY (its defaults) or "
        "all (default)",
    )
    ev.add_argument(
        "--severities", type=_severities, default=None, metavar="S,S,…", help="in [0, 1] (default: 0,0.25,0.5,0.75,1)"
    )
    ev.add_argument("--seed", type=int, default=0, help="the corruptions' seed (default: 0)")
    ev.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")

    rp = sub.add_parser("report", help="tables and figures from finished run directories (no torch needed)")
    rp.add_argument("runs_dir", type=_path, help="directory searched recursively for run directories")
    rp.add_argument(
        "--out", type=_path, required=True, help="output directory (replaced atomically if it is a previous report)"
    )
    rp.add_argument("--oracle", action="store_true", help="also a test-selected Table 2, labelled as a diagnostic")
    rp.add_argument("--allow-unfair", action="store_true", help="report even if the protocol check fails (flagged)")
    rp.add_argument("--no-plots", action="store_true", help="tables only (no matplotlib needed)")
    da = sub.add_parser("data", help="prepare real datasets from their raw release, check them, list audio profiles")
    dsub = da.add_subparsers(dest="data_command", required=True, parser_class=_Parser)
    dp = dsub.add_parser("prepare", help="raw release → model-ready arrays (restartable: rerun to resume)")
    dp.add_argument("name", help="dataset, e.g. cremad, kinetics_sounds, vggsound, balanced_av")
    dp.add_argument(
        "--raw", type=_path, required=True, help="the raw release folder (see the README's Datasets section)"
    )
    dp.add_argument(
        "--out", type=_path, required=True, help="where the prepared data goes (new or an unfinished prepare)"
    )
    dp.add_argument("--profile", default=None, help="audio profile (default: the dataset's; see `data profiles`)")
    dp.add_argument(
        "--frame-size",
        type=int,
        default=224,
        help="largest shorter side of the stored frames; smaller frames are stored as they are (default 224)",
    )
    dp.add_argument("--workers", type=int, default=None, help="parallel processes (default: one per CPU core)")
    dp.add_argument(
        "--option", dest="options", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
        help="dataset-specific settings, e.g. --option tokenizer=DIR (food101)",
    )  # fmt: skip
    dp.add_argument("--quiet", action="store_true", help="no progress bar")
    dc = dsub.add_parser("check", help="missing or unreadable clips, and whether results stay comparable")
    dc.add_argument("name")
    dc.add_argument("--root", type=_path, required=True, help="prepared folder or OGM-GE/BalanceMM layout")
    dc.add_argument("--set", dest="sets", nargs="+", action="extend", default=[], metavar="data.KEY=VALUE")
    dc.add_argument("--quiet", action="store_true", help="no progress bar")
    dsub.add_parser("profiles", help="the named audio preprocessing profiles and their parameters")
    return p


def format_summary(s: dict[str, Any], run_dir: str) -> str:
    """The concise table printed after training."""
    test, sel = s["test"], s["selection"]
    lines = [
        f"{s['method']} on {s['dataset']} (seed {s['seed']})  →  {run_dir}",
        f"selected epoch {s['selected_epoch']} on validation {sel['metric']} = {100 * sel['value']:.2f}",
        f"{'':12s}{'accuracy':>10s}{'macro-F1':>10s}{'Shapley φ':>12s}",
        f"{'fused':12s}{100 * test['accuracy']:10.2f}{100 * test['macro_f1']:10.2f}",
    ]
    for m in s["modalities"]:
        pm = test["per_modality"][m]
        lines.append(f"{m:12s}{100 * pm['accuracy']:10.2f}{100 * pm['macro_f1']:10.2f}{100 * s['shapley'][m]:12.2f}")
    imb = s["imbalance"]
    lines.append(
        f"imbalance degree {'n/a (one modality)' if imb is None else f'{100 * imb:.2f}'}   "
        f"v(∅) = {100 * s['coalition_values']['empty']:.2f}"
    )
    flops = s["flops"]
    if flops["total"] is not None:
        from balancemm.report.tables import eng  # the report's FLOP format, so the numbers read alike

        parts = ", ".join(f"{k} {eng(v)}" for k, v in flops["by_phase"].items())
        lines.append(f"training FLOPs {eng(flops['total'])} ({parts})")
    mem = f"{s['peak_memory_mb']:.0f} MB" if s["peak_memory_mb"] is not None else "n/a"
    lines.append(f"train time {s['train_time_s']:.1f} s   peak memory {mem}   parameters {s['params']['total']:,}")
    return "\n".join(lines)


def _train(args: argparse.Namespace) -> int:
    from balancemm.api import default_out, trainer_for
    from balancemm.config import resolve_config

    _end_with_launcher()
    cfg = resolve_config(args.method, args.dataset, config_file=args.config, sets=args.sets, seed=args.seed)
    if args.nproc is not None:
        if args.nproc < 1:
            raise ConfigError(f"--nproc {args.nproc}: the number of processes must be at least 1")
        if args.nproc > 1:
            return _launch(args.nproc, args.argv)
    out = args.out if args.out is not None else str(default_out(cfg))
    with trainer_for(cfg, out, device=args.device, progress=not args.quiet) as trainer:
        warning = missing_clips_warning(cfg.run.dataset, trainer.data.describe())
        if warning and trainer.world.main:
            print(f"balancemm: warning: {warning}", file=sys.stderr)
        summary = trainer.fit()
        if trainer.world.main:
            print(format_summary(summary, out))
    return 0


#: Set for the workers ``--nproc`` starts: the launcher's process id.
LAUNCHER_PID = "BALANCEMM_LAUNCHER_PID"


def _end_with_launcher() -> None:
    """A worker of ``--nproc`` ends when its launcher does, also when the launcher is killed with SIGKILL:
    left running, it would train on and hold the run directory that the same command, run again, resumes."""
    launcher = os.environ.get(LAUNCHER_PID)
    if launcher is None or not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: killed with the parent
    if os.getppid() != int(launcher):  # the launcher ended before the request took effect
        os._exit(137)


def _launch(nproc: int, argv: list[str]) -> int:
    """``balancemm train … --nproc N``: the same command on N local processes, through torch's launcher
    (torchrun's ``--standalone`` rendezvous); the workers' output reaches this console as it comes."""
    import logging
    import uuid

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    if "WORLD_SIZE" in os.environ:
        raise ConfigError("--nproc inside a launched process: leave --nproc out under torchrun")
    rest, skip = [], False
    for arg in argv:  # the command again, without --nproc (each worker is one process)
        if skip or arg.startswith("--nproc="):
            skip = False
            continue
        skip = arg == "--nproc"
        if not skip:
            rest.append(arg)
    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=nproc,
        run_id=str(uuid.uuid4()),
        rdzv_backend="c10d",
        rdzv_endpoint="localhost:0",
        max_restarts=0,
    )
    # The launcher logs each worker's exit and its own clean-up; the workers' lines say what matters.
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    os.environ[LAUNCHER_PID] = str(os.getpid())  # the workers end with this process (_end_with_launcher)
    try:
        elastic_launch(config, sys.executable)("-m", "balancemm", *rest)
    except ChildFailedError as exc:
        # Rank 0 has said what went wrong; the launcher's report would only repeat it as a traceback.
        codes = [f.exitcode for f in exc.failures.values()]
        return next((c for c in codes if c > 0), 1)
    return 0


def missing_clips_warning(dataset: str, facts: dict[str, Any]) -> str:
    """One line naming the splits that lack listed clips (from the dataset's ``describe()``), or ``""``.

    The run records the counts in its summary, but a user reading the console would otherwise learn of an
    incomplete test split (whose numbers cannot sit beside published ones) only by opening that file.
    """
    missing = {split: n for split, n in facts.get("missing", {}).items() if n}
    if not missing:
        return ""
    counts = ", ".join(f"{split} {n:,}" for split, n in missing.items())
    return (
        f"{sum(missing.values()):,} listed clips have no data ({counts}); "
        f"`balancemm data check {dataset} --root {facts.get('root')}` names them and says whether results "
        "stay comparable with published numbers"
    )


def _config(args: argparse.Namespace) -> int:
    import yaml

    from balancemm.config import resolve_config

    cfg = resolve_config(args.method, args.dataset, config_file=args.config, sets=args.sets, seed=args.seed)
    print(f"# balancemm {__version__}; config hash {cfg.digest()[:12]}; usable as --config")
    print(yaml.safe_dump(cfg.to_dict(), sort_keys=False, allow_unicode=True), end="")
    return 0


def _list(args: argparse.Namespace) -> int:
    # The catalog, not the registries: importing the implementations would import torch (seconds).
    from balancemm.catalog import DATASET_OPTIONS, METHOD_HPARAMS
    from balancemm.registry import METHOD_GROUPS

    if args.what == "methods":
        if args.group is not None and args.group not in METHOD_GROUPS:
            raise BalanceMMError(f"unknown group {args.group!r}; valid: {', '.join(METHOD_GROUPS)}")
        rows = [
            (group, e.name, str(e.meta.get("paper", "")), ", ".join(e.aliases))
            for group in METHOD_GROUPS
            if args.group in (None, group)
            for e in METHOD_HPARAMS
            if e.meta.get("group") == group
        ]
        # Columns as wide as their longest entry, so long paper notes never run into the aliases.
        widths = [max(len(r[i]) for r in [("group", "method", "paper", ""), *rows]) + 2 for i in range(3)]
        for row in [("group", "method", "paper", "aliases"), *rows]:
            print("".join(cell.ljust(w) for cell, w in zip(row, widths, strict=False)) + row[3])
    else:
        print(f"{'dataset':17s}{'modalities':12s}{'data':22s}description")
        # Datasets that run out of the box first; the others need `balancemm data prepare`.
        for e in sorted(DATASET_OPTIONS, key=lambda e: bool(e.meta.get("needs_files"))):
            data = "data prepare / files" if e.meta.get("needs_files") else "built in"
            print(f"{e.name:17s}{len(e.meta['modalities'])!s:12s}{data:22s}{e.meta.get('description', '')}")
    return 0


def _bench(args: argparse.Namespace) -> int:
    from balancemm.report import _check_out

    # Both would otherwise stop the report only after every job has trained.
    try:
        _check_out(Path(args.report))
    except BalanceMMError as exc:  # the report's own check names its option --out; here it is --report
        raise BalanceMMError(str(exc).replace("--out", "--report", 1)) from None
    if importlib.util.find_spec("matplotlib") is None:
        raise BalanceMMError("bench draws the report's figures, which need matplotlib: pip install 'balancemm[report]'")
    raw = {
        "methods": "all",
        "datasets": args.dataset,
        "seeds": args.seeds,
        "trials": args.trials,
        "probe": True,
        "robustness": args.robustness,
        "sets": args.sets,
        # The protocol's length is the dataset's, not each paper's: methods act on relative schedules.
        "adapt": True,
    }
    code = _run_sweep(raw, "bench", args, launcher="local", address=None)
    if code != 0 or args.dry_run:
        return code
    return _report(
        argparse.Namespace(runs_dir=args.root, out=args.report, oracle=False, allow_unfair=False, no_plots=False)
    )


def _sweep(args: argparse.Namespace) -> int:
    from balancemm.sweep.launchers import check_address

    check_address(args.launcher, args.address)  # before planning: an unreachable cluster fails in seconds
    raw: dict[str, Any] = {}
    if args.spec is not None:
        from balancemm.config import load_yaml

        raw = load_yaml(args.spec, sections=None)  # SweepSpec checks the keys
    for key in ("methods", "datasets", "seeds", "trials"):
        if getattr(args, key) is not None:
            raw[key] = getattr(args, key)
    listed = raw.get("sets", [])
    if not isinstance(listed, list):  # a string would be split into characters; SweepSpec names the rest
        raise ConfigError(f"{args.spec}: sets must be a list of 'key=value' strings")
    raw["sets"] = [*listed, *args.sets]
    if args.probe:
        raw["probe"] = True
    if args.adapt:
        raw["adapt"] = True
    if args.robustness:
        raw["robustness"] = True
    return _run_sweep(raw, args.spec or "sweep", args, launcher=args.launcher, address=args.address)


def _run_sweep(raw: dict[str, Any], where: str, args: argparse.Namespace, launcher: str, address: str | None) -> int:
    """Plan and run (or, with --dry-run, list) the sweep ``raw``; ``args`` gives root, jobs, device,
    gpus_per_job, quiet."""
    from balancemm.sweep import SweepSpec, check_data, is_done, plan_jobs, run_sweep

    if args.jobs is not None and args.jobs < 1:
        raise BalanceMMError("--jobs must be at least 1")
    jobs = plan_jobs(SweepSpec.from_mapping(raw, where=where), args.root)
    if launcher == "local":
        from balancemm.sweep.launchers import local_placement

        local_placement(args.device, args.gpus_per_job)  # a dry run refuses what the real one would
    if args.dry_run:
        check_data(jobs)  # run_sweep checks it for a real run
        # Columns as wide as their longest entry, so every job's settings line up.
        rows = [(job.label, job.hparams) for job in jobs]
        label_w, hp_w = (max((len(r[i]) for r in rows), default=0) for i in range(2))
        for job, (label, hp) in zip(jobs, rows, strict=True):
            print(f"{'done' if is_done(job) else 'todo':5s} {label:{label_w}s}  {hp:{hp_w}s}  {job.out}")
        return 0
    outcome = run_sweep(
        jobs,
        args.root,
        parallel=args.jobs,
        launcher=launcher,
        address=address,
        device=args.device,
        gpus_per_job=args.gpus_per_job,
        progress=not args.quiet,
    )
    print(
        f"sweep: {len(outcome.finished)} trained, {outcome.skipped} already finished, "
        f"{len(outcome.failed)} failed, {outcome.total} jobs under {args.root}"
    )
    if outcome.failed:
        first, reason = outcome.failed[0]
        raise SweepFailed(f"{len(outcome.failed)} of {outcome.total} jobs failed, e.g. {first.out}: {reason}")
    return 0


def _probe(args: argparse.Namespace) -> int:
    from balancemm.engine.probe import probe_run

    for m, r in probe_run(args.run_dir, args.modality, device=args.device).items():
        test, val = 100 * r["test_accuracy"], 100 * r["val_accuracy"]
        print(f"{m:12s} linear-probe test accuracy {test:.2f}  (val {val:.2f}, C={r['C']})")
    return 0


def _severities(text: str) -> list[float]:
    try:
        return [float(s) for s in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of numbers") from None


def _eval(args: argparse.Namespace) -> int:
    from balancemm.engine.corrupted import DEFAULT_SEVERITIES, eval_run
    from balancemm.layout import RunFiles

    result = eval_run(
        args.run_dir,
        split=args.split,
        dataset=args.dataset,
        sets=args.set,
        corruptions=args.corrupt,
        severities=args.severities if args.severities is not None else DEFAULT_SEVERITIES,
        seed=args.seed,
        device=args.device,
    )
    clean, robust = result["clean"], result["robustness"]
    request = result["request"]
    print(
        f"{request['dataset']} {request['split']}: accuracy {100 * clean['accuracy']:.2f}  (n={clean['num_samples']})"
    )
    grid = request["severities"]
    print(f"{'corruption':22s} " + " ".join(f"{s:>6g}" for s in grid) + "     AUC  relative")
    for name, c in robust["corruptions"].items():
        relative = "-" if c["relative"] is None else f"{c['relative']:.3f}"
        accuracy = " ".join(f"{100 * a:6.2f}" for a in c["accuracy"])
        print(f"{name:22s} {accuracy}  {100 * c['auc']:6.2f}  {relative:>8s}")
    print(f"stored in {RunFiles(args.run_dir).eval} under {result['key']}")
    return 0


def _report(args: argparse.Namespace) -> int:
    from balancemm.report import write_report

    res = write_report(
        args.runs_dir, args.out, oracle=args.oracle, allow_unfair=args.allow_unfair, plots=not args.no_plots
    )
    col = res.collection
    for line in col.unfair:
        print(f"balancemm: warning: unfair comparison: {line}", file=sys.stderr)
    for line in res.missing:
        print(f"balancemm: note: {line}", file=sys.stderr)
    skipped = sum(n.startswith("skipped") for n in col.notes)
    print(
        f"report: {len(col.runs)} runs ({skipped} unfinished skipped), {len(col.datasets)} datasets "
        f"→ {res.out}/report.html ({len(res.files)} files)"
    )
    return 0


def _data(args: argparse.Namespace) -> int:
    if args.data_command == "profiles":
        import json

        from balancemm.data.flow import FLOW_PROFILES
        from balancemm.data.food101 import CLEANING, TEXT_PROFILES
        from balancemm.data.profiles import AUDIO_PROFILES

        print("audio (cremad, kinetics_sounds, vggsound; balanced_av ships its own: released)")
        for name, prof in AUDIO_PROFILES.items():
            print(f"  {name}: {prof.description}\n      {json.dumps(prof.params(), sort_keys=True)}")
        print("optical flow (ucf101)")
        for name, flow in FLOW_PROFILES.items():
            print(f"  {name}: {flow.description}\n      {json.dumps(flow.params(), sort_keys=True)}")
        print("text (food101; the tokenizer folder comes from --option tokenizer=DIR)")
        for name, length in TEXT_PROFILES.items():
            print(f"  {name}: a BERT tokenizer, {length} tokens; {CLEANING}")
        print("features (cmu_mosei): unaligned, aligned (which MulT pickle)")
        return 0
    if args.data_command == "check":
        from balancemm.config import parse_sets
        from balancemm.data.check import check, format_check

        sets = parse_sets(args.sets)
        if set(sets) - {"data"}:
            raise BalanceMMError("data check takes only data.* keys, e.g. --set data.split=speaker")
        report = check(args.name, args.root, sets.get("data", {}), progress=not args.quiet)
        print(format_check(report))
        return 0
    from balancemm.data.prepare import prepare

    if args.frame_size < 8 or (args.workers is not None and args.workers < 1):
        raise BalanceMMError("--frame-size must be at least 8 and --workers at least 1")
    options: dict[str, str] = {}
    for item in args.options:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise BalanceMMError(f"--option {item!r}: expected KEY=VALUE, e.g. --option tokenizer=/path/to/bert")
        options[key] = value
    manifest = prepare(
        args.name,
        args.raw,
        args.out,
        profile=args.profile,
        frame_size=args.frame_size,
        workers=args.workers or os.cpu_count() or 1,
        progress=not args.quiet,
        options=options,
    )
    head = f"prepared {manifest['dataset']} (profile {manifest['profile']['name']}) into {args.out}: "
    if "clips" not in manifest:  # prepared as whole arrays (CMU-MOSEI)
        print(head + ", ".join(f"{s} {n:,}" for s, n in manifest["sizes"].items()))
        return 0
    failed, unmatched = len(manifest["failed"]), len(manifest["unmatched"])
    # The failed were named as they failed; the clips without media only now (an orphan file, say).
    for reason in list(manifest["unmatched"].values())[:SHOWN]:
        print(f"not prepared: {reason}", file=sys.stderr)
    if unmatched > SHOWN:
        print(f"… and {unmatched - SHOWN:,} more listed without media (see manifest.json)", file=sys.stderr)
    print(
        head
        + f"{len(manifest['clips']):,} clips; {failed:,} failed, {unmatched:,} listed without media"
        + (" (rerun the same command to retry the failed)" if failed else "")
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    try:
        commands = {
            "train": _train,
            "config": _config,
            "list": _list,
            "sweep": _sweep,
            "bench": _bench,
            "probe": _probe,
            "eval": _eval,
            "report": _report,
            "data": _data,
        }
        return commands[args.command](args)
    except BalanceMMError as exc:
        # Every rank of a data-parallel run makes the same checks: rank 0 speaks for them.
        if os.environ.get("RANK", "0") == "0":
            print(f"balancemm: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("balancemm: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (``balancemm list methods | head``): stop quietly, as Unix tools do.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


if __name__ == "__main__":
    sys.exit(main())
