"""Mutation testing of the core: how many planted one-line bugs the tests catch, module by module.

    pip install -e '.[mutation]'
    python tools/mutation.py                      # every group below (slow: see docs/testing.md)
    python tools/mutation.py metrics config.py    # groups whose name contains one of the words

Each group is a set of source files mutated by mutmut (a maintained mutation tester) against the test
files that cover them, in a scratch copy of the project under ``.mutation/<group>/`` (git-ignored), so
runs never touch the working tree and a group can be rerun alone. mutmut runs, for each mutant, only
the selected tests that execute the mutated function. The script prints, per source file, the mutants
killed, survived, timed out and not covered, the score (killed and timed out over all), and then every
survivor by name; ``cd .mutation/<group> && mutmut show NAME`` prints a survivor's diff. Survivors judged
equivalent (no test can tell them apart from the original) are listed in docs/testing.md.

``--sample N`` runs N mutants drawn at random (``--seed``) from each source file instead of all of them,
and prints the score with its 95 % Wilson interval: an estimate of the full score at a fraction of the
cost, for files whose covering tests are slow. Mutants not run are counted nowhere.

Not part of the CI suite: it runs the selected tests once per mutant.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
METHOD_FILES = sorted(
    p.stem for p in (ROOT / "balancemm" / "methods").glob("*.py") if not p.stem.startswith("_") and p.stem != "__init__"
)
EXTRA_METHOD_TESTS = {
    "base": ["tests/methods/test_schedules.py", "tests/methods/test_reference_methods.py"],
    "baseline": ["tests/methods/test_reference_methods.py"],
    "unimodal": ["tests/methods/test_reference_methods.py"],
}

# Fast, precise tests only: a mutant is run against every selected test that executes the mutated
# function, so end-to-end trainings (seconds each) would multiply the run time by hundreds.
CONTRACT = "tests/methods/test_all_methods.py::test_each_method_acts_when_and_where_it_should"
UNIT_CHECKS = "tests/methods/test_all_methods.py::test_a_few_steps_train_every_parameter_with_finite_losses"

#: group name → (source files to mutate, test files or test ids that cover them)
GROUPS: dict[str, tuple[list[str], list[str]]] = {
    "metrics": (
        ["balancemm/metrics/*"],
        [
            "tests/test_metrics.py",
            "tests/test_eval.py::test_auc_is_the_trapezoid_mean_and_relative_divides_by_the_clean_accuracy",
            "tests/test_eval.py::test_effective_robustness_is_the_gap_to_the_line_fitted_across_methods",
            "tests/test_eval.py::test_the_robustness_metrics_refuse_mismatched_or_empty_input",
            "tests/test_eval.py::test_a_missing_modality_scores_the_shapley_coalition_without_it",
        ],
    ),
    "config.py": (
        ["balancemm/config.py", "balancemm/schema.py"],
        [
            "tests/test_config.py",
            "tests/test_early_validation.py::test_the_catalog_is_the_registries",
            *(
                f"tests/methods/test_schedules.py::{t}"
                for t in (
                    "test_epoch_values_resolve_against_the_protocol",
                    "test_bad_epoch_values_are_one_clear_error",
                    "test_relative_values_parse_from_the_command_line_and_keep_their_form_in_the_config",
                    "test_each_schedule_acts_in_the_epochs_it_resolves_to",
                )
            ),
        ],
    ),
    "rundir": (
        ["balancemm/engine/rundir.py", "balancemm/layout.py"],
        ["tests/engine/test_integrity.py", "tests/test_layout.py"],
    ),
    "context": (["balancemm/context.py"], ["tests/test_context.py", "tests/methods/test_device_copies.py"]),
    "engine": (
        [
            "balancemm/engine/trainer.py",
            "balancemm/engine/evaluate.py",
            "balancemm/engine/probe.py",
            "balancemm/engine/artifacts.py",
            "balancemm/engine/corrupted.py",
        ],
        [
            "tests/engine/test_loop.py",
            "tests/engine/test_probe_artifacts.py",
            "tests/engine/test_hook_order.py",
            "tests/engine/test_data_access.py",
            "tests/test_eval.py",
        ],
    ),
    **{
        f"methods/{name}": (
            [f"balancemm/methods/{name}.py"],
            [f"tests/methods/test_{name}.py", *EXTRA_METHOD_TESTS.get(name, []), CONTRACT, UNIT_CHECKS],
        )
        for name in METHOD_FILES
    },
}


def existing(tests: list[str]) -> list[str]:
    """The test files and test ids of ``tests`` that exist in this tree (older trees lack some)."""
    out = []
    for t in tests:
        path, _, test = t.partition("::")
        if (ROOT / path).exists() and (not test or f"def {test}(" in (ROOT / path).read_text()):
            out.append(t)
    return out


def workdir(group: str) -> Path:
    return ROOT / ".mutation" / re.sub(r"[^a-z0-9_.]+", "_", group.lower())


def prepare(group: str) -> Path:
    """A fresh scratch copy of the package and tests with a mutmut section for ``group``."""
    sources, tests = GROUPS[group]
    where = workdir(group)
    if where.exists():
        shutil.rmtree(where)
    where.mkdir(parents=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for folder in ("balancemm", "tests", "docs"):
        shutil.copytree(ROOT / folder, where / folder, ignore=ignore)
    text = (ROOT / "pyproject.toml").read_text()
    settings = {
        "source_paths": ["balancemm"],
        "only_mutate": sources,
        "pytest_add_cli_args_test_selection": existing(tests),
        "pytest_add_cli_args": ["-p", "no:cacheprovider", "-q"],
        # torch's thread pools are not fork-safe: fork each mutant from a server that imported nothing.
        "process_isolation": "forkserver",
        "use_git_change_detection": False,
    }
    section = "\n[tool.mutmut]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in settings.items())
    (where / "pyproject.toml").write_text(text + section)
    return where


@dataclass
class Tally:
    files: dict[str, dict[str, int]]  # source file → killed / timeout / survived / no tests / other
    survivors: list[str]  # survived or not covered, by mutmut's name


def tally(where: Path, sources: list[str]) -> Tally:
    """Count the last mutmut run's verdicts in ``where`` for the files matching ``sources``."""
    from mutmut.stats import status_by_exit_code

    per_file: dict[str, dict[str, int]] = {}
    survivors: list[str] = []
    for meta in sorted((where / "mutants").rglob("*.py.meta")):
        rel = str(meta.relative_to(where / "mutants"))[: -len(".meta")]
        if not any(Path(rel).match(pattern) or rel == pattern for pattern in sources):
            continue
        codes = json.loads(meta.read_text()).get("exit_code_by_key", {})
        counts = {"killed": 0, "timeout": 0, "survived": 0, "no tests": 0, "other": 0, "not run": 0}
        for name, code in codes.items():
            status = status_by_exit_code[code]  # mutmut's own reading of a mutant's exit code
            status = "not run" if status == "not checked" else status
            counts[status if status in counts else "other"] += 1
            if status in ("survived", "no tests"):
                survivors.append(name)
        per_file[rel] = counts
    return Tally(per_file, survivors)


