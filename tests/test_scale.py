"""--lora, --fused-linear and --fsdp (issue 9), on the bundled tiny model on CPU.

- dpo.py: the LoRA reference is the base model (adapters disabled), the adapter it saves loads with peft;
  --fused-linear gives the same loss and gradients as the full logits, and the golden run trajectory;
  torchrun --fsdp (2 processes, gloo) gives the golden trajectory and saves a full state dict that
  from_pretrained loads; a model whose logits are not hidden @ lm_head.weight.T is refused.
- every script: one step with --lora --fused-linear (all in one Python process, to pay the imports once).
- nash_md.py, whose sampling loop has to keep the processes in step under FSDP: torchrun --fsdp --lora
  --fused-linear (2 processes) matches one process with the same global batch.
"""

import json
import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from algos.dpo import (
    AdaptersDisabled,
    Args,
    check_fsdp_shares,
    check_fused_linear,
    collate,
    compute_loss,
    concatenated_forward,
    forward_logits,
    load_splits,
    prepare_dataset,
    shifted_logprobs,
)
from kernels import linear_logprobs
from tests.golden import GOLDEN_DIR, REPO, RUN_ENV, compare_metrics, load, run_script

MODEL = str(REPO / "benchmarks/arith/model")
SCRIPTS = sorted(path.stem for path in (REPO / "algos").glob("*.py"))
ONE_STEP = ["--max-steps", "1", "--dataset-test-split", "None", "--logging-steps", "1"]

# Runs each script's __main__ in turn in one process; a script's failure is recorded, not raised.
DRIVER = """
import json, runpy, sys, traceback
runs, results = json.loads(sys.argv[1]), {}
for script, argv in runs.items():
    sys.argv = argv
    try:
        runpy.run_path(argv[0], run_name="__main__")
        results[script] = None
    except BaseException:
        results[script] = traceback.format_exc()
print("RESULTS " + json.dumps(results))
"""


LORA_FUSED = pytest.mark.xdist_group("lora_fused")  # one worker runs the shared fixture, under pytest-xdist


