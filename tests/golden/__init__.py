"""Golden values: what the JSON files here hold, how they are made, how the tests read them.

Two kinds of file, both generated, never edited by hand:

tests/golden/<script>.<function>.json   a loss function of algos/<script>.py, pinned on fixed inputs:
    {"script", "function", "about", "outputs": [names of the returned tensors, in order],
     "tolerance": {"float64": {"rtol", "atol"}, "float32": {"rtol", "atol"}},
     "cases": [{"name", "note"?, "inputs": {argument: list}, "hyperparameters": {argument: number},
                "expected": {output: list}, "grads": {input: list}, "hand"?: {...}}]}
    `expected` and `grads` (gradient of the sum of the first output with respect to each float input)
    come from the independent float64 implementation in tests/references/<script>.py; `hand` holds
    values worked out on paper, which the reference must reproduce before anything is written.

tests/golden/<script>.run.json          the script end to end on the bundled task:
    {"script", "about", "args", "torchrun_args", "env", "tolerance", "generated_with", "metrics": [...]}
    `metrics` is the run's metrics.jsonl; `args` the one-process command line; `torchrun_args` the
    command line for 2 processes with the same global batch.

Naming rules, checked before anything is built (check_names): the keys of LOSSES are functions (or function
aliases) defined at the top level of algos/<script>.py, and RUN["script"] is "algos/<script>.py".

Regenerate (a summary of the checks and of what would change first) with:
    python -m tests.golden <script> [--write] [--only loss|run] [--verbose]
"""

import ast
import importlib
import importlib.util
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import torch

GOLDEN_DIR = Path(__file__).resolve().parent
REPO = GOLDEN_DIR.parents[1]

# float64: the script and the reference compute the same equation in different but equivalent ways
# (logsigmoid vs log1p/exp, vectorised vs per pair), which agree to a few ulps.
# float32: the training dtype; the inputs are rounded to float32 first (|x| up to 1e4, ulp ~1e-3 there,
# so h can move by ~1e-3 relative to the float64 value) and the loss is O(1), hence rtol and atol 1e-4.
LOSS_TOLERANCE = {"float64": {"rtol": 1e-10, "atol": 1e-12}, "float32": {"rtol": 1e-4, "atol": 1e-4}}

# One CPU thread per process: the same arithmetic in the one-process and the torchrun runs, on any core count.
RUN_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}

# Why this tolerance for the run trajectories: on one machine the run is bit-for-bit reproducible (tested
# separately). Across machines (other CPUs, BLAS kernels, thread counts) the float32 log-probs differ in the
# last bits, ~1e-6 relative; Adam's normalised updates carry that through 6 steps without amplifying it
# beyond ~1e-5 (measured: 1 vs 2 threads). rtol 1e-4 leaves a 10x margin and still catches any change of
# the loss, the data or the update, which moves these numbers by 1e-3 or more.
RUN_TOLERANCE = {"rtol": 1e-4, "atol": 1e-5}
# One process against two with the same global batch: only the reduction order differs. A script whose
# metrics amplify that (its RUN says why) sets its own "torchrun_tolerance" in tests/references/<script>.py.
TORCHRUN_TOLERANCE = {"rtol": 1e-5, "atol": 1e-6}


def golden_files(kind: str) -> list[Path]:
    """All golden files of a kind: "loss" (<script>.<function>.json) or "run" (<script>.run.json)."""
    files = sorted(GOLDEN_DIR.glob("*.json"))
    return [f for f in files if (f.name.endswith(".run.json")) == (kind == "run")]


