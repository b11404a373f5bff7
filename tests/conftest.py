"""Run the Triton kernels under the interpreter on CPU (TRITON_INTERPRET=1), and `--script NAME`: one script's tests.

TRITON_INTERPRET must be set before anything imports triton (torch and transformers may, while other test modules
are collected), because triton's own helpers are decorated at import time. On a CUDA machine, run
`TRITON_INTERPRET=0 python -m pytest tests/test_kernels.py` to test the compiled kernels.

`python -m pytest -q tests --script ipo` keeps only the tests of algos/ipo.py: those parametrized by `script` (its
run golden: trajectory, resume, reload, torchrun; its header and plumbing; one step with --lora --fused-linear), its
loss goldens (tests/golden/ipo.*.json) and tests/test_ipo.py. Repeat it for several scripts. Unlike `-k ipo`, it does
not also select lipo's tests, nor dpo's when asked for `-k dpo` (step_dpo, rdpo, ...).
"""

import os
from pathlib import Path

import pytest

os.environ.setdefault("TRITON_INTERPRET", "1")

REPO = Path(__file__).resolve().parents[1]


def pytest_addoption(parser):
    parser.addoption("--script", action="append", default=[], metavar="NAME",
                     help="only the tests of algos/NAME.py: its goldens, run, template checks and tests/test_NAME.py "
                          "(repeatable)")


def item_script(item) -> str | None:
    """The script a test belongs to: its `script` parameter, its loss golden file (`path`), or its module
    tests/test_<script>.py; None for the tests of no single script (kernels, the template's dpo.py behaviours, ...)."""
    params = item.callspec.params if hasattr(item, "callspec") else {}
    if isinstance(params.get("script"), str):
        return params["script"]
    if str(params.get("path", "")).endswith(".json"):
        return Path(params["path"]).name.split(".")[0]  # tests/golden/<script>.<function>.json
    stem = Path(item.path).stem
    if stem.startswith("test_") and (REPO / "algos" / f"{stem.removeprefix('test_')}.py").is_file():
        return stem.removeprefix("test_")
    return None


def pytest_collection_modifyitems(config, items):
    scripts = config.getoption("script")
    if not scripts:
        return
    unknown = [s for s in scripts if not (REPO / "algos" / f"{s}.py").is_file()]
    if unknown:
        raise pytest.UsageError(f"--script {' '.join(unknown)}: no such algos/<script>.py")
    keep = [item for item in items if item_script(item) in scripts]
    config.hook.pytest_deselected(items=[item for item in items if item_script(item) not in scripts])
    items[:] = keep
