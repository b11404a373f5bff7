"""Every loss golden file (tests/golden/<script>.<function>.json) against algos/<script>.py:<function>.

Nothing to edit here when a script is added: write tests/references/<script>.py and run
`python -m tests.golden <script> --write`. See tests/golden/__init__.py for the format.
"""

import pytest
import torch

from tests.golden import call_function, golden_files, load, script_function

CASES = [(path, case["name"]) for path in golden_files("loss") for case in load(path)["cases"]]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("path,case_name", CASES, ids=[f"{p.stem}:{name}" for p, name in CASES])
def test_loss_matches_golden(path, case_name, dtype):
    golden = load(path)
    case = next(c for c in golden["cases"] if c["name"] == case_name)
    tolerance = golden["tolerance"][str(dtype).removeprefix("torch.")]
    function = script_function(golden["script"], golden["function"])
    values, grads = call_function(function, case, golden["outputs"], dtype)
    for name, want in [*case["expected"].items(), *((f"grad {k}", v) for k, v in case["grads"].items())]:
        got = grads[name.removeprefix("grad ")] if name.startswith("grad ") else values[name]
        assert got.dtype == dtype, f"{name} is {got.dtype}, the inputs are {dtype}"
        torch.testing.assert_close(got, torch.tensor(want, dtype=dtype), **tolerance, msg=lambda m: f"{name}: {m}")
        assert torch.isfinite(got).all(), name


def test_every_script_has_golden_losses():
    """A loss golden for every reference module, so a script cannot silently lose its pin."""
    from pathlib import Path

    references = {p.stem for p in (Path(__file__).parent / "references").glob("*.py") if p.stem != "__init__"}
    pinned = {load(p)["script"] for p in golden_files("loss")}
    assert references <= pinned, f"no golden file for {references - pinned}: run python -m tests.golden <script> --write"