def load(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def dumps(golden: dict) -> str:
    """Indented JSON with each list of numbers on one line: readable, and diffs show which values moved."""
    text = json.dumps(golden, indent=1, ensure_ascii=False)
    return re.sub(r"\[\s*([-\d.e+,\s]*?)\s*\]", lambda m: "[" + re.sub(r",\s+", ", ", m.group(1)) + "]", text) + "\n"


class NamingError(ValueError):
    """A reference that does not match its script: raised before anything is built, with the fix."""


def reference_module(script: str, root: Path = REPO):
    """tests/references/<script>.py; under another root (a copy of the layout), loaded from its file."""
    if not (root / "tests" / "references" / f"{script}.py").is_file():
        raise NamingError(f"no tests/references/{script}.py: start a variant with `python -m tests.new_variant "
                          f"<parent> {script}`, which copies the parent's script and reference with every rename")
    if root == REPO:
        return importlib.import_module(f"tests.references.{script}")
    path = root / "tests" / "references" / f"{script}.py"
    spec = importlib.util.spec_from_file_location(f"_reference_{script}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def defined_functions(path: Path) -> set[str]:
    """The functions a script's top level defines: with `def`, or as an alias (`step_dpo_loss = dpo_loss`)."""
    names = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            names.add(node.name)
        elif isinstance(node, ast.Assign) and isinstance(node.value, (ast.Name, ast.Attribute, ast.Lambda)):
            names.update(target.id for target in node.targets if isinstance(target, ast.Name))
    return names


def check_names(script: str, reference, root: Path = REPO) -> None:
    """The naming rules (module docstring), every violation at once with its fix: a golden file is
    <script>.<function>.json for a function of algos/<script>.py, and the run golden runs algos/<script>.py (a
    reference copied from a sibling that still runs the sibling would pin the sibling under the new name)."""
    path = root / "algos" / f"{script}.py"
    reference_path = f"tests/references/{script}.py"
    if not path.is_file():
        raise NamingError(f"no algos/{script}.py for {reference_path}: golden files are named after the script "
                          f"they pin (start a variant with `python -m tests.new_variant <parent> {script}`)")
    problems = []
    functions = defined_functions(path)
    for key in getattr(reference, "LOSSES", {}):
        if key not in functions:
            problems.append(f"LOSSES[{key!r}]: algos/{script}.py defines no function {key!r} (its file would be "
                            f"tests/golden/{script}.{key}.json): rename the key to the name of the function it pins"
                            + (f", e.g. {script}_loss" if f"{script}_loss" in functions else ""))
    run = getattr(reference, "RUN", None)
    if run is not None and run.get("script") != f"algos/{script}.py":
        problems.append(f"RUN['script'] is {run.get('script')!r}: it must be 'algos/{script}.py' (the run golden "
                        f"tests/golden/{script}.run.json pins that script's trajectory)")
    if problems:
        raise NamingError(f"{reference_path} does not match algos/{script}.py:\n  " + "\n  ".join(problems))


def script_function(script: str, function: str):
    """algos.<script>.<function>, imported the way users do (importing a script must not run it)."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    return getattr(importlib.import_module(f"algos.{script}"), function)


def as_tensor(value, dtype: torch.dtype) -> torch.Tensor:
    """JSON list -> tensor: floats in `dtype` (with grad), integers int64, booleans bool."""
    flat = value
    while isinstance(flat, list) and flat and isinstance(flat[0], list):
        flat = flat[0]
    if flat and all(isinstance(v, bool) for v in flat):
        return torch.tensor(value, dtype=torch.bool)
    if flat and all(isinstance(v, int) and not isinstance(v, bool) for v in flat):
        return torch.tensor(value, dtype=torch.int64)
    return torch.tensor(value, dtype=dtype, requires_grad=True)


def call_function(function, case: dict, outputs: list[str], dtype: torch.dtype):
    """Run a script function on a case: ({output: tensor}, {input: gradient of sum(first output)})."""
    inputs = {k: as_tensor(v, dtype) for k, v in case["inputs"].items()}
    result = function(**inputs, **case.get("hyperparameters", {}))
    if isinstance(result, torch.Tensor):
        result = (result,)
    if isinstance(result, dict):
        result = tuple(result[name] for name in outputs)
    values = dict(zip(outputs, result))
    differentiable = {k: v for k, v in inputs.items() if v.requires_grad}
    gradients = torch.autograd.grad(values[outputs[0]].sum(), list(differentiable.values()), allow_unused=True)
    grads = {k: torch.zeros_like(v) if g is None else g for (k, v), g in zip(differentiable.items(), gradients)}
    return values, grads


def check_case(function, golden: dict, case: dict, dtype: torch.dtype) -> None:
    """A script function against one case of its loss golden, in `dtype`: every output and gradient within the
    golden's tolerance, in that dtype and finite (what tests/test_golden.py asserts; AssertionError otherwise)."""
    tolerance = golden["tolerance"][str(dtype).removeprefix("torch.")]
    values, grads = call_function(function, case, golden["outputs"], dtype)
    for name, want in [*case["expected"].items(), *((f"grad {k}", v) for k, v in case["grads"].items())]:
        got = grads[name.removeprefix("grad ")] if name.startswith("grad ") else values[name]
        assert got.dtype == dtype, f"{name} is {got.dtype}, the inputs are {dtype}"
        torch.testing.assert_close(got, torch.tensor(want, dtype=dtype), **tolerance, msg=lambda m: f"{name}: {m}")
        assert torch.isfinite(got).all(), name


def check_hand_values(case: dict, expected: dict, grads: dict) -> None:
    """The reference must reproduce the values worked out on paper."""
    for key, hand in case.get("hand", {}).items():
        got = grads[key[len("grad_"):]] if key.startswith("grad_") else expected[key]
        for h, g in zip(hand, got):
            if not math.isclose(h, g, rel_tol=1e-12, abs_tol=1e-12):
                raise AssertionError(f"case {case['name']}: the reference gives {key} {got}, by hand {hand}")


def check_gradients_numerically(reference, case: dict, outputs: list[str], grads: dict) -> None:
    """The reference's hand-derived gradient against central differences of its own loss."""
    def total(inputs):
        out, _ = reference(**inputs, **case.get("hyperparameters", {}))
        return math.fsum(out[outputs[0]])

    for name, grad in grads.items():
        for i, g in enumerate(grad):
            step = 1e-6 * max(1.0, abs(case["inputs"][name][i]))
            up = {k: list(v) for k, v in case["inputs"].items()}
            down = {k: list(v) for k, v in case["inputs"].items()}
            up[name][i] += step
            down[name][i] -= step
            numeric = (total(up) - total(down)) / (2 * step)
            if not math.isclose(numeric, g, rel_tol=1e-5, abs_tol=1e-7):
                raise AssertionError(f"case {case['name']}: d/d {name}[{i}] by hand {g}, numerically {numeric}")


def build_loss_goldens(script: str) -> dict[str, dict]:
    """{file name: golden} for every loss function listed in tests/references/<script>.py."""
    reference = reference_module(script)
    check_names(script, reference)
    goldens = {}
    for function, spec in reference.LOSSES.items():
        cases = []
        for case in spec["cases"]:
            expected, grads = spec["reference"](**case["inputs"], **case.get("hyperparameters", {}))
            check_hand_values(case, expected, grads)
            check_gradients_numerically(spec["reference"], case, spec["outputs"], grads)
            cases.append({**case, "expected": expected, "grads": grads})
        goldens[f"{script}.{function}.json"] = {
            "script": script,
            "function": function,
            "about": f"algos/{script}.py:{function} on fixed inputs; expected values and gradients (of the sum "
            f"of `{spec['outputs'][0]}`) from the float64 reference tests/references/{script}.py. Generated by "
            f"`python -m tests.golden {script} --write`; do not edit by hand.",
            "outputs": spec["outputs"],
            "tolerance": LOSS_TOLERANCE,
            "cases": cases,
        }
    return goldens


def run_script(script_path: str, args: list[str], output_dir: Path, nproc: int = 1, timeout: float = 600) -> list[dict]:
    """Run a script (under torchrun when nproc > 1) and return its metrics.jsonl."""
    env = {**os.environ, **RUN_ENV, "PYTHONPATH": str(REPO)}
    if nproc == 1:
        command = [sys.executable, script_path]
    else:
        # --standalone: a free port of its own, so that parallel test workers never collide
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
                   script_path]
    command += [*args, "--output-dir", str(output_dir)]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    if (nproc > 1 and done.returncode != 0 and "terminate called without an active exception" in done.stderr
            and "--resume" not in args):
        # a rare abort of gloo's worker threads as a process exits, after its run has finished (a known torch
        # issue, not the script's): run it once more from scratch
        shutil.rmtree(output_dir, ignore_errors=True)
        done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}")
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


