"""Our scripts against TRL: the same model, data, batch and hyperparameters through both, side by side.

    pip install -r requirements.txt -r benchmarks/requirements-trl.txt     # TRL is needed here only
    python benchmarks/compare_trl.py       # all: 2.5 CPU-minutes (8 min wall on a busy 2-core machine)
    python benchmarks/compare_trl.py --algos dpo ipo --steps 20

For each algorithm that TRL 1.16 also implements: DPO and IPO (`trl.DPOTrainer`, loss_type ["sigmoid"] and
["ipo"]), SimPO (`trl.experimental.cpo.CPOTrainer`, loss_type "simpo", cpo_alpha 0) and KTO (`trl.KTOTrainer`).
Nash-MD is listed but skipped when TRL has no Nash-MD trainer (1.16 has none: checked at run time, see the
output). The hyperparameters are each script's own defaults (`algos/<x>.py`'s `Args`), translated to TRL's
names (SimPO: TRL's simpo_gamma = our beta x gamma_beta_ratio, cpo_alpha = our sft_weight; IPO: TRL's beta is τ).
Everything else is set equal on both sides: float32 on the CPU, no dropout, torch.optim.AdamW with its default
betas and eps and no weight decay (TRL's optim "adamw_torch", not its default fused variant), a constant
learning rate without warm-up, gradient clipping at 1, no gradient checkpointing, no mixed precision (TRL's
configs default to bf16 and gradient checkpointing: both are switched off), the same maximum length.

What is compared, per algorithm:
0. Tokens. Every example of the fixed batch and of the training subset is tokenized by our script
   (`prepare_dataset`) and by the TRL trainer (its prepared dataset); the token ids of prompt and completions
   must be identical (BOS once at the start of the prompt, EOS once at the end of each completion, nothing
   truncated). The chat-template path (data/pairs_conversational_test.jsonl) is checked as well and reported:
   TRL tokenizes a conversation with the chat template alone, which on the bundled tokenizer writes neither
   BOS nor EOS, while our scripts add both (as for plain strings, and as the base model was trained).
1. Loss on a fixed batch (a1). The reference is the bundled base model; the policy is the base model with
   seeded Gaussian noise added to every weight (`--perturb-scale` times the weight tensor's standard
   deviation), so that policy != reference and the loss is not the trivial ln 2 of step 0. For KTO the two
   swap roles (policy = base, reference = perturbed): a perturbed policy is less likely than the trained base
   on any text, so KTO's KL estimate would be negative, clamped to 0, and its mismatched pairs untested. The first
   `--num-fixed` examples of the test split are one batch. Our side calls the script's own pure functions
   (`prepare_dataset`, then `evaluate`, i.e. `compute_loss` on `collate`d rows); TRL's side is the trainer's
   public `evaluate()` on the same examples. Each logged metric is printed side by side with |ours - TRL|.
   Where a metric is defined differently (IPO's rewards and accuracies, SimPO's logps, KTO's margins and the
   pairs of its KL estimate) the row is marked "by definition" and explained, and a second row computes the
   same quantity in TRL's definition (from our log-probs, or with KTO's batch reversed so that TRL's
   mismatched pairs are ours), which must then agree.
   Tolerance: |ours - TRL| <= 1e-5 + 1e-5 * |TRL|. Both sides run the same float32 model on the same token
   ids (checked exactly in 0, not through this tolerance), so they differ only in rounding: the order of
   the sums, and the log-softmax (our `kernels.logprobs` against TRL's chunked fused LM head). The unit
   roundoff of float32 is 6e-8 and a sequence log-prob is a sum of ~50-100 per-token terms computed along
   different paths, so the two can differ by ~1e-6 relative; the tolerance leaves ten times that. A real
   difference in the loss (a normalisation, a sign, a missing term, another β) moves it by far more.
2. Loss of the first training steps (a2). `--steps` optimiser steps of `--batch-size` examples, in the same
   order on both sides: our script is run as is (`python algos/<x>.py`, here through runpy) on a training
   subset, its own seeded permutation (`global_batches`) is read back and the TRL trainer gets the subset in
   that order with sequential sampling. Both start from the base model (so step 1 is the policy = reference
   value, e.g. ln 2 for DPO) and log the loss of every step. Tolerance: 1e-4 absolute per step (the
   fixed-batch tolerance plus what AdamW does with rounding-level differences in the gradients over a few
   steps; a different data order, learning rate or clipping moves the loss by 1e-2 within a few steps).
3. Time per optimiser step and peak memory (b), measured in the same runs as 2, each side in its own
   process, one after the other (never concurrently): the time between consecutive optimiser steps (a
   global `torch.optim` step hook in both processes, so both are timed the same way; the first step is
   left out as warm-up), the median and the ratio TRL / ours; the process's peak resident memory (VmHWM),
   and its resident memory after the imports and after the first step, for scale. On a loaded machine
   absolute times are noisy; the ratio, measured in one run on the same machine, is the figure to read.
   `--repeats` alternates the two sides that many times and pools the steps. With the bundled model (under a
   million parameters) both processes' memory is almost all library code and allocator arenas, not
   tensors: the memory columns compare the two stacks' footprints, and say little about large models.

Outputs: the tables on stdout, and --out-dir/compare.md and compare.json (every number, the versions, the
command line). Runs on the CPU, offline, from the bundled task in benchmarks/arith/.
"""

import contextlib
import importlib
import itertools
import json
import math
import os
import platform
import runpy
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import tyro

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

ALGOS = ["dpo", "ipo", "simpo", "kto", "nash_md"]


