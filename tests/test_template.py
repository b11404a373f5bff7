"""The template every script follows (algos/dpo.py is the template; docs/conventions.md describes it):

- the plumbing under dpo.py's banner is byte-identical in every script that uses it, and nothing else sits there;
- a header, not a notebook: module docstrings of at most 15 lines;
- argument checks, output directories, checkpoints and resume, SIGTERM, data errors, truncation, dropout and
  mixture-of-experts models, each tried the way a user would meet it.
"""

import ast
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from datasets import Dataset

from algos.dpo import Args, check_args, load_splits, prepare_dataset
from tests.golden import REPO, RUN_ENV, assert_same_run, interrupted_copy, run_script

BANNER = "# Plumbing: every function below is the same, byte for byte, in every script that uses it"
SCRIPTS = sorted(path.stem for path in (REPO / "algos").glob("*.py"))
MODEL = str(REPO / "benchmarks/arith/model")


def plumbing(script: str) -> dict[str, str]:
    """name -> source of each top-level function or class under the script's banner, in order."""
    source = (REPO / "algos" / f"{script}.py").read_text()
    assert BANNER in source, f"algos/{script}.py has no plumbing banner"
    start = source[: source.index(BANNER)].count("\n") + 1
    tree = ast.parse(source)
    return {node.name: ast.get_source_segment(source, node, padded=True) for node in tree.body
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and node.lineno > start}


@pytest.mark.parametrize("script", [s for s in SCRIPTS if s != "dpo"])
def test_plumbing_is_dpo_s_byte_for_byte(script):
    template, own = plumbing("dpo"), plumbing(script)
    strangers = [name for name in own if name not in template]
    assert not strangers, f"{script}: {strangers} sit under the banner but are not dpo.py's plumbing: move them above"
    differing = [name for name in own if own[name] != template[name]]
    assert not differing, f"{script}: {differing} differ from dpo.py's (diff the two files)"
    order = [name for name in template if name in own]
    assert list(own) == order, f"{script}: the plumbing is not in dpo.py's order"


@pytest.mark.parametrize("script", SCRIPTS)
def test_header_is_at_most_15_lines(script):
    docstring = ast.get_docstring(ast.parse((REPO / "algos" / f"{script}.py").read_text()), clean=False)
    assert len(docstring.strip().splitlines()) <= 15, f"{script}: the module docstring has more than 15 lines"
    assert f"docs/algos/{script}.md" in docstring and (REPO / "docs" / "algos" / f"{script}.md").is_file()


# argument checks: one home, before anything is loaded or written


