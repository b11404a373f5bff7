"""(Re)generate the golden files of a script: check them, say what would change, and write them on request.

    python -m tests.golden dpo                 # check, and a summary per file: unchanged, new or CHANGED
    python -m tests.golden dpo --write         # ... and write the new and changed files
    python -m tests.golden dpo --only loss     # only the loss functions (seconds); --only run: the run
    python -m tests.golden dpo --verbose       # ... and the diff of each file (the whole JSON of a new one)

First the naming rules (tests/golden/__init__.py): LOSSES keys are functions of algos/<script>.py, RUN["script"]
is algos/<script>.py. Loss goldens come from tests/references/<script>.py (LOSSES), after its hand-computed values
and hand-derived gradients are checked; the script's function is then checked against them (float64, float32),
as tests/test_golden.py does. The run golden runs algos/<script>.py with the arguments in RUN (a few seconds).
Exit status: 0 all checks passed, 1 a check failed, 2 a naming rule is broken (nothing built or written).
Never regenerate to make a failing test pass without saying why in the commit message: a changed golden value is
a changed algorithm.
"""

import argparse
import difflib
import sys
import tempfile
from pathlib import Path

import torch

from tests.golden import (GOLDEN_DIR, REPO, NamingError, build_loss_goldens, build_run_golden, check_case, check_names,
                          compare_metrics, dumps, load, reference_module, script_function)


def loss_summary(name: str, golden: dict) -> tuple[str, list[str]]:
    """What was checked for a loss golden, and the script function's mismatches against it."""
    cases = golden["cases"]
    hand = sum("hand" in case for case in cases)
    values = sum(len(grad) for case in cases for grad in case["grads"].values())
    with_grads = sum(bool(case["grads"]) for case in cases)
    function = script_function(golden["script"], golden["function"])
    failures = []
    for case in cases:
        errors = {}
        for dtype in ("float64", "float32"):
            try:
                check_case(function, golden, case, getattr(torch, dtype))
            except Exception as error:  # an assertion, or the function refusing the case's arguments
                lines = [line.strip() for line in str(error).splitlines() if line.strip()]
                errors[dtype] = "; ".join(lines)[:240] or type(error).__name__
        if errors:
            failures.append(f"case {case['name']} ({', '.join(errors)}): {next(iter(errors.values()))}")
    where = f"algos/{golden['script']}.py:{golden['function']}"
    verdict = (f"{where} matches it on all {len(cases)} (float64 and float32)" if not failures
               else f"{where} DIFFERS on {len(failures)} of the {len(cases)} cases")
    gradients = f"gradients checked numerically on {with_grads} ({values} values)" if values else "no gradients"
    return (f"{name.removesuffix('.json')}: {len(cases)} cases from the reference, hand-computed values matched on "
            f"{hand}, {gradients}; {verdict}"), failures


def run_summary(name: str, golden: dict) -> str:
    metrics = golden["metrics"]
    train = max((sum(k.startswith("train/") for k in row) for row in metrics), default=0)
    evals = [row["step"] for row in metrics if any(k.startswith("eval/") for k in row)]
    evaluated = f", eval/ metrics at steps {', '.join(map(str, evals))}" if evals else ", no evaluation"
    return (f"{name.removesuffix('.json')}: {golden['script']} {' '.join(golden['args'])}: {len(metrics)} logged steps "
            f"up to step {metrics[-1]['step'] if metrics else 0}, {train} train/ metrics per step{evaluated}")


def what_changed(name: str, new: dict, path: Path) -> str:
    """unchanged, new, or CHANGED with what moved (read from the JSON, not the text)."""
    old = load(path)
    if name.endswith(".run.json"):
        problems = compare_metrics(new["metrics"], old["metrics"], **old["tolerance"])
        if not problems:
            return "differs only within its tolerance (last bits; e.g. another machine or torch version)"
        return f"CHANGED: {len(problems)} values beyond the tolerance, e.g. {'; '.join(problems[:3])}"
    old_cases = {case["name"]: case for case in old.get("cases", [])}
    new_cases = {case["name"]: case for case in new["cases"]}
    parts = []
    moved = [n for n in new_cases if n in old_cases and old_cases[n] != new_cases[n]]
    for label, names in (("cases changed", moved), ("cases added", [n for n in new_cases if n not in old_cases]),
                         ("cases removed", [n for n in old_cases if n not in new_cases])):
        if names:
            parts.append(f"{label}: {', '.join(names)}")
    fields = [k for k in sorted(set(old) | set(new)) if k != "cases" and old.get(k) != new.get(k)]
    if fields:
        parts.append(f"fields changed: {', '.join(fields)}")
    return "CHANGED: " + "; ".join(parts or ["formatting only"])