@dataclass
class Args:
    algos: list[str] = field(default_factory=lambda: list(ALGOS))
    """which algorithms to compare (of dpo ipo simpo kto nash_md; a script missing from algos/ is skipped)"""
    model_dir: str = str(REPO / "benchmarks/arith/model")
    """the base model: the start of both training runs; in the fixed batch the reference, with a perturbed copy
    as the policy (for KTO the other way round, see the module docstring)"""
    data_dir: str = str(REPO / "benchmarks/arith/data")
    """the bundled data: pairs_{train,test}.jsonl and unpaired_{train,test}.jsonl"""
    num_fixed: int = 64
    """examples of the test split in the fixed batch of comparison 1 (one batch, on both sides)"""
    perturb_scale: float = 0.3
    """the fixed-batch policy is the base model plus this times N(0, std of each weight tensor)"""
    steps: int = 20
    """optimiser steps of comparisons 2 and 3"""
    batch_size: int = 8
    """examples per optimiser step (pairs, or for KTO single completions), one micro-batch, on both sides"""
    learning_rate: float = 1e-4
    """constant AdamW learning rate of the training runs (no warm-up, no decay, on both sides)"""
    max_length: int = 1024
    """maximum tokens of prompt + completion on both sides (the bundled data never reaches it)"""
    repeats: int = 2
    """alternate the two training processes this many times (timing pooled; losses from the first)"""
    threads: int = 1
    """torch CPU threads of every process (OMP_NUM_THREADS)"""
    seed: int = 1
    """seed of the perturbation, of the data order and of both trainers"""
    out_dir: str = str(REPO / "benchmarks/results/trl")
    """where compare.md and compare.json go"""
    keep_tmp: bool = False
    """if toggled, keep the temporary directory (perturbed policy, training runs) and print its path"""


FIXED_ATOL, FIXED_RTOL = 1e-5, 1e-5  # comparison 1, see the module docstring
STEP_ATOL = 1e-4  # comparison 2


# ---------------------------------------------------------------------------------------------------------------
# algorithm specifications: our script, its data, its hyperparameters, and the TRL trainer built from them


def script_module(algo: str):
    """algos/<algo>.py imported as a module (importing a script runs no training), or None if absent."""
    if not (REPO / "algos" / f"{algo}.py").is_file():
        return None
    return importlib.import_module(f"algos.{algo}")


def trl_nash_md():
    """TRL's Nash-MD trainer class, or None (older TRL had trl.NashMDTrainer, then trl.experimental.nash_md)."""
    for module_name in ("trl", "trl.experimental.nash_md"):
        try:
            return getattr(importlib.import_module(module_name), "NashMDTrainer")
        except (ImportError, AttributeError):
            continue
    return None


def data_kind(algo: str) -> str:
    return "unpaired" if algo == "kto" else "pairs"


def hyperparameters(algo: str, ours) -> dict:
    """The script's default hyperparameters (its Args), the ones we pass on to TRL."""
    names = {"dpo": ["beta", "label_smoothing"], "ipo": ["tau", "length_normalize"],
             "simpo": ["beta", "gamma_beta_ratio", "label_smoothing", "sft_weight"],
             "kto": ["beta", "desirable_weight", "undesirable_weight"]}[algo]
    hp = {name: getattr(ours, name) for name in names if hasattr(ours, name)}
    if algo == "ipo":
        hp["length_normalize"] = True  # TRL's IPO always divides by the length; ours sums by default (the paper's)
    return hp


def trl_config_and_trainer(algo: str, hp: dict, common: dict):
    """(config, trainer class) of TRL for an algorithm, with our hyperparameters in TRL's names."""
    if algo in ("dpo", "ipo"):
        from trl import DPOConfig, DPOTrainer

        if algo == "dpo":
            if hp.get("label_smoothing", 0.0):  # TRL's sigmoid loss has no label smoothing ("robust" is another loss)
                raise ValueError("cDPO (--label-smoothing > 0) has no counterpart in TRL's DPOTrainer: not compared")
            config = DPOConfig(loss_type=["sigmoid"], beta=hp["beta"], **common)
        else:
            if not hp.get("length_normalize", True):
                raise ValueError("TRL's IPO is always length-normalised: compare with --length-normalize (the default)")
            config = DPOConfig(loss_type=["ipo"], beta=hp["tau"], **common)  # TRL's β is IPO's τ
        return config, DPOTrainer
    if algo == "simpo":
        from trl.experimental.cpo import CPOConfig, CPOTrainer

        # TRL subtracts simpo_gamma / beta from the length-averaged margin, then multiplies by beta: its
        # simpo_gamma is the paper's γ itself, ours is γ/β (the official code's knob); its cpo_alpha is our
        # sft_weight (both a token-level mean NLL over the chosen completions)
        config = CPOConfig(loss_type="simpo", beta=hp["beta"], simpo_gamma=hp["beta"] * hp["gamma_beta_ratio"],
                           label_smoothing=hp["label_smoothing"], cpo_alpha=hp["sft_weight"], **common)
        return config, CPOTrainer
    if algo == "kto":
        from trl import KTOConfig, KTOTrainer

        config = KTOConfig(loss_type="kto", beta=hp["beta"], desirable_weight=hp["desirable_weight"],
                           undesirable_weight=hp["undesirable_weight"], **common)
        return config, KTOTrainer
    raise ValueError(f"no TRL trainer for {algo}")


