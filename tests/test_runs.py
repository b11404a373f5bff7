"""Every script end to end, driven by its run golden file (tests/golden/<script>.run.json):

- the metrics trajectory of a few steps on the bundled task matches the golden one (within its tolerance),
- the same command again, writing checkpoints, gives the same numbers bit for bit (same seed, same machine), and a
  copy of it stopped halfway resumes (--resume) to the same metrics and weights, bit for bit,
- the saved policy and tokenizer reload with from_pretrained,
- torchrun --nproc_per_node 2 (gloo on CPU) with the same global batch matches the one-process run.

One one-process run per script is shared by these tests (a session fixture) to keep the suite fast.
Nothing to edit here when a script is added: see tests/golden/__init__.py.
"""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.golden import assert_same_run, compare_metrics, golden_files, interrupted_copy, load, run_script

GOLDENS = {path.name.removesuffix(".run.json"): path for path in golden_files("run")}
SCRIPTS = sorted(GOLDENS)


@pytest.fixture(scope="session")
def single_run(tmp_path_factory):
    """script -> (output dir, metrics) of its one-process golden command, run once per session."""
    runs = {}

    def get(script):
        if script not in runs:
            output_dir = tmp_path_factory.mktemp(f"{script}_run")
            golden = load(GOLDENS[script])
            runs[script] = output_dir, run_script(golden["script"], golden["args"], output_dir)
        return runs[script]

    return get


@pytest.mark.parametrize("script", SCRIPTS)
def test_run_matches_golden(script, single_run):
    golden = load(GOLDENS[script])
    _, metrics = single_run(script)
    problems = compare_metrics(metrics, golden["metrics"], **golden["tolerance"])
    hint = f"python -m tests.golden {script} --only run shows the diff"
    assert not problems, f"{script} left its golden trajectory ({hint}):\n" + "\n".join(problems[:20])


@pytest.mark.parametrize("script", SCRIPTS)
def test_same_seed_same_numbers_and_resume_is_bit_for_bit(script, single_run, tmp_path):
    golden = load(GOLDENS[script])
    _, metrics = single_run(script)
    half = metrics[-1]["step"] // 2
    args = golden["args"] + ["--save-steps", str(half), "--save-total-limit", "10"]
    again = run_script(golden["script"], args, tmp_path / "whole")
    assert again == metrics, "two runs with the same seed on the same machine differ (or checkpointing changed them)"
    interrupted_copy(tmp_path / "whole", tmp_path / "resumed", half)
    run_script(golden["script"], args + ["--resume"], tmp_path / "resumed")
    assert_same_run(tmp_path / "resumed", tmp_path / "whole")


@pytest.mark.parametrize("script", SCRIPTS)
def test_saved_policy_reloads(script, single_run):
    output_dir, metrics = single_run(script)
    model = AutoModelForCausalLM.from_pretrained(output_dir)
    tokenizer = AutoTokenizer.from_pretrained(output_dir)
    ids = tokenizer(["Q: 1+2\n"], return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], model.config.vocab_size) and torch.isfinite(logits).all()
    assert any(row["step"] == metrics[-1]["step"] for row in metrics)


@pytest.mark.parametrize("script", SCRIPTS)
def test_torchrun_matches_one_process(script, single_run, tmp_path):
    golden = load(GOLDENS[script])
    _, metrics = single_run(script)
    distributed = run_script(golden["script"], golden["torchrun_args"], tmp_path, nproc=2)
    problems = compare_metrics(distributed, metrics, **golden["torchrun_tolerance"])
    assert not problems, "torchrun (2 processes) differs from one process:\n" + "\n".join(problems[:20])
    assert len(list(tmp_path.glob("events.out.tfevents*"))) == 1, "only rank 0 may write"