def one_step_runs(scripts: list[str], root) -> dict[str, str | None]:
    """One step of each script with --lora --fused-linear, all in one Python process: script -> None or its error."""
    runs = {script: [f"algos/{script}.py", *ONE_STEP, "--per-device-train-batch-size", "2", "--lora", "--fused-linear", "--output-dir",
                     str(root / script)] for script in scripts}
    env = {**os.environ, **RUN_ENV, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", DRIVER, json.dumps(runs)], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)
    line = [line for line in done.stdout.splitlines() if line.startswith("RESULTS ")]
    assert line, f"the driver failed:\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    return json.loads(line[-1][len("RESULTS "):])


@pytest.fixture(scope="session")  # not module: a worker interleaves modules, and would run it again
def lora_fused_run(request, tmp_path_factory):
    """script -> (output dir, None or its error) of one step with --lora --fused-linear. The first call runs every
    script whose tests are selected, in one process (the imports paid once); -k or --script selecting one script's
    tests runs that script alone."""
    root = tmp_path_factory.mktemp("lora_fused")
    selected = sorted({item.callspec.params["script"] for item in request.session.items
                       if "lora_fused_run" in item.fixturenames and hasattr(item, "callspec")
                       and "script" in item.callspec.params})
    results = {}

    def get(script):
        if script not in results:
            results.update(one_step_runs([s for s in selected if s not in results] if script in selected else [script],
                                         root))
        return root / script, results[script]

    return get


@LORA_FUSED
@pytest.mark.parametrize("script", SCRIPTS)
def test_one_step_with_lora_and_fused_linear(script, lora_fused_run):
    output_dir, error = lora_fused_run(script)
    assert error is None, f"{script} --lora --fused-linear failed:\n{error}"
    metrics = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["step"] == 1 and torch.isfinite(torch.tensor(metrics[-1]["train/loss"]))
    assert (output_dir / "adapter_config.json").is_file(), "--lora saves the adapter"
    assert not (output_dir / "model.safetensors").exists(), "--lora saves the adapter, not the whole model"


@LORA_FUSED
@pytest.mark.parametrize("script", ["dpo"])
def test_saved_adapter_loads_with_peft(script, lora_fused_run):
    from peft import AutoPeftModelForCausalLM

    output_dir, error = lora_fused_run(script)
    assert error is None, error
    model = AutoPeftModelForCausalLM.from_pretrained(output_dir)
    tokenizer = AutoTokenizer.from_pretrained(output_dir)
    base = AutoModelForCausalLM.from_pretrained(MODEL)
    ids = tokenizer(["Q: 1+2\n"], return_tensors="pt").input_ids
    with torch.no_grad():
        trained, original = model(ids).logits, base(ids).logits
        with model.disable_adapter():
            disabled = model(ids).logits
    assert torch.equal(disabled, original) and not torch.allclose(trained, original), "the adapter was trained"


@pytest.fixture(scope="module")
def pairs():
    """A collated batch of 4 pairs of the bundled test split, and the bundled tokenizer."""
    tokenizer = AutoTokenizer.from_pretrained(MODEL)
    args = Args()
    _, test = load_splits(args.dataset_name, None, "train", "test")
    rows = prepare_dataset(test.select(range(4)), tokenizer, 100, args, "test")
    return collate(rows, tokenizer.pad_token_id)


def lora_policy(seed=0):
    """The bundled model with LoRA adapters whose B is random (peft starts it at 0: adapter = identity)."""
    from peft import LoraConfig, get_peft_model

    policy = get_peft_model(AutoModelForCausalLM.from_pretrained(MODEL),
                            LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"))
    generator = torch.Generator().manual_seed(seed)
    for name, parameter in policy.named_parameters():
        if "lora_B" in name:
            parameter.data = torch.randn(parameter.shape, generator=generator) * 0.1
    return policy.train()


def test_lora_reference_is_the_base_model(pairs):
    policy, base = lora_policy(), AutoModelForCausalLM.from_pretrained(MODEL).eval()
    with torch.no_grad():
        reference = concatenated_forward(AdaptersDisabled(policy), pairs)
        expected = concatenated_forward(base, pairs)
        trained = concatenated_forward(policy, pairs)
    for got, want, moved in zip(reference[:2], expected[:2], trained[:2]):  # chosen and rejected log-probs
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
        assert not torch.allclose(moved, want), "the adapters change the policy"
    assert policy.training, "the reference's forward leaves the policy in training mode"
    _, metrics = compute_loss(policy, AdaptersDisabled(policy), pairs, Args())
    assert metrics["rewards/chosen"] != 0, "policy and reference differ"


def test_fused_linear_equals_full_logits(pairs):
    results = []
    for fused_linear in (False, True):
        policy, reference = AutoModelForCausalLM.from_pretrained(MODEL), AutoModelForCausalLM.from_pretrained(MODEL)
        with torch.no_grad():  # move the policy away from the reference, the same way both times
            for parameter in policy.parameters():
                parameter.add_(torch.randn(parameter.shape, generator=torch.Generator().manual_seed(0)) * 0.01)
        loss, metrics = compute_loss(policy, reference.eval(), pairs, Args(fused_linear=fused_linear))
        loss.backward()
        results.append((loss, metrics, {n: p.grad for n, p in policy.named_parameters()}))
    (loss, metrics, grads), (fused_loss, fused_metrics, fused_grads) = results
    torch.testing.assert_close(fused_loss, loss, rtol=1e-5, atol=1e-6)
    for key in metrics:
        torch.testing.assert_close(fused_metrics[key], metrics[key], rtol=1e-5, atol=1e-5)
    for name in grads:
        torch.testing.assert_close(fused_grads[name], grads[name], rtol=1e-4, atol=1e-6)


def tiny_model(kind: str):
    """A random model of another family with the bundled vocabulary, its lm_head scaled up so that the logits are
    large enough for a bias, a scale or a cap to change the log-probs."""
    from transformers import (CohereConfig, CohereForCausalLM, Gemma2Config, Gemma2ForCausalLM, GraniteConfig,
                              GraniteForCausalLM, LlamaConfig, LlamaForCausalLM)

    torch.manual_seed(0)
    sizes = dict(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=8, tie_word_embeddings=False)
    model = {"gemma2": lambda: Gemma2ForCausalLM(Gemma2Config(**sizes, final_logit_softcapping=2.0)),
             "cohere": lambda: CohereForCausalLM(CohereConfig(**sizes, logit_scale=0.25)),
             "granite": lambda: GraniteForCausalLM(GraniteConfig(**sizes, logits_scaling=4.0)),
             "llama_bias": lambda: LlamaForCausalLM(LlamaConfig(**sizes))}[kind]()
    if kind == "llama_bias":
        model.lm_head = torch.nn.Linear(32, 100, bias=True)
        torch.nn.init.normal_(model.lm_head.bias, std=3.0)
    with torch.no_grad():
        model.lm_head.weight.mul_(100.0)
    return model


@pytest.mark.parametrize("kind", ["gemma2", "cohere", "llama_bias"])
def test_fused_linear_reproduces_bias_scale_and_softcap(kind):
    model = tiny_model(kind)
    check_fused_linear(model, torch.device("cpu"))  # the head's bias, logit_scale or softcap are read from the model
    ids = torch.arange(8)[None] * 7 % 100
    logits, _ = forward_logits(model.eval(), ids, torch.ones_like(ids))
    (hidden, head), _ = forward_logits(model, ids, torch.ones_like(ids), fused_linear=True)
    plain = linear_logprobs(hidden[:, :-1], head["weight"], ids[:, 1:])  # without them
    assert not torch.allclose(plain, shifted_logprobs(logits, ids), atol=1e-3), "the test model's head is plain"


def test_fused_linear_refuses_what_it_cannot_reproduce():
    with pytest.raises(ValueError, match="fused-linear.*GraniteForCausalLM"):  # divides by config.logits_scaling
        check_fused_linear(tiny_model("granite"), torch.device("cpu"))


def test_fsdp_refuses_uneven_evaluation_shares():
    check_fsdp_shares(146, 2, 32, "the test split")  # 73 rows each: 3 batches each
    check_fsdp_shares(0, 2, 32, "the test split")
    check_fsdp_shares(7, 1, 2, "the test split")
    with pytest.raises(ValueError, match="per-device-eval-batch-size 32"):
        check_fsdp_shares(65, 2, 32, "the test split")  # 33 and 32 rows: 2 batches and 1


def test_fused_linear_run_matches_golden(tmp_path):
    golden = load(GOLDEN_DIR / "dpo.run.json")
    metrics = run_script(golden["script"], golden["args"] + ["--fused-linear"], tmp_path)
    problems = compare_metrics(metrics, golden["metrics"], **golden["tolerance"])
    assert not problems, "--fused-linear left the golden trajectory:\n" + "\n".join(problems[:20])


def test_fsdp_two_processes_match_golden_and_save_a_full_model(tmp_path):
    golden = load(GOLDEN_DIR / "dpo.run.json")
    metrics = run_script(golden["script"], golden["torchrun_args"] + ["--fsdp"], tmp_path, nproc=2)
    problems = compare_metrics(metrics, golden["metrics"], **golden["tolerance"])
    assert not problems, "torchrun --fsdp left the golden trajectory:\n" + "\n".join(problems[:20])
    model, info = AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not any(info.values()), f"the saved state dict is not the full model: {info}"
    base = AutoModelForCausalLM.from_pretrained(MODEL).state_dict()
    saved = model.state_dict()
    assert sorted(saved) == sorted(base) and any(not torch.equal(saved[k], base[k]) for k in base)


@LORA_FUSED
@pytest.mark.parametrize("script", ["nash_md"])
def test_nash_md_fsdp_matches_one_process(script, lora_fused_run, tmp_path):
    output_dir, error = lora_fused_run(script)
    assert error is None, error
    one_process = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    args = [*ONE_STEP, "--per-device-train-batch-size", "1", "--lora", "--fused-linear", "--fsdp"]  # same global batch
    fsdp = run_script("algos/nash_md.py", args, tmp_path, nproc=2)
    problems = compare_metrics(fsdp, one_process, rtol=1e-5, atol=1e-6)
    assert not problems, "torchrun --fsdp differs from one process:\n" + "\n".join(problems[:20])
    assert (tmp_path / "adapter_config.json").is_file()