def trl_common(args: Args, output_dir: str, **overrides) -> dict:
    """TrainingArguments equal to our scripts' settings (TRL's own defaults differ: bf16, checkpointing, ...)."""
    common = dict(
        output_dir=output_dir, seed=args.seed, use_cpu=True, bf16=False, fp16=False, gradient_checkpointing=False,
        disable_dropout=True, report_to="none", disable_tqdm=True, save_strategy="no", eval_strategy="no",
        logging_steps=1, per_device_train_batch_size=args.batch_size, gradient_accumulation_steps=1,
        learning_rate=args.learning_rate, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
        max_grad_norm=1.0, optim="adamw_torch", train_sampling_strategy="sequential", dataloader_num_workers=0,
        max_length=args.max_length,
    )
    common.update(overrides)
    return common


def our_flags(hp: dict) -> list[str]:
    """Our hyperparameters as tyro flags."""
    flags = []
    for name, value in hp.items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            flags.append(flag if value else "--no-" + name.replace("_", "-"))
        else:
            flags += [flag, str(value)]
    return flags


# ---------------------------------------------------------------------------------------------------------------
# measurements inside a process


def rss_mb(field_name: str = "VmRSS") -> float:
    """Resident memory of this process in MiB from /proc/self/status (VmHWM: its peak so far)."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def install_step_clock() -> list[float]:
    """Times (perf_counter) at the end of every optimiser step of any torch optimizer in this process."""
    from torch.optim.optimizer import register_optimizer_step_post_hook

    stamps: list[float] = []

    def hook(optimizer, args, kwargs):
        stamps.append(time.perf_counter())
        if len(stamps) == 1:
            FIRST_STEP_RSS.append(rss_mb())

    register_optimizer_step_post_hook(hook)
    return stamps


FIRST_STEP_RSS: list[float] = []  # resident memory right after the first optimiser step (models, data, AdamW state)


def quiet():
    import logging

    import datasets
    import transformers

    logging.getLogger("trl").setLevel(logging.ERROR)

    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    import warnings

    warnings.filterwarnings("ignore")


# ---------------------------------------------------------------------------------------------------------------
# tokens: our rows against TRL's prepared dataset


def trl_token_rows(algo: str, dataset) -> list[dict]:
    """TRL's prepared dataset as our rows' keys (prompt_ids + completion ids)."""
    rows = []
    for example in dataset:
        if algo == "simpo":  # CPO: full sequences with the prompt length in prompt_input_ids
            n = len(example["prompt_input_ids"])
            rows.append({"prompt_ids": example["chosen_input_ids"][:n], "chosen_ids": example["chosen_input_ids"][n:],
                         "rejected_ids": example["rejected_input_ids"][n:]})
        elif algo == "kto":
            rows.append({"prompt_ids": example["prompt_ids"], "completion_ids": example["completion_ids"]})
        else:
            rows.append({k: example[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")})
    return rows


def compare_tokens(ours: list[dict], theirs: list[dict]) -> dict:
    """How many examples differ, and the first difference spelled out."""
    keys = [k for k in theirs[0] if k.endswith("_ids")] if theirs else []
    differing, first = 0, None
    for i, (a, b) in enumerate(zip(ours, theirs)):
        bad = [k for k in keys if a[k] != b[k]]
        if bad:
            differing += 1
            if first is None:
                first = {"example": i, **{f"ours/{k}": a[k] for k in bad}, **{f"trl/{k}": b[k] for k in bad}}
    if len(ours) != len(theirs):
        differing += abs(len(ours) - len(theirs))
    return {"examples": max(len(ours), len(theirs)), "differing": differing, "first_difference": first}


# ---------------------------------------------------------------------------------------------------------------
# comparison 1: a fixed batch, policy != reference


def perturbed_policy(model_dir: str, out: Path, scale: float, seed: int) -> str:
    """Save the base model plus seeded noise (scale x each tensor's std) to `out`; return the directory."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            std = p.std() if p.numel() > 1 else p.abs()
            p.add_(scale * std * torch.randn(p.shape, generator=generator))
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(out)
    return str(out)


def load_jsonl(path: str, n: int | None = None):
    from datasets import load_dataset

    data = load_dataset("json", data_files=path, split="train")
    return data.select(range(min(n, len(data)))) if n else data


def ours_fixed_batch(algo: str, mod, hp: dict, policy_dir: str, reference_dir: str, args: Args, data):
    """Our metrics on the fixed batch through the script's own functions; also its rows, and extra rows in
    TRL's conventions where a metric is defined differently."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    script_args = mod.Args(model_name_or_path=args.model_dir, max_length=args.max_length,
                           per_device_eval_batch_size=len(data), **hp)
    policy = AutoModelForCausalLM.from_pretrained(policy_dir, dtype=torch.float32)
    reference = AutoModelForCausalLM.from_pretrained(reference_dir, dtype=torch.float32).eval().requires_grad_(False)
    vocab_size = policy.get_input_embeddings().num_embeddings
    rows = mod.prepare_dataset(data, tokenizer, vocab_size, script_args, "the fixed batch")
    device, autocast = torch.device("cpu"), contextlib.nullcontext()
    if algo == "simpo":  # reference-free
        metrics = mod.evaluate(policy, rows, script_args, pad_token_id, device, autocast)
    else:
        metrics = mod.evaluate(policy, reference, rows, script_args, pad_token_id, device, autocast)
    metrics = {k.removeprefix("eval/"): v for k, v in metrics.items()}

    extra = {}
    if algo == "ipo":  # TRL logs τ·(logp - ref) summed over tokens; ours τ·(logp - ref)/|y|, what the loss uses
        batch = mod.collate(rows, pad_token_id)
        with torch.no_grad():
            policy.eval()
            chosen, rejected, _ = mod.concatenated_forward(policy, batch)
            ref_chosen, ref_rejected, _ = mod.concatenated_forward(reference, batch)
        chosen_rewards, rejected_rewards = hp["tau"] * (chosen - ref_chosen), hp["tau"] * (rejected - ref_rejected)
        extra["rewards/chosen"] = chosen_rewards.mean().item()
        extra["rewards/rejected"] = rejected_rewards.mean().item()
        extra["rewards/margins"] = (chosen_rewards - rejected_rewards).mean().item()
        extra["rewards/accuracies"] = (chosen_rewards > rejected_rewards).float().mean().item()
    if algo == "kto":  # TRL's margin is the difference of the class means; ours is per example, see kto.py
        extra["rewards/margins"] = metrics["rewards/chosen"] - metrics["rewards/rejected"]
    if algo == "simpo":  # TRL's CPO logs the length-averaged log-probs as logps/*; ours the sums
        batch = mod.collate(rows, pad_token_id)
        with torch.no_grad():
            policy.eval()
            chosen, rejected, _ = mod.concatenated_forward(policy, batch)
        chosen_lengths, rejected_lengths = mod.completion_lengths(batch["labels"]).chunk(2)
        extra["logps/chosen"] = (chosen / chosen_lengths.clamp(min=1)).mean().item()
        extra["logps/rejected"] = (rejected / rejected_lengths.clamp(min=1)).mean().item()
    return metrics, rows, extra


def trl_fixed_batch(algo: str, hp: dict, policy_dir: str, reference_dir: str, args: Args, data, tmp: Path):
    """TRL's metrics on the fixed batch: the trainer's public evaluate(), one batch; also its tokens."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    n = len(data)
    # KTO pairs each example with a mismatched completion within blocks of per_device_train_batch_size, and
    # our kto.py within the evaluation batch: both are the whole fixed batch here
    common = trl_common(args, str(tmp / f"trl_fixed_{algo}"), per_device_eval_batch_size=n,
                        per_device_train_batch_size=n)
    config, trainer_class = trl_config_and_trainer(algo, hp, common)
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    policy = AutoModelForCausalLM.from_pretrained(policy_dir, dtype=torch.float32)
    kwargs = {}
    if algo != "simpo":
        kwargs["ref_model"] = AutoModelForCausalLM.from_pretrained(reference_dir, dtype=torch.float32)
    with contextlib.redirect_stdout(open(os.devnull, "w")):  # the trainer prints its logs with disable_tqdm
        trainer = trainer_class(model=policy, args=config, train_dataset=data, eval_dataset=data,
                                processing_class=tokenizer, **kwargs)
        metrics = trainer.evaluate()
    skip = {"eval_runtime", "eval_samples_per_second", "eval_steps_per_second", "epoch", "eval_num_tokens",
            "eval_model_preparation_time"}
    metrics = {k.removeprefix("eval_"): v for k, v in metrics.items() if k not in skip}
    return metrics, trl_token_rows(algo, trainer.eval_dataset)


def compare_metrics(ours: dict, theirs: dict, extra: dict, notes: dict, variants: dict) -> list[dict]:
    """(rows, metrics of TRL only, metrics of ours only): a row metric / ours / TRL / |diff| / tolerance /
    verdict for every metric both sides log. `extra`: our
    value of a metric in TRL's definition, where the two define it differently; `variants`: other TRL runs
    (label -> metrics) shown, marked "by definition", where they differ from the compared TRL run."""
    rows = []
    for key in [k for k in ours if k in theirs]:
        a, b = ours[key], theirs[key]
        diff, tol = abs(a - b), FIXED_ATOL + FIXED_RTOL * abs(b)
        if key in extra:  # defined differently: show it, then the same quantity in TRL's convention
            rows.append({"metric": key, "ours": a, "trl": b, "abs_diff": diff, "tol": None,
                         "verdict": "by definition", "note": notes.get(key, "")})
            c = extra[key]
            rows.append({"metric": f"{key} (TRL's definition, from our log-probs)", "ours": c, "trl": b,
                         "abs_diff": abs(c - b), "tol": tol, "verdict": "ok" if abs(c - b) <= tol else "DIFFERS",
                         "note": ""})
        else:
            rows.append({"metric": key, "ours": a, "trl": b, "abs_diff": diff, "tol": tol,
                         "verdict": "ok" if diff <= tol else "DIFFERS", "note": notes.get(key, "")})
        for label, values in variants.items():
            if key in values and abs(values[key] - theirs[key]) > FIXED_ATOL + FIXED_RTOL * abs(theirs[key]):
                rows.append({"metric": f"{key} ({label})", "ours": ours[key], "trl": values[key],
                             "abs_diff": abs(ours[key] - values[key]), "tol": None, "verdict": "by definition",
                             "note": notes.get(f"{key} ({label})", "")})
    return rows, sorted(set(theirs) - set(ours)), sorted(set(ours) - set(theirs))


# ---------------------------------------------------------------------------------------------------------------
# comparisons 2 and 3: training processes


def worker(spec_path: str) -> None:
    """One training run in this process (side "ours" or "trl"); writes its measurements to spec["result"]."""
    spec = json.loads(Path(spec_path).read_text())
    import datasets  # noqa: F401  (the libraries of both sides, so that "RSS after imports" counts them)
    import torch
    import transformers  # noqa: F401

    if spec["side"] == "trl":
        import trl  # noqa: F401
    torch.set_num_threads(spec["threads"])
    quiet()
    rss_imports = rss_mb()
    stamps = install_step_clock()
    losses: list[float] = []
    tokens = None
    start = time.perf_counter()
    if spec["side"] == "ours":
        script = str(REPO / "algos" / f"{spec['algo']}.py")
        sys.argv = [script] + spec["flags"]
        with open(os.devnull, "w") as sink, contextlib.redirect_stderr(sink):  # the progress bar
            runpy.run_path(script, run_name="__main__")
        for line in open(Path(spec["output_dir"]) / "metrics.jsonl"):
            record = json.loads(line)
            if "train/loss" in record:
                losses.append(record["train/loss"])
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        args = Args(**spec["args"])
        common = trl_common(args, spec["output_dir"], max_steps=spec["steps"])
        config, trainer_class = trl_config_and_trainer(spec["algo"], spec["hp"], common)

        class Recording(trainer_class):
            """The trainer, recording the loss of every training step unrounded."""

            def compute_loss(self, model, inputs, *rest, **kwargs):
                loss = super().compute_loss(model, inputs, *rest, **kwargs)
                if model.training:
                    losses.append((loss[0] if isinstance(loss, tuple) else loss).item())
                return loss

        data = load_jsonl(spec["train_file"]).select(spec["order"])
        tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
        model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32)
        trainer = Recording(model=model, args=config, train_dataset=data, processing_class=tokenizer)
        trainer.train()
        tokens = trl_token_rows(spec["algo"], trainer.train_dataset)
    wall = time.perf_counter() - start
    steps = [b - a for a, b in zip(stamps, stamps[1:])]
    result = {"side": spec["side"], "losses": losses, "step_seconds": steps, "optimizer_steps": len(stamps),
              "rss_after_imports_mb": rss_imports,
              "rss_after_step_1_mb": FIRST_STEP_RSS[0] if FIRST_STEP_RSS else None, "peak_rss_mb": rss_mb("VmHWM"),
              "wall_seconds": wall,
              "tokens": tokens}
    Path(spec["result"]).write_text(json.dumps(result))


