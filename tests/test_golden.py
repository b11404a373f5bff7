"""Every loss golden file (tests/golden/<script>.<function>.json) against algos/<script>.py:<function>.

Nothing to edit here when a script is added: start it with `python -m tests.new_variant <parent> <script>`, write its
tests/references/<script>.py and run `python -m tests.golden <script> --write`. See tests/golden/__init__.py for the
format and the naming rules.
"""

import pytest
import torch

from tests.golden import (GOLDEN_DIR, REPO, check_case, check_names, golden_files, load, reference_module,
                          script_function)

REFERENCES = sorted(p.stem for p in (REPO / "tests" / "references").glob("*.py") if p.stem != "__init__")
CASES = [(path, case["name"]) for path in golden_files("loss") for case in load(path)["cases"]]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("path,case_name", CASES, ids=[f"{p.stem}:{name}" for p, name in CASES])
def test_loss_matches_golden(path, case_name, dtype):
    golden = load(path)
    case = next(c for c in golden["cases"] if c["name"] == case_name)
    check_case(script_function(golden["script"], golden["function"]), golden, case, dtype)


@pytest.mark.parametrize("script", REFERENCES)
def test_reference_is_named_after_its_script_and_pinned(script):
    """The reference's LOSSES keys are functions of algos/<script>.py and its RUN runs that script, and each is pinned,
    so a script cannot silently lose its pin, nor pin a sibling's trajectory under its name."""
    reference = reference_module(script)
    check_names(script, reference)
    missing = [name for name in [*(f"{script}.{key}.json" for key in reference.LOSSES), f"{script}.run.json"]
               if not (GOLDEN_DIR / name).is_file()]
    assert not missing, f"no tests/golden/{missing}: run python -m tests.golden {script} --write"