def todo_markers(script: str) -> list[str]:
    """Files of the script that still hold the TODO(<script>) markers of python -m tests.new_variant."""
    paths = [f"algos/{script}.py", f"tests/references/{script}.py", f"docs/algos/{script}.md"]
    counts = [(p, (REPO / p).read_text().count(f"TODO({script})")) for p in paths if (REPO / p).is_file()]
    return [f"{p} ({n})" for p, n in counts if n]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.golden", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("script", help="the script's name in algos/, e.g. dpo")
    parser.add_argument("--write", action="store_true", help="write the new and changed files (default: only check)")
    parser.add_argument("--only", choices=["loss", "run"], help="only the loss goldens, or only the run golden")
    parser.add_argument("--verbose", action="store_true", help="also print each file's diff (all of a new file)")
    options = parser.parse_args(argv)
    script = options.script

    try:
        check_names(script, reference_module(script))
    except NamingError as error:
        print(f"error: {error}\nNothing built or written.", file=sys.stderr)
        return 2

    try:
        goldens = {} if options.only == "run" else build_loss_goldens(script)
    except AssertionError as error:  # the reference against its hand values or its own numerical gradients
        print(f"FAILED: tests/references/{script}.py: {error}\nNothing written: fix the reference (or the hand "
              f"value) first.", file=sys.stderr)
        return 1
    lines, failures = {}, []
    for name, golden in goldens.items():
        lines[name], mismatches = loss_summary(name, golden)
        failures += [f"{name.removesuffix('.json')}: {m}" for m in mismatches]
    if options.only != "loss":
        name = f"{script}.run.json"
        with tempfile.TemporaryDirectory() as tmp:
            try:
                goldens[name] = build_run_golden(script, Path(tmp))
            except RuntimeError as error:
                print(f"FAILED: the run of RUN['args']: {error}\nNothing written.", file=sys.stderr)
                return 1
        lines[name] = run_summary(name, goldens[name])

    to_write = []
    for name, golden in goldens.items():
        path = GOLDEN_DIR / name
        text = dumps(golden)
        old = path.read_text() if path.exists() else None
        status = "new" if old is None else "unchanged" if old == text else what_changed(name, golden, path)
        if old != text:
            to_write.append((path, text))
        action = "" if old == text else " (written)" if options.write else " (would be written)"
        print(f"{lines[name]}\n    tests/golden/{name}: {status}{action}")
        if options.verbose and old != text:
            diff = list(difflib.unified_diff((old or "").splitlines(keepends=True), text.splitlines(keepends=True),
                                             f"a/tests/golden/{name}", f"b/tests/golden/{name}"))
            sys.stdout.writelines(diff[:400])
            if len(diff) > 400:
                print(f"... {len(diff) - 400} more diff lines")
    if options.write:
        for path, text in to_write:
            path.write_text(text)

    if failures:
        print("FAILED: the script does not compute what its reference does (tests/test_golden.py will fail):")
        print("\n".join(f"    {failure}" for failure in failures[:5]))
        if len(failures) > 5:
            print(f"    ... {len(failures) - 5} more")
    else:
        checked = [] if options.only == "run" else [
            f"tests/references/{script}.py against its hand-computed values and numerical gradients",
            f"algos/{script}.py's functions against it (float64, float32)"]
        checked += [] if options.only == "loss" else [f"algos/{script}.py ran RUN['args']"]
        print(f"All checks passed: {'; '.join(checked)}.")
    if to_write:
        print(f"{'Wrote' if options.write else 'Nothing written: add --write to write'} {len(to_write)} file(s)"
              f"{'' if options.verbose or options.write else '; --verbose shows the diffs'}.")
    else:
        print("Nothing to write: every golden file is up to date.")
    markers = todo_markers(script)
    if markers:
        print(f"Reminder: TODO({script}) markers left in {', '.join(markers)}.")
    print(f"Test it: python -m pytest -q tests --script {script}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