def run_worker(spec: dict, tmp: Path, threads: int) -> dict:
    path = tmp / f"spec_{spec['algo']}_{spec['side']}_{spec['repeat']}.json"
    spec["result"] = str(path.with_suffix(".result.json"))
    path.write_text(json.dumps(spec))
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false",
               TQDM_DISABLE="1", HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error",
               PYTHONWARNINGS="ignore")
    process = subprocess.run([sys.executable, __file__, "_worker", str(path)], env=env, cwd=REPO,
                             capture_output=True, text=True)
    if process.returncode != 0:
        raise RuntimeError(f"{spec['side']} run of {spec['algo']} failed:\n{process.stdout[-3000:]}\n"
                           f"{process.stderr[-5000:]}")
    return json.loads(Path(spec["result"]).read_text())


def training_order(mod, algo: str, n_rows: int, args: Args) -> list[int]:
    """The rows our script takes, in its order (its own seeded `global_batches`), for `--steps` steps."""
    batches = itertools.islice(mod.global_batches(n_rows, args.batch_size, args.seed), args.steps)
    return [i for batch in batches for i in batch]


def compare_training(algo: str, mod, hp: dict, args: Args, tmp: Path) -> dict:
    n_rows = args.steps * args.batch_size  # one epoch of exactly --steps steps
    train_file = tmp / f"{algo}_train.jsonl"
    with open(Path(args.data_dir) / f"{data_kind(algo)}_train.jsonl") as source:
        lines = list(itertools.islice(source, n_rows))
    if len(lines) < n_rows:
        raise ValueError(f"{algo}: the training split has {len(lines)} rows, fewer than --steps x --batch-size")
    train_file.write_text("".join(lines))
    order = training_order(mod, algo, n_rows, args)
    trl_order = order
    if algo == "kto":  # TRL pairs x_i with y_(i-1) in each batch, ours with y_(i+1): reversing each batch aligns them
        trl_order = [i for s in range(0, len(order), args.batch_size) for i in reversed(order[s : s + args.batch_size])]
    flags = ["--model-name-or-path", args.model_dir, "--dataset-name", str(train_file), "--max-steps", str(args.steps),
             "--per-device-train-batch-size", str(args.batch_size), "--learning-rate", str(args.learning_rate),
             "--lr-scheduler-type", "constant_with_warmup", "--warmup-ratio", "0", "--logging-steps", "1",
             "--eval-steps", "0", "--seed", str(args.seed), "--max-length", str(args.max_length),
             "--no-cuda"] + our_flags(hp)
    runs = {"ours": [], "trl": []}
    for repeat in range(args.repeats):
        for side in ("ours", "trl"):
            spec = {"algo": algo, "side": side, "repeat": repeat, "threads": args.threads, "steps": args.steps,
                    "hp": hp, "args": asdict(args), "train_file": str(train_file), "order": trl_order,
                    "output_dir": str(tmp / f"run_{algo}_{side}_{repeat}"),
                    "flags": flags + ["--output-dir", str(tmp / f"run_{algo}_{side}_{repeat}")]}
            runs[side].append(run_worker(spec, tmp, args.threads))
            print(f"  {algo} {side} run {repeat + 1}/{args.repeats}: {runs[side][-1]['wall_seconds']:.1f} s", flush=True)
    # tokens of the training subset: the script's prepare_dataset, in TRL's order, against TRL's prepared dataset
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    script_args = mod.Args(model_name_or_path=args.model_dir, max_length=args.max_length, **hp)
    our_rows = mod.prepare_dataset(load_jsonl(str(train_file)), tokenizer, len(tokenizer), script_args, "the subset")
    tokens = compare_tokens([our_rows[i] for i in trl_order], runs["trl"][0]["tokens"])
    ours, theirs = runs["ours"][0]["losses"], runs["trl"][0]["losses"]
    steps = [{"step": i + 1, "ours": a, "trl": b, "abs_diff": abs(a - b), "verdict": "ok" if abs(a - b) <= STEP_ATOL
              else "DIFFERS"} for i, (a, b) in enumerate(zip(ours, theirs))]
    speed = {}
    for side, results in runs.items():
        seconds = [s for r in results for s in r["step_seconds"]]
        speed[side] = {"median_step_s": statistics.median(seconds), "mean_step_s": statistics.fmean(seconds),
                       "timed_steps": len(seconds), "peak_rss_mb": max(r["peak_rss_mb"] for r in results),
                       "rss_after_imports_mb": max(r["rss_after_imports_mb"] for r in results),
                       "rss_after_step_1_mb": max(r["rss_after_step_1_mb"] for r in results),
                       "wall_s": statistics.fmean(r["wall_seconds"] for r in results)}
    speed["trl_over_ours_step_time"] = speed["trl"]["median_step_s"] / speed["ours"]["median_step_s"]
    speed["trl_over_ours_peak_rss"] = speed["trl"]["peak_rss_mb"] / speed["ours"]["peak_rss_mb"]
    return {"rows": n_rows, "kto_batches_reversed_for_trl": algo == "kto", "tokens": tokens, "steps": steps,
            "max_abs_diff": max(s["abs_diff"] for s in steps) if steps else None,
            "n_losses": {"ours": len(ours), "trl": len(theirs)}, "speed": speed}


