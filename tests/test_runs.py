"""Every script end to end, driven by its run golden file (tests/golden/<script>.run.json):

- the metrics trajectory of a few steps on the bundled task, writing a checkpoint halfway, matches the golden one
  (within its tolerance): checkpointing changes nothing,
- a copy of that run stopped after its checkpoint resumes (--resume) to the same metrics and weights, bit for bit
  (which also checks that the same steps on the same machine give the same numbers),
- the saved policy and tokenizer reload with from_pretrained,
- torchrun --nproc_per_node 2 (gloo on CPU) with the same global batch matches the one-process run.

A variant whose main block and batching functions are its parent's, byte for byte, and whose loss is the mean over
rows of a per-row loss (pinned row by row against the float64 reference) resumes and shards as its parent does: its
resume and torchrun runs would repeat the parent's, so they are skipped, and test_distribution_is_the_parent_s
checks that the claim still holds.

One one-process run per script is shared by these tests (a session fixture) to keep the suite fast; under
pytest-xdist a script's tests stay on one worker (xdist_group), so that it runs once.
Nothing to edit here when a script is added: see tests/golden/__init__.py.
"""

import ast

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.golden import REPO, assert_same_run, compare_metrics, golden_files, interrupted_copy, load, run_script

GOLDENS = {path.name.removesuffix(".run.json"): path for path in golden_files("run")}
SCRIPTS = [pytest.param(script, marks=pytest.mark.xdist_group(f"run_{script}")) for script in sorted(GOLDENS)]
SAME_DISTRIBUTION_AS = {"ipo": "dpo", "step_dpo": "dpo", "rdpo": "dpo", "npo": "dpo", "rpo": "dpo", "orpo": "simpo"}
BATCHING = ("collate", "concatenated_forward", "evaluate", "precompute_ref_logps")


def top_level(script: str) -> dict[str, str]:
    """name -> source of each top-level function of algos/<script>.py, and "__main__" -> its main block."""
    source = (REPO / "algos" / f"{script}.py").read_text()
    tree = ast.parse(source)
    parts = {node.name: ast.get_source_segment(source, node) for node in tree.body if isinstance(node, ast.FunctionDef)}
    return {**parts, "__main__": source[source.index('if __name__ == "__main__":') :]}


@pytest.mark.parametrize("script", sorted(SAME_DISTRIBUTION_AS))
def test_distribution_is_the_parent_s(script):
    parent = SAME_DISTRIBUTION_AS[script]
    own, theirs = top_level(script), top_level(parent)
    differing = [name for name in (*BATCHING, "__main__") if name in theirs and own.get(name) != theirs[name]]
    assert not differing, (f"{script}: {differing} differ from {parent}.py's: take it out of SAME_DISTRIBUTION_AS, "
                           "so that its resume and torchrun runs are tested")
    assert own["compute_loss"].rstrip().endswith("return losses.mean() + aux_loss, metrics")


def skip_if_inherited(script: str) -> None:
    if script in SAME_DISTRIBUTION_AS:
        pytest.skip(f"resumes and shards as {SAME_DISTRIBUTION_AS[script]}.py (test_distribution_is_the_parent_s)")


def halfway(golden: dict) -> int:
    """The step after which the shared run writes its checkpoint: half of the golden run's steps."""
    return golden["metrics"][-1]["step"] // 2


@pytest.fixture(scope="session")
def single_run(tmp_path_factory):
    """script -> (output dir, metrics) of its one-process golden command with a checkpoint halfway, run once."""
    runs = {}

    def get(script):
        if script not in runs:
            output_dir = tmp_path_factory.mktemp(f"{script}_run")
            golden = load(GOLDENS[script])
            checkpoint = ["--save-steps", str(halfway(golden)), "--save-total-limit", "10"]
            runs[script] = output_dir, run_script(golden["script"], golden["args"] + checkpoint, output_dir)
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
def test_resume_is_bit_for_bit(script, single_run, tmp_path):
    skip_if_inherited(script)
    golden = load(GOLDENS[script])
    output_dir, _ = single_run(script)
    interrupted_copy(output_dir, tmp_path / "resumed", halfway(golden))
    checkpoint = ["--save-steps", str(halfway(golden)), "--save-total-limit", "10", "--resume"]
    run_script(golden["script"], golden["args"] + checkpoint, tmp_path / "resumed")
    assert_same_run(tmp_path / "resumed", output_dir)


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
    skip_if_inherited(script)
    golden = load(GOLDENS[script])
    _, metrics = single_run(script)
    distributed = run_script(golden["script"], golden["torchrun_args"], tmp_path, nproc=2)
    problems = compare_metrics(distributed, metrics, **golden["torchrun_tolerance"])
    assert not problems, "torchrun (2 processes) differs from one process:\n" + "\n".join(problems[:20])
    assert len(list(tmp_path.glob("events.out.tfevents*"))) == 1, "only rank 0 may write"