def build_run_golden(script: str, output_dir: Path) -> dict:
    reference = reference_module(script)
    check_names(script, reference)
    run = reference.RUN
    metrics = run_script(run["script"], run["args"], output_dir)
    return {
        "script": run["script"],
        "about": f"{run['script']} on the bundled task for a few steps: its metrics.jsonl. One process runs `args`, "
        f"torchrun --nproc_per_node 2 runs `torchrun_args` (same global batch) and must match it within "
        f"torchrun_tolerance. Generated by `python -m tests.golden {script} --write`; do not edit by hand.",
        "args": run["args"],
        "torchrun_args": run["torchrun_args"],
        "env": RUN_ENV,
        "tolerance": RUN_TOLERANCE,
        "torchrun_tolerance": run.get("torchrun_tolerance", TORCHRUN_TOLERANCE),
        "generated_with": {"torch": torch.__version__, "python": sys.version.split()[0],
                           "cpu_capability": torch.backends.cpu.get_cpu_capability()},
        "metrics": metrics,
    }


def compare_metrics(got: list[dict], expected: list[dict], rtol: float, atol: float) -> list[str]:
    """Differences between two metrics.jsonl trajectories beyond the tolerance, as readable lines."""
    problems = []
    if [row["step"] for row in got] != [row["step"] for row in expected]:
        return [f"logged steps differ: {[r['step'] for r in got]} vs {[r['step'] for r in expected]}"]
    for row, want in zip(got, expected):
        if sorted(row) != sorted(want):
            problems.append(f"step {want['step']}: keys {sorted(set(row) ^ set(want))} differ")
        for key in sorted(set(row) & set(want)):
            if not math.isclose(row[key], want[key], rel_tol=rtol, abs_tol=atol):
                problems.append(f"step {want['step']} {key}: {row[key]!r}, expected {want[key]!r}")
    return problems


def interrupted_copy(source: Path, target: Path, step: int) -> None:
    """What a run stopped after `step` leaves behind: its checkpoint-<step> and the metrics logged so far."""
    target.mkdir()
    shutil.copytree(source / f"checkpoint-{step}", target / f"checkpoint-{step}")
    lines = [line for line in (source / "metrics.jsonl").read_text().splitlines() if json.loads(line)["step"] <= step]
    (target / "metrics.jsonl").write_text("".join(line + "\n" for line in lines))


def weights(directory: Path) -> dict[str, torch.Tensor]:
    """The saved model's (or adapter's) tensors."""
    from safetensors.torch import load_file

    return load_file(next(directory.glob("*model.safetensors")))


def assert_same_run(resumed: Path, uninterrupted: Path) -> None:
    """Bit for bit: the same metrics.jsonl and the same saved tensors."""
    assert (resumed / "metrics.jsonl").read_text() == (uninterrupted / "metrics.jsonl").read_text()
    a, b = weights(resumed), weights(uninterrupted)
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a), "the weights differ"