# ---------------------------------------------------------------------------------------------------------------
# explanations, per algorithm and metric

NOTES = {
    "ipo": {
        "rewards/chosen": "ours τ·(logp−ref)/|y|, the length-normalised log-ratio the loss uses; TRL logs τ·(logp−ref) "
                          "summed over tokens although its loss normalises too",
        "rewards/rejected": "as rewards/chosen",
        "rewards/margins": "as rewards/chosen",
        "rewards/accuracies": "from the rewards, so as rewards/chosen: normalised (ours) or summed (TRL) log-ratios "
                              "rank a pair differently when the completions' lengths differ",
    },
    "kto": {
        "kl (TRL as is)": "the KL estimate z0 comes from mismatched pairs: TRL pairs prompt x_i with completion y_(i-1) "
                          "of its batch, ours (and the DESIGN) with y_(i+1), so the two average different pairs; the row "
                          "above is TRL on the batch in reverse order, which makes its pairs ours",
        "loss (TRL as is)": "through z0, as kl",
        "rewards/margins": "ours the mean of β·(r−z0) (desirable) and β·(z0−r) (undesirable), how far each example is "
                           "on its label's side of the reference point; TRL's the mean desirable reward minus the mean "
                           "undesirable one",
    },
    "simpo": {
        "logps/chosen": "ours logp(y) summed over the completion tokens, as in every script; TRL's CPO logs the "
                        "length-averaged logp(y)/|y| it feeds the loss",
        "logps/rejected": "as logps/chosen",
    },
}