def score(c: dict[str, int]) -> float:
    """Killed (and timed-out) mutants over the mutants run, in %."""
    total = sum(v for k, v in c.items() if k != "not run")
    return 100.0 * (c["killed"] + c["timeout"]) / total if total else 100.0


def wilson(c: dict[str, int], z: float = 1.96) -> tuple[float, float]:
    """The 95 % Wilson interval of the score, in %, when the mutants run are a random sample."""
    n = sum(v for k, v in c.items() if k != "not run")
    if not n:
        return 0.0, 100.0
    p = (c["killed"] + c["timeout"]) / n
    centre, half = p + z * z / (2 * n), z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return 100.0 * (centre - half) / (1 + z * z / n), 100.0 * (centre + half) / (1 + z * z / n)


def mutate(where: Path, max_children: int, names: list[str], *, quiet: bool = False) -> None:
    """``mutmut run`` in ``where``, on the named mutants or every one (``quiet``: its failure is expected)."""
    run = subprocess.run(
        ["mutmut", "run", "--max-children", str(max_children), *names],
        cwd=where,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    if run.returncode != 0 and not quiet:
        print(f"   mutmut failed ({run.returncode}): {run.stderr.strip()[-2000:]}", file=sys.stderr)


def sampled(where: Path, sources: list[str], n: int, seed: int) -> list[str]:
    """``n`` mutant names per source file, drawn with ``seed`` from the mutants mutmut generated."""
    rng, chosen = random.Random(seed), []
    for meta in sorted((where / "mutants").rglob("*.py.meta")):
        rel = str(meta.relative_to(where / "mutants"))[: -len(".meta")]
        if any(Path(rel).match(pattern) or rel == pattern for pattern in sources):
            names = sorted(json.loads(meta.read_text()).get("exit_code_by_key", {}))
            chosen += rng.sample(names, min(n, len(names)))
    return chosen


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("groups", nargs="*", help=f"words matched against the group names: {', '.join(GROUPS)}")
    p.add_argument("--max-children", type=int, default=os.cpu_count() or 1, help="mutants run at once")
    p.add_argument("--report-only", action="store_true", help="tally the last run of each group, run nothing")
    p.add_argument("--json", type=Path, help="also write the per-file tallies and survivors here")
    p.add_argument("--sample", type=int, metavar="N", help="run N random mutants per source file, not all")
    p.add_argument("--seed", type=int, default=0, help="the draw of --sample")
    args = p.parse_args(argv)
    chosen = [g for g in GROUPS if not args.groups or any(word in g for word in args.groups)]
    if not chosen:
        p.error(f"no group matches {args.groups}; groups: {', '.join(GROUPS)}")
    if shutil.which("mutmut") is None:
        p.error("mutmut is not installed: pip install -e '.[mutation]'")
    results: dict[str, Tally] = {}
    for group in chosen:
        sources, _ = GROUPS[group]
        if args.report_only:
            where = workdir(group)
        else:
            where = prepare(group)
            print(f"== {group}: mutmut run in {where.relative_to(ROOT)}", flush=True)
            if args.sample:
                # A run naming no existing mutant generates them all (and the test statistics), then stops.
                mutate(where, args.max_children, ["no-such-mutant"], quiet=True)
                mutate(where, args.max_children, sampled(where, sources, args.sample, args.seed))
            else:
                mutate(where, args.max_children, [])
        results[group] = tally(where, sources)
    rows = [(f, c) for r in results.values() for f, c in r.files.items()]
    width = max([len(f) for f, _ in rows] + [10])
    print(f"\n{'module':{width}s}  killed  timeout  survived  no-tests  not-run  score")
    for f, c in rows:
        columns = (("killed", 6), ("timeout", 7), ("survived", 8), ("no tests", 8), ("not run", 7))
        counts = "  ".join(f"{c[k]:{w}d}" for k, w in columns)
        low, high = wilson(c)
        interval = f"  (sampled: 95 % CI {low:.0f}–{high:.0f} %)" if c["not run"] else ""
        print(f"{f:{width}s}  {counts}  {score(c):5.1f}%{interval}")
    for group, r in results.items():
        if r.survivors:
            print(f"\nsurvivors in {group} (cd {workdir(group).relative_to(ROOT)} && mutmut show NAME):")
            for name in r.survivors:
                print(f"  {name}")
    if args.json:
        plain = {g: {"files": r.files, "survivors": r.survivors} for g, r in results.items()}
        args.json.write_text(json.dumps(plain, indent=1, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