@pytest.mark.parametrize("flags, message", [
    ({"beta": -2.0}, "--beta -2.0: must be > 0"),
    ({"beta": 0.0}, "--beta 0.0: must be > 0"),
    ({"label_smoothing": 1.5}, "--label-smoothing 1.5: must be in [0, 0.5)"),
    ({"max_grad_norm": 0.0}, "--max-grad-norm 0.0: must be > 0"),
    ({"learning_rate": float("nan")}, "--learning-rate nan: must be > 0"),
    ({"warmup_ratio": 1.5}, "--warmup-ratio 1.5: must be in [0, 1]"),
    ({"per_device_train_batch_size": 0}, "--per-device-train-batch-size 0: must be >= 1"),
    ({"gradient_accumulation_steps": 0}, "--gradient-accumulation-steps 0: must be >= 1"),
    ({"per_device_eval_batch_size": 0}, "--per-device-eval-batch-size 0: must be >= 1"),
    ({"logging_steps": 0}, "--logging-steps 0: must be >= 1"),
    ({"num_train_epochs": 0}, "--num-train-epochs 0: must be >= 1"),
    ({"max_steps": 0}, "--max-steps 0: must be >= 1"),
    ({"max_prompt_length": 0}, "--max-prompt-length 0: must be >= 1"),
    ({"save_total_limit": 0}, "--save-total-limit 0: must be >= 1"),
    ({"model_name_or_path": "/nowhere/model"}, "no model at /nowhere/model"),
    ({"fsdp": True}, "--fsdp shards over the processes torchrun starts"),
    ({"resume": True}, "--resume: no complete checkpoint-<step> in --output-dir None"),
])
def test_bad_flags_are_refused_by_name(flags, message, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(ValueError, match=re.escape(message)):
        check_args(Args(**flags))


def test_every_bad_flag_is_named_at_once_and_the_defaults_pass():
    check_args(Args())
    with pytest.raises(ValueError) as error:
        check_args(Args(beta=-1.0, logging_steps=0, label_smoothing=0.5))
    assert all(flag in str(error.value) for flag in ("--beta", "--logging-steps", "--label-smoothing"))


def test_a_used_output_dir_needs_overwrite_or_resume(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("{}\n")
    with pytest.raises(ValueError, match="is not empty: pass --resume to continue its run, --overwrite"):
        check_args(Args(output_dir=str(tmp_path)))
    check_args(Args(output_dir=str(tmp_path), overwrite=True))
    check_args(Args(output_dir=str(tmp_path / "new")))
    with pytest.raises(ValueError, match="no complete checkpoint-<step>"):
        check_args(Args(output_dir=str(tmp_path), resume=True))
    (tmp_path / "checkpoint-3.tmp").mkdir()  # a checkpoint being written is never resumed from
    with pytest.raises(ValueError, match="no complete checkpoint-<step>"):
        check_args(Args(output_dir=str(tmp_path), resume=True))
    with pytest.raises(ValueError, match="choose one"):
        check_args(Args(output_dir=str(tmp_path), resume=True, overwrite=True))


def script_command(script: str, *flags: str) -> list[str]:
    return [sys.executable, str(REPO / "algos" / f"{script}.py"), *flags]


def run(command: list[str], cwd=REPO, timeout=300) -> subprocess.CompletedProcess:
    env = {**os.environ, **RUN_ENV, "PYTHONPATH": str(REPO)}
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


QUICK = ["--max-steps", "2", "--per-device-train-batch-size", "2", "--logging-steps", "1", "--dataset-test-split", "None"]


def test_a_failed_start_leaves_the_output_dir_alone(tmp_path):
    """--overwrite deletes only once model and data have loaded: a data error leaves the old run as it was."""
    out, data = tmp_path / "out", tmp_path / "pairs.jsonl"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 1}\n')
    data.write_text(json.dumps({"prompt": "Q: 1+1\n", "chosen": "Answer: 2"}) + "\n")  # no rejected
    done = run(script_command("dpo", *QUICK, "--dataset-name", str(data), "--output-dir", str(out), "--overwrite"))
    assert done.returncode != 0 and "lacks the column(s) ['rejected']" in done.stderr
    assert sorted(os.listdir(out)) == ["metrics.jsonl"] and (out / "metrics.jsonl").read_text() == '{"step": 1}\n'
    done = run(script_command("dpo", *QUICK, "--beta", "-2", "--output-dir", str(tmp_path / "never")))
    assert done.returncode != 0 and "--beta -2.0: must be > 0" in done.stderr and not (tmp_path / "never").exists()


def test_default_run_names_never_collide(tmp_path):
    """Two runs started in the same second with the same seed get their own directories."""
    env = {**os.environ, **RUN_ENV, "PYTHONPATH": str(REPO)}
    runs = [subprocess.Popen(script_command("dpo", *QUICK), cwd=tmp_path, env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True) for _ in range(2)]
    assert all(process.wait(timeout=300) == 0 for process in runs), [process.stderr.read()[-2000:] for process in runs]
    directories = list((tmp_path / "runs").iterdir())
    assert len(directories) == 2 and all((d / "model.safetensors").is_file() for d in directories)
    assert all(len((d / "metrics.jsonl").read_text().splitlines()) == 2 for d in directories)


# checkpoints and resume


@pytest.mark.parametrize("flags", [[], ["--fsdp"]], ids=["ddp", "fsdp"])
def test_torchrun_resume_is_bit_for_bit(flags, tmp_path):
    golden = json.loads((REPO / "tests/golden/dpo.run.json").read_text())
    args = golden["torchrun_args"] + flags + ["--max-steps", "4", "--save-steps", "1", "--save-total-limit", "2"]
    run_script("algos/dpo.py", args, tmp_path / "a", nproc=2)
    assert sorted(p.name for p in (tmp_path / "a").glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-4"]
    assert len(list((tmp_path / "a" / "checkpoint-3").glob("*.distcp"))) == 2  # one file per process
    interrupted_copy(tmp_path / "a", tmp_path / "b", 3)
    run_script("algos/dpo.py", args + ["--resume"], tmp_path / "b", nproc=2)
    assert_same_run(tmp_path / "b", tmp_path / "a")


def test_lora_checkpoints_hold_the_adapter_and_resume_bit_for_bit(tmp_path):
    import torch.distributed.checkpoint as dcp

    golden = json.loads((REPO / "tests/golden/dpo.run.json").read_text())
    args = golden["args"] + ["--lora", "--max-steps", "4", "--save-steps", "2"]
    run_script("algos/dpo.py", args, tmp_path / "a")
    saved = dcp.FileSystemReader(str(tmp_path / "a" / "checkpoint-2")).read_metadata().state_dict_metadata
    weights = [key for key in saved if key.startswith("model.")]
    assert weights and all("lora_" in key for key in weights), "the frozen base model was saved too"
    interrupted_copy(tmp_path / "a", tmp_path / "b", 2)
    run_script("algos/dpo.py", args + ["--resume"], tmp_path / "b")
    assert_same_run(tmp_path / "b", tmp_path / "a")


def test_sigterm_checkpoints_and_the_resumed_run_is_bit_for_bit(tmp_path):
    flags = ["--max-steps", "30", "--per-device-train-batch-size", "4", "--logging-steps", "1", "--eval-steps", "0",
             "--save-steps", "0", "--dataset-test-split", "None"]
    env = {**os.environ, **RUN_ENV, "PYTHONPATH": str(REPO)}
    stopped = tmp_path / "stopped"
    process = subprocess.Popen(script_command("dpo", *flags, "--output-dir", str(stopped)), cwd=REPO, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not ((stopped / "metrics.jsonl").is_file() and (stopped / "metrics.jsonl").read_text()):
        assert process.poll() is None and time.time() < deadline, process.communicate()
        time.sleep(0.1)
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    assert "checkpoint saved: continue with --resume" in stdout
    step = int(next(stopped.glob("checkpoint-*")).name.split("-")[1])
    assert 1 <= step < 30 and not (stopped / "model.safetensors").exists()
    resumed = run(script_command("dpo", *flags, "--output-dir", str(stopped), "--resume"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    whole = run(script_command("dpo", *flags, "--output-dir", str(tmp_path / "whole")))
    assert whole.returncode == 0, whole.stderr[-3000:]
    assert_same_run(stopped, tmp_path / "whole")


# data errors that name the problem and the fix


def write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


ROW = {"prompt": "Q: 1+1\n", "chosen": "Answer: 2", "rejected": "Answer: 3"}


def test_local_files_errors_name_file_and_line(tmp_path):
    with pytest.raises(ValueError, match=r"bad\.jsonl, line 2: invalid JSON"):
        load_splits(write(tmp_path / "bad.jsonl", json.dumps(ROW) + "\n{'prompt': 1}\n"), None, "train", None)
    with pytest.raises(ValueError, match=r"bad\.json, line 3: invalid JSON"):
        load_splits(write(tmp_path / "bad.json", "[\n" + json.dumps(ROW) + ",\n}\n"), None, "train", None)
    train, _ = load_splits(write(tmp_path / "rows.json", json.dumps([ROW, ROW])), None, "train", None)
    assert len(train) == 2 and train[0] == ROW
    train, _ = load_splits(write(tmp_path / "rows.csv", "prompt,chosen,rejected\nQ,a,b\n"), None, "train", None)
    assert train[0] == {"prompt": "Q", "chosen": "a", "rejected": "b"}
    empty, _ = load_splits(write(tmp_path / "empty.jsonl", ""), None, "train", None)
    with pytest.raises(ValueError, match="the train split has no rows"):
        prepare_dataset(empty, tokenizer(), 100, Args(), "the train split")


def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(MODEL)


@pytest.mark.parametrize("row, message", [
    ({**ROW, "chosen": None}, "row 1: column 'chosen' holds None (NoneType): expected a string or a list of"),
    ({**ROW, "prompt": [{"role": "user", "content": "1+1"}]}, "row 1: the columns ['prompt', 'chosen', 'rejected'] "
                                                              "mix strings and lists of messages"),
])
def test_bad_values_name_row_and_column(row, message):
    rows = Dataset.from_list([row, row])  # arrow needs one type per column
    with pytest.raises(ValueError, match=re.escape(message.replace("row 1", "row 0"))):
        prepare_dataset(rows, tokenizer(), 100, Args(), "the train split")


def test_values_of_another_type_in_a_file_name_row_and_column(tmp_path):
    rows = [ROW, {**ROW, "rejected": 3}]
    path = write(tmp_path / "rows.jsonl", "".join(json.dumps(row) + "\n" for row in rows))
    with pytest.raises(ValueError, match=r"rows\.jsonl, row 1: column 'rejected' holds 3, a int, where other rows"):
        load_splits(path, None, "train", None)


def test_identical_pairs_and_unknown_characters_are_flagged():
    rows = prepare_dataset(Dataset.from_list([ROW, {**ROW, "rejected": ROW["chosen"]}, {**ROW, "chosen": "Answer: é"}]),
                           tokenizer(), 100, Args())
    assert [(row["identical"], row["unknown"]) for row in rows] == [(False, False), (True, False), (False, True)]


# the models users bring


def test_dropout_is_off_so_the_first_step_logs_ln2(tmp_path):
    """A GPT-2 with dropout 0.1: with dropout off, step 1 has policy = reference (loss ln 2, margins and accuracy 0);
    with --no-disable-dropout it does not. --fused-linear's check passes in spite of the dropout."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model_dir = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(vocab_size=100, n_positions=64, n_embd=32, n_layer=2, n_head=4, resid_pdrop=0.1,
                               embd_pdrop=0.1, attn_pdrop=0.1)).save_pretrained(model_dir)
    tokenizer().save_pretrained(model_dir)
    flags = ["--model-name-or-path", str(model_dir), "--max-steps", "1", "--logging-steps", "1",
             "--dataset-test-split", "None", "--fused-linear"]
    done = run(script_command("dpo", *flags, "--output-dir", str(tmp_path / "off")))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "--max-length 1024 is beyond the model's 64 positions: using 64" in done.stdout
    first = json.loads((tmp_path / "off" / "metrics.jsonl").read_text().splitlines()[0])
    assert first["train/loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert first["train/rewards/margins"] == 0 and first["train/rewards/accuracies"] == 0
    done = run(script_command("dpo", *flags, "--no-disable-dropout", "--output-dir", str(tmp_path / "on")))
    assert done.returncode == 0, done.stderr[-3000:]
    noisy = json.loads((tmp_path / "on" / "metrics.jsonl").read_text().splitlines()[0])
    assert noisy["train/rewards/margins"] != 0


def test_mixture_of_experts_adds_the_router_loss():
    """With output_router_logits, the training loss is the DPO loss + router_aux_loss_coef x the router's loss."""
    from transformers import MixtralConfig, MixtralForCausalLM

    from algos.dpo import collate, compute_loss

    torch.manual_seed(0)
    config = MixtralConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                           output_router_logits=True, router_aux_loss_coef=0.5)
    model = MixtralForCausalLM(config)
    rows = prepare_dataset(Dataset.from_list([ROW, {**ROW, "prompt": "Q: 2+2\n"}]), tokenizer(), 100, Args())
    batch = collate(rows, 0)
    loss, metrics = compute_loss(model, model, batch, Args())
    router = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).aux_loss
    assert router > 0 and metrics["loss"].item() == pytest.approx(2 * math.log(2), abs=1e-6)  # policy = reference
    assert loss.item() == pytest.approx(math.log(2) + 0.5 * router.item(), abs=1e-6)