def compare_algo(algo: str, args: Args, tmp: Path, perturbed_dir: str) -> dict:
    mod = script_module(algo)
    if algo == "nash_md":
        trainer = trl_nash_md()
        import trl

        if trainer is None:
            return {"skipped": f"TRL {trl.__version__} has no Nash-MD trainer (neither trl.NashMDTrainer nor "
                               "trl.experimental.nash_md.NashMDTrainer exists), so there is nothing to compare with"}
        return {"skipped": f"TRL {trl.__version__} has {trainer.__name__}, but this comparison does not drive it yet"}
    if mod is None:
        return {"skipped": f"algos/{algo}.py does not exist yet"}
    hp = hyperparameters(algo, mod.Args())
    result = {"hyperparameters": hp}
    test_file = str(Path(args.data_dir) / f"{data_kind(algo)}_test.jsonl")
    data = load_jsonl(test_file, args.num_fixed)

    # the perturbed model is the policy and the base model the reference, except for KTO: there the roles are
    # swapped, because a perturbed policy is less likely than the trained base on any text, so KTO's KL
    # estimate would be negative and clamped to 0, leaving its mismatched pairs untested
    policy_dir, reference_dir = (args.model_dir, perturbed_dir) if algo == "kto" else (perturbed_dir, args.model_dir)
    t0 = time.perf_counter()
    ours, our_rows, extra = ours_fixed_batch(algo, mod, hp, policy_dir, reference_dir, args, data)
    theirs, trl_rows = trl_fixed_batch(algo, hp, policy_dir, reference_dir, args, data, tmp)
    variants = {}
    if algo == "kto":  # TRL pairs x_i with y_(i-1) for the KL estimate, ours with y_(i+1): the batch reversed aligns them
        reversed_data = data.select(range(len(data) - 1, -1, -1))
        aligned, _ = trl_fixed_batch(algo, hp, policy_dir, reference_dir, args, reversed_data, tmp)
        variants, theirs = {"TRL as is": theirs}, aligned
    rows, only_trl, only_ours = compare_metrics(ours, theirs, extra, NOTES.get(algo, {}), variants)
    roles = {"kto": ("base", "perturbed base"), "simpo": ("perturbed base", "none (reference-free)")}.get(
        algo, ("perturbed base", "base"))
    result["fixed_batch"] = {"examples": len(data), "policy": roles[0], "reference": roles[1], "rows": rows,
                             "only_in_trl": only_trl, "only_in_ours": only_ours,
                             "tokens": compare_tokens(our_rows, trl_rows), "seconds": time.perf_counter() - t0}
    print(f"  {algo} fixed batch: {time.perf_counter() - t0:.1f} s", flush=True)
    result["training"] = compare_training(algo, mod, hp, args, tmp)
    return result


def conversational_tokens(args: Args, tmp: Path) -> dict | None:
    """Our dpo.py against TRL's DPOTrainer on the chat-template path (data/pairs_conversational_test.jsonl)."""
    path = Path(args.data_dir) / "pairs_conversational_test.jsonl"
    mod = script_module("dpo")
    if not path.is_file() or mod is None:
        return None
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    data = load_jsonl(str(path))
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    model = AutoModelForCausalLM.from_pretrained(args.model_dir)
    ours = mod.prepare_dataset(data, tokenizer, model.get_input_embeddings().num_embeddings, mod.Args(), "conv")
    trainer = DPOTrainer(model=model, args=DPOConfig(**trl_common(args, str(tmp / "trl_conv"))), train_dataset=data,
                         processing_class=AutoTokenizer.from_pretrained(args.model_dir))
    theirs = trl_token_rows("dpo", trainer.train_dataset)
    result = compare_tokens(ours, theirs)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    result["trl_prompts_starting_with_bos"] = sum(r["prompt_ids"][:1] == [bos] for r in theirs)
    completions = ("chosen_ids", "rejected_ids")
    result["trl_completions_ending_with_eos"] = sum(r[k][-1:] == [eos] for r in theirs for k in completions)
    result["ours_prompts_starting_with_bos"] = sum(r["prompt_ids"][:1] == [bos] for r in ours)
    result["ours_completions_ending_with_eos"] = sum(r[k][-1:] == [eos] for r in ours for k in completions)
    return result


# ---------------------------------------------------------------------------------------------------------------
# report


def fmt(value, digits=6) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e5):
            return f"{value:.2e}"
        return f"{value:.{digits}g}"
    return str(value)


def markdown(report: dict) -> str:
    lines = ["# Our scripts against TRL", "",
             f"`{report['command']}` — {report['environment']['date']}, {report['run_seconds']:.0f} s in all. "
             f"TRL {report['environment']['trl']}, transformers {report['environment']['transformers']}, "
             f"torch {report['environment']['torch']}, {report['environment']['cpu_count']} CPU cores (load "
             f"{report['environment']['loadavg']} at the start), {report['args']['threads']} thread(s) per process. "
             "Method, tolerances and their reasons: the docstring of benchmarks/compare_trl.py.", "",
             "## Summary", "",
             "Tokens: fixed-batch + training-subset examples. Times: median seconds per optimiser step; the machine is "
             "shared, so read the ratio (same run, same machine), not the absolute times.", "",
             "| algorithm | TRL trainer | tokens identical | fixed-batch loss: ours / TRL / abs diff | all fixed-batch "
             "metrics | first-steps loss: max abs diff | s/step ours | s/step TRL | TRL / ours | peak RSS MiB ours / TRL |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    trainers = {"dpo": "DPOTrainer sigmoid", "ipo": "DPOTrainer ipo", "simpo": "CPOTrainer simpo", "kto": "KTOTrainer",
                "nash_md": "-"}
    for algo, r in report["algorithms"].items():
        if "skipped" in r:
            lines.append(f"| {algo} | {trainers[algo]} | skipped: {r['skipped']} | | | | | | | |")
            continue
        fb, tr, sp = r["fixed_batch"], r["training"], r["training"]["speed"]
        loss = next(x for x in fb["rows"] if x["metric"] == "loss")
        verdicts = [x["verdict"] for x in fb["rows"]]
        agree = "all within tolerance" if "DIFFERS" not in verdicts else "SOME DIFFER"
        if "by definition" in verdicts:
            agree += " (some by definition, see below)"
        tok, tok_train = fb["tokens"], tr["tokens"]
        same = tok["differing"] == 0 and tok_train["differing"] == 0
        lines.append(
            f"| {algo} | {trainers[algo]} | {'yes' if same else 'NO'} ({tok['examples']} + {tok_train['examples']}) | "
            f"{fmt(loss['ours'])} / {fmt(loss['trl'])} / {fmt(loss['abs_diff'])} | {agree} | {fmt(tr['max_abs_diff'])} "
            f"over {len(tr['steps'])} steps | {fmt(sp['ours']['median_step_s'], 3)} | {fmt(sp['trl']['median_step_s'], 3)} | "
            f"{sp['trl_over_ours_step_time']:.2f} | {sp['ours']['peak_rss_mb']:.0f} / {sp['trl']['peak_rss_mb']:.0f} |")
    conv = report.get("conversational_tokens")
    if conv:
        lines += ["", "## Tokens on the chat-template path", "",
                  f"data/pairs_conversational_test.jsonl through dpo.py and DPOTrainer: {conv['differing']} of "
                  f"{conv['examples']} examples tokenized differently. Prompts starting with BOS: ours "
                  f"{conv['ours_prompts_starting_with_bos']}, TRL {conv['trl_prompts_starting_with_bos']}; completions "
                  f"ending with EOS: ours {conv['ours_completions_ending_with_eos']}, TRL "
                  f"{conv['trl_completions_ending_with_eos']} (of {2 * conv['examples']}). " + report["conversational_note"]]
    for algo, r in report["algorithms"].items():
        lines += ["", f"## {algo}", ""]
        if "skipped" in r:
            lines.append(f"Skipped: {r['skipped']}.")
            continue
        fb, tr = r["fixed_batch"], r["training"]
        lines += [f"Hyperparameters (our script's defaults, passed to TRL): {r['hyperparameters']}.", "",
                  f"Tokens: {fb['tokens']['differing']} of {fb['tokens']['examples']} fixed-batch examples differ"
                  + (f"; first difference {fb['tokens']['first_difference']}" if fb['tokens']['first_difference'] else "")
                  + f"; training subset: {tr.get('tokens', {}).get('differing', '-')} of "
                  f"{tr.get('tokens', {}).get('examples', '-')} differ.", "",
                  f"Fixed batch ({fb['examples']} examples of the test split; policy: {fb['policy']}, reference: "
                  f"{fb['reference']}):",
                  "", "| metric | ours | TRL | abs diff | tolerance | verdict | note |", "|---|---|---|---|---|---|---|"]
        for x in fb["rows"]:
            lines.append(f"| {x['metric']} | {fmt(x['ours'])} | {fmt(x['trl'])} | {fmt(x['abs_diff'])} | {fmt(x['tol'])} | "
                         f"{x['verdict']} | {x['note']} |")
        if fb["only_in_trl"] or fb["only_in_ours"]:
            lines += ["", f"Logged by TRL only: {', '.join(fb['only_in_trl']) or '-'}; by ours only: "
                      f"{', '.join(fb['only_in_ours']) or '-'}."]
        if r.get("explanation"):
            lines += ["", r["explanation"]]
        sp = tr["speed"]
        lines += ["", f"First {len(tr['steps'])} training steps ({report['args']['batch_size']} examples each, same order, "
                  f"lr {report['args']['learning_rate']} constant; tolerance {STEP_ATOL}):"
                  + (" TRL gets each batch reversed, so that its KL pairs (x_i, y_i-1) are ours (x_i, y_i+1)."
                     if tr["kto_batches_reversed_for_trl"] else ""), "",
                  "| step | ours | TRL | abs diff | verdict |", "|---|---|---|---|---|"]
        for s in tr["steps"]:
            lines.append(f"| {s['step']} | {fmt(s['ours'])} | {fmt(s['trl'])} | {fmt(s['abs_diff'])} | {s['verdict']} |")
        lines += ["", "| | median s/step | mean s/step | timed steps | RSS after imports MiB | RSS after step 1 MiB | "
                  "peak RSS MiB | process wall s |", "|---|---|---|---|---|---|---|---|"]
        for side in ("ours", "trl"):
            s = sp[side]
            lines.append(f"| {side} | {s['median_step_s']:.4f} | {s['mean_step_s']:.4f} | {s['timed_steps']} | "
                         f"{s['rss_after_imports_mb']:.0f} | {s['rss_after_step_1_mb']:.0f} | {s['peak_rss_mb']:.0f} | "
                         f"{s['wall_s']:.1f} |")
        lines += ["", f"TRL / ours: step time {sp['trl_over_ours_step_time']:.2f}, "
                  f"peak RSS {sp['trl_over_ours_peak_rss']:.2f}."]
    return "\n".join(lines) + "\n"


def inputs_digest(args: Args) -> dict[str, str]:
    """sha256 (first 16 hex digits) of the model weights and data files compared, so that a result can be traced
    to the bundled task it was measured on."""
    import hashlib

    paths = [Path(args.model_dir) / "model.safetensors"] + [
        Path(args.data_dir) / f"{kind}_{split}.jsonl" for kind in ("pairs", "unpaired") for split in ("train", "test")
    ] + [Path(args.data_dir) / "pairs_conversational_test.jsonl"]
    return {str(path.relative_to(REPO) if path.is_relative_to(REPO) else path):
            hashlib.sha256(path.read_bytes()).hexdigest()[:16] for path in paths if path.is_file()}


def main(args: Args) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import torch
    import transformers
    import trl

    torch.set_num_threads(args.threads)
    quiet()
    unknown = [a for a in args.algos if a not in ALGOS]
    if unknown:
        raise ValueError(f"unknown algorithms {unknown}: choose from {ALGOS}")
    start = time.time()
    tmp = Path(tempfile.mkdtemp(prefix="compare_trl_"))
    report = {
        "command": " ".join(["python benchmarks/compare_trl.py"] + sys.argv[1:]),
        "args": asdict(args),
        "tolerances": {"fixed_batch": f"|ours - TRL| <= {FIXED_ATOL} + {FIXED_RTOL} * |TRL|", "first_steps": STEP_ATOL},
        "environment": {"date": time.strftime("%Y-%m-%d"), "trl": trl.__version__, "transformers": transformers.__version__,
                        "torch": torch.__version__, "python": platform.python_version(), "cpu_count": os.cpu_count(),
                        "loadavg": " ".join(f"{x:.1f}" for x in os.getloadavg())},
        "inputs_sha256": inputs_digest(args),
        "algorithms": {},
    }
    try:
        policy_dir = perturbed_policy(args.model_dir, tmp / "policy", args.perturb_scale, args.seed)
        report["conversational_tokens"] = conversational_tokens(args, tmp)
        report["conversational_note"] = (
            "TRL tokenizes a conversation with the chat template only (apply_chat_template, no special tokens added) and "
            "appends EOS to plain-string completions only, relying on the template to write BOS and EOS; the bundled "
            "template writes neither, so TRL's sequences lack both, while ours add BOS to the prompt and EOS to each "
            "completion exactly as for plain strings (the format the base model was trained on). The comparisons below "
            "use the plain-string files, on which both tokenize identically.")
        for algo in args.algos:
            print(f"{algo}:", flush=True)
            report["algorithms"][algo] = compare_algo(algo, args, tmp, policy_dir)
    finally:
        if args.keep_tmp:
            print(f"temporary files kept in {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    report["run_seconds"] = time.time() - start
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    text = markdown(report)
    (out / "compare.md").write_text(text)
    (out / "compare.json").write_text(json.dumps(report, indent=2) + "\n")
    print(text)
    print(f"written {out / 'compare.md'} and {out / 'compare.json'} in {report['run_seconds']:.0f} s")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "_worker":  # internal: one training process, see compare_training
        worker(sys.argv[2])
    else:
        main(tyro.cli(Args))
