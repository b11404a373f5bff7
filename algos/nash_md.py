"""Nash-MD: Nash learning from human feedback by mirror descent, in one file.

Paper: Munos, Valko, Calandriello, Azar, Rowland, Guo, Tang, Geist, Mesnard, Michi, Selvi, Girgin, Momchev,
Bachem, Mankowitz, Precup, Piot, "Nash Learning from Human Feedback", ICML 2024, arXiv:2312.00886.

Idea. A reward model assumes transitive preferences; a pairwise preference model P(y ≻ y' | x) does not
(rock beats scissors beats paper beats rock). NLHF looks for the policy that no other policy beats in the
regularised game P_τ(π ≻ π') = P(π ≻ π') - τ·KL(π‖μ) + τ·KL(π'‖μ), μ = π_ref: its unique Nash
equilibrium π*_τ. Nash-MD reaches it by mirror descent against a geometric mixture of the current policy
and the reference. Over a finite set of responses (`nash_md_tabular_step`):
    π_t^μ(y) ∝ π_t(y)^(1-ητ)·μ(y)^(ητ)          π_t+1(y) ∝ π_t^μ(y)·exp(η·P(y ≻ π_t^μ))
with η_t = 2/(τ(t+2)) the last iterate (not only the average) converges to π*_τ, the fixed point
π ∝ μ·exp(P(y ≻ π)/τ) (`nash_md_tabular`); with τ = 0 it cycles. For a language model (Nash-MD-PG, the
paper's section 7) each step samples y from π_θ and y' from the mixture, asks the preference model which is
better, and follows the gradient of P_τ(π_θ ≻ π') with π' held fixed: winners up, losers down, towards μ.

Loss. For a prompt x: y ~ π, and y' ~ π^β, the paper's "one-step-at-a-time regularised policy" with
β = --mixture-coef (TRL's mixture_coef), each token drawn from the normalised product
    π^β(y_t | x, y_<t) ∝ π(y_t | x, y_<t)^(1-β) · π_ref(y_t | x, y_<t)^β
logp(y) = Σ_t log π(y_t | x, y_<t) over the tokens of y (EOS included), ref(y) the same under the frozen
reference, P = P(y ≻ y' | x) from the preference model and τ = --tau (TRL calls it beta):
    loss = -(P - 1/2)·logp(y) + (τ/2)·(logp(y) - ref(y))²          averaged over the prompts
Its gradient, the samples held fixed, is -(P - 1/2 - τ·(logp(y) - ref(y)))·∇logp(y), a one-sample estimate
of -∇P_τ(π ≻ π'). The first term is REINFORCE on the preference with baseline 1/2, a tie (any constant
keeps it unbiased, as E_π[∇logp] = 0). The second is the "k2" estimator ½(log π/π_ref)² of the KL, whose
gradient on y ~ π, log(π/π_ref)(y)·∇logp(y), is an unbiased estimate of ∇KL(π‖π_ref) (both checked on a
softmax bandit in tests/test_nash_md.py). The logged KL is the "k1" estimate logp(y) - ref(y), unbiased.
With --reward-model-path, P = σ(r(x, y) - r(x, y')) instead (the Bradley-Terry link).

Run (from anywhere; the defaults point at the bundled task in benchmarks/arith/):
    python algos/nash_md.py                              # 1 process, CPU or one GPU
    torchrun --nproc_per_node 2 algos/nash_md.py --per-device-train-batch-size 16   # same global batch
    torchrun --nproc_per_node 2 algos/nash_md.py --fsdp --lora --fused-linear   # shard, adapters, no full logits
    python benchmarks/arith/evaluate.py runs/<run_name>  # held-out accuracy of the saved policy
    python algos/nash_md.py --model-name-or-path Qwen/Qwen2-0.5B-Instruct \\
        --dataset-name trl-lib/ultrafeedback-prompt --reward-model-path trl-lib/Qwen2-0.5B-Reward \\
        --tau 0.05 --mixture-coef 0.125 --learning-rate 5e-7 --max-new-tokens 256 \\
        --per-device-train-batch-size 4 --gradient-accumulation-steps 8 --num-train-epochs 1 \\
        --max-length 1024 --bf16 --gradient-checkpointing --eval-steps 500 --logging-steps 10

Deviations from the paper (and from TRL's NashMDTrainer, which we read alongside):
1. The opponent plays the token-level mixture above, as in the paper's experiments and TRL, not the
   sequence-level geometric mixture of the tabular theory: that one's next-token conditionals need sums
   over all continuations. Mixing logits (TRL) or log-probs (here) is the same after normalising.
   --temperature divides the mixed log-probs, for y and y' alike; the estimate is on-policy only at 1.
2. The KL gradient weights every token of y by the whole completion's log-ratio, the gradient of a true
   loss (pinned by finite differences in the golden tests). The paper allows the reward-to-go refinement
   (token n weighted by the log-ratios of tokens >= n: unbiased too, less variance); TRL weights each
   token by its own log-ratio only, which is biased for the sequence-level KL.
3. The preference model is read in both orders and symmetrised, P(y ≻ y') = σ((l(x, y, y') - l(x, y', y))/2)
   from its log-odds l, so that P(y ≻ y') + P(y' ≻ y) = 1 exactly; identical completions get exactly 1/2.
   It equals σ(l(x, y, y')) for an antisymmetric model; TRL asks its judge once. The judge reads the whole
   prompt text even when --max-prompt-length cut the policy's.
4. Completions that reach --max-new-tokens (or --max-length) without EOS are judged as they are, with no
   penalty (TRL has an optional missing_eos_penalty for reward models); their share is logged.
5. Optimiser: AdamW with linear warm-up then linear decay (TRL's default). The reference μ is the model we
   start from, already trained on the task (the paper starts from an SFT model too).
6. Each completion draws its sampling noise (Gumbel-max) from its own generator seeded by (seed, step,
   example, y or y'): a sample does not depend on the rest of its batch, so one process and torchrun
   train on the same samples. Evaluation uses "step 0": the same noise at every evaluation.
7. In-script evaluation plays the policy against the reference (β = 1) under the same learned preference
   model, so it measures what the judge thinks; benchmarks/arith/evaluate.py measures the truth.

Defaults: chosen for the bundled task by a small sweep with a trial preference model (built like the bundled
one with longer stages: agreement 0.865 against 0.78), then run with the bundled one: one process, seed 1,
`python benchmarks/arith/evaluate.py` (256 held-out prompts; sampled = 8 samples each at temperature 1). The
base model: greedy 0.602, sampled 0.319. One epoch, 93 steps of 32 prompts; times with another run on the CPU:
    flags                                      greedy  sampled  KL    time
    (defaults: lr 3e-4, τ 0.1, β 0.125)        0.645   0.417    0.39  162 s   the bundled judge
    (defaults)                                 0.672   0.426    0.48  133 s   the trial judge, as below
    --learning-rate 2e-4                       0.676   0.412    0.29  214 s
    --learning-rate 5e-4                       0.621   0.417    0.62  169 s
    --tau 0.05                                 0.652   0.438    0.59  138 s
    --tau 0.2                                  0.680   0.393    0.30  143 s
    --learning-rate 2e-5 (TRL-like; the earlier default)  0.594  0.320  0.00  136 s   a judge at chance
The gain (+10 points sampled) is what the judge allows: the policy learns what the preference model prefers, and
that model agrees with the verifier on 78% of held-out pairs, so it also rewards some wrong solutions; DPO on the
verifier's own pairs gains +16. The in-script `eval/rewards/probabilities` (0.555 against the reference) measures
the judge's view, evaluate.py the truth.

Logged metrics (TRL's names where they exist; `train/` every `--logging-steps` steps, averaged over the
prompts seen since the last log and over all processes; `eval/` over the whole held-out split, where the
opponent y' is sampled from the reference instead of the mixture, β = 1):
    loss                 the loss above (its value is not the objective: read the metrics below)
    loss/kl              mean logp(y) - ref(y), the k1 estimate of KL(π‖π_ref)
    objective/entropy    mean -logp(y), the Monte Carlo entropy of π over completions
    rewards/probabilities  mean P(y ≻ y'): the expected win rate of π against the mixture (eval: the reference)
    rewards/win_rate     fraction of prompts where P(y ≻ y') > 1/2, a tie (P = 1/2) counting one half
    rewards/policy, rewards/opponent   with a reward model only: mean r(x, y) and r(x, y')
    completions/length, completions/opponent_length   mean tokens of y and y' (EOS excluded)
    completions/clipped_ratio, completions/opponent_clipped_ratio   share of y and y' cut without EOS
    learning_rate, grad_norm (before clipping), epoch
Everything goes to TensorBoard under runs/<run_name>/ (and W&B with --track), to runs/<run_name>/
metrics.jsonl (one JSON object per logged step), to the progress bar, and into a final summary line.
At each logging step a few sampled (prompt, y, y', P) go to TensorBoard's text tab and to
runs/<run_name>/completions.jsonl.
The trained model (with --lora: the adapter) and tokenizer are saved with save_pretrained into the same directory.
"""

import itertools
import json
import os
import random
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from typing import Literal

import datasets
import numpy as np
import torch
import torch.distributed as dist
import transformers
import tyro
from datasets import Dataset, load_dataset
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, get_scheduler

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # `kernels` lives at the repository root, next to algos/
from kernels import linear_logprobs, logprobs  # noqa: E402


@dataclass
class Args:
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment, part of the run name"""
    seed: int = 1
    """seed of python, numpy, torch and the data order"""
    torch_deterministic: bool = True
    """if toggled, `torch.use_deterministic_algorithms`: same seed, same machine, same numbers"""
    cuda: bool = True
    """if toggled, use CUDA when it is available"""
    threads: int | None = 1
    """torch CPU threads; 1 is fastest for the bundled tiny model (None: torch's default, all cores)"""
    track: bool = False
    """if toggled, also log to Weights & Biases"""
    wandb_project_name: str = "preference-algos"
    """the W&B project"""
    wandb_entity: str | None = None
    """the W&B entity (team)"""
    output_dir: str | None = None
    """where logs, metrics.jsonl and the trained model go; default runs/<run_name>"""

    model_name_or_path: str = os.path.join(REPO, "benchmarks/arith/model")
    """the policy to train and the frozen reference: a hub id or a local directory"""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """dtype of the weights (and AdamW state); keep float32 and use --bf16 for mixed precision"""
    bf16: bool = False
    """if toggled, run forward passes under bfloat16 autocast (GPU)"""
    gradient_checkpointing: bool = False
    """if toggled, recompute activations in the backward pass to save memory"""
    fsdp: bool = False
    """if toggled, shard the policy and the reference over the processes with FSDP2 (each decoder layer, then
    the root) instead of replicating them with DDP; needs torchrun (--nproc_per_node 1 for one process)"""
    lora: bool = False
    """if toggled, train LoRA adapters (peft) instead of all weights; the reference is then the base model
    with the adapters disabled (no second copy), and the adapter is what gets saved"""
    lora_r: int = 16
    """the rank of the LoRA updates"""
    lora_alpha: int = 32
    """LoRA's scale numerator: the updates are scaled by lora_alpha / lora_r"""
    lora_dropout: float = 0.0
    """dropout on the input of the LoRA updates"""
    lora_target_modules: tuple[str, ...] = ("all-linear",)
    """the module names that get adapters (e.g. q_proj v_proj), or all-linear: every linear layer but lm_head"""
    fused_linear: bool = False
    """if toggled, get the log-probs from the last hidden states and lm_head's weight chunk by chunk
    (kernels.linear_logprobs), never holding the full logits: less memory for large vocabularies"""

    dataset_name: str = os.path.join(REPO, "benchmarks/arith/data/prompts_{split}.jsonl")
    """a hub id or a local .json/.jsonl/.parquet file; `{split}` in a file name is replaced by the split
    (a local file without it has only a training split, so no evaluation)"""
    dataset_config: str | None = None
    """the hub dataset's configuration name, if it has several"""
    dataset_train_split: str = "train"
    """the split to train on"""
    dataset_test_split: str | None = "test"
    """the split to evaluate on; None to skip evaluation"""
    max_length: int = 1024
    """maximum tokens of prompt + completion; sampling stops there even before --max-new-tokens"""
    max_prompt_length: int = 512
    """maximum tokens of the prompt, cut according to --truncation-mode"""
    truncation_mode: Literal["keep_end", "keep_start"] = "keep_end"
    """which part of a too-long prompt to keep: its end (next to the completion) or its start"""

    learning_rate: float = 3e-4
    """AdamW learning rate after warm-up"""
    lr_scheduler_type: Literal["linear", "cosine", "constant_with_warmup"] = "linear"
    """the learning-rate schedule after warm-up"""
    warmup_ratio: float = 0.1
    """fraction of the optimiser steps spent warming the learning rate up linearly from 0"""
    max_grad_norm: float = 1.0
    """clip the global gradient norm to this (inf: no clipping)"""
    per_device_train_batch_size: int = 32
    """prompts per process per micro-batch; global batch = this x processes x accumulation steps"""
    gradient_accumulation_steps: int = 1
    """micro-batches accumulated into one optimiser step"""
    per_device_eval_batch_size: int = 64
    """prompts per process per evaluation batch"""
    num_train_epochs: int = 1
    """passes over the training split (ignored when --max-steps is set)"""
    max_steps: int | None = None
    """if set, train for exactly this many optimiser steps"""
    logging_steps: int = 10
    """log training metrics every this many optimiser steps"""
    eval_steps: int = 100
    """evaluate every this many optimiser steps (0: only at the end)"""

    tau: float = 0.1
    """τ, the strength of the KL(π‖π_ref) regulariser (TRL calls it beta)"""
    mixture_coef: float = 0.125
    """β, the reference's weight in the geometric mixture the opponent y' is sampled from (0: self-play)"""
    temperature: float = 1.0
    """sampling temperature of y and y' (1: on-policy, as the policy gradient assumes)"""
    max_new_tokens: int = 72
    """the most tokens sampled per completion, EOS included"""
    preference_model_path: str | None = os.path.join(REPO, "benchmarks/arith/preference_model")
    """a pairwise preference model (sequence classifier, one output: the log-odds that a beats b)"""
    preference_template: str = "{prompt}[1]\n{a}\n[2]\n{b}\n"
    """the text the preference model reads for prompt, a and b (its tokenizer adds its special tokens)"""
    reward_model_path: str | None = None
    """if set, judge with this reward model (one output, read on prompt + completion) through
    Bradley-Terry, instead of the preference model"""
    num_logged_completions: int = 2
    """sampled (prompt, y, y', P) written to the logs at each logging step"""


def nash_md_tabular_step(
    policy: torch.Tensor, reference: torch.Tensor, preference: torch.Tensor, eta: float, tau: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """One step of tabular Nash-MD over K responses, and the mixture it played against.

    policy π_t and reference μ are (K,) probability vectors, preference the (K, K) matrix of
    P(y_i ≻ y_j) (P + Pᵀ = 1). With P(y ≻ π) = Σ_y' P(y ≻ y')·π(y'):
        π_t^μ(y) ∝ π_t(y)^(1-ητ) · μ(y)^(ητ)                  (the normalised geometric mixture)
        π_t+1(y) ∝ π_t^μ(y) · exp(η · P(y ≻ π_t^μ))           (mirror descent against it)
    returns (π_t+1, π_t^μ), each (K,). Requires 0 <= ητ <= 1; a zero probability stays zero
    (0^0 = 1, so ητ = 1 plays μ whatever the support of π_t).
    """
    if not 0 <= eta * tau <= 1:
        raise ValueError(f"η·τ = {eta * tau}: the mixture weight η·τ must lie in [0, 1]; lower the step size η")
    mixture = torch.softmax(torch.xlogy(1 - eta * tau, policy) + torch.xlogy(eta * tau, reference), dim=-1)
    next_policy = torch.softmax(mixture.log() + eta * (preference @ mixture), dim=-1)
    return next_policy, mixture


def nash_md_tabular(preference: torch.Tensor, reference: torch.Tensor, tau: float, num_steps: int,
                    policy: torch.Tensor | None = None) -> torch.Tensor:
    """The last iterate of `num_steps` tabular Nash-MD steps from `policy` (default: the reference) with
    the paper's step sizes η_t = 2/(τ(t + 2)), t = 0, 1, ...: it converges to the regularised Nash
    equilibrium π ∝ μ·exp(P(y ≻ π)/τ) (Munos et al. 2023, Theorem 1). Requires τ > 0."""
    if tau <= 0:
        raise ValueError(f"--tau {tau}: the step sizes 2/(τ(t + 2)) need τ > 0 (at τ = 0 Nash-MD cycles)")
    policy = reference if policy is None else policy
    for t in range(num_steps):
        policy, _ = nash_md_tabular_step(policy, reference, preference, 2 / (tau * (t + 2)), tau)
    return policy


def geometric_mixture(
    policy_logits: torch.Tensor | None, reference_logits: torch.Tensor | None, mixture_coef: float | torch.Tensor,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Next-token log-probs of the token-level geometric mixture of policy and reference.

    (..., V) logits of each model at the same position, and β the mixture coefficient (a number, or a
    tensor broadcasting against (..., 1): one β per row); a model may be None where its weight is 0 on
    every row. With T the temperature:
        log π^β(·) = log_softmax(((1 - β)·log_softmax(policy_logits) + β·log_softmax(reference_logits)) / T)
    β = 0 is the policy at temperature T, β = 1 the reference at temperature T.
    """
    mixed = 0
    if policy_logits is not None:
        mixed = mixed + (1 - mixture_coef) * policy_logits.log_softmax(-1)
    if reference_logits is not None:
        mixed = mixed + mixture_coef * reference_logits.log_softmax(-1)
    return (mixed / temperature).log_softmax(-1)


def nash_md_loss(
    policy_logps: torch.Tensor,
    reference_logps: torch.Tensor,
    probabilities: torch.Tensor,
    tau: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The Nash-MD policy-gradient loss of each sampled completion, and its KL estimate.

    Inputs are (B,): logp(y) and ref(y), sums of completion-token log-probs of y ~ π under the policy and
    the reference, and P(y ≻ y') against the opponent y' ~ mixture. With
        loss = -(P(y ≻ y') - 1/2)·logp(y) + (τ/2)·(logp(y) - ref(y))²
    the gradient with respect to logp(y) is -(P - 1/2 - τ·(logp(y) - ref(y))): the paper's Nash-MD-PG
    estimate times ∇logp(y). Returns (losses, kl), each (B,): the per-completion losses (differentiable)
    and logp(y) - ref(y) (detached), the k1 estimate of KL(π‖π_ref).
    """
    log_ratios = policy_logps - reference_logps
    losses = -(probabilities - 0.5) * policy_logps + tau / 2 * log_ratios**2
    return losses, log_ratios.detach()


def load_splits(name: str, config: str | None, train_split: str, test_split: str | None):
    """(train, test or None): splits of a hub dataset, or local .json/.jsonl/.parquet files where `{split}`
    in the name is replaced by the split (a file name without it is the training data only: no test)."""
    extension = os.path.splitext(name)[1]
    if extension not in (".json", ".jsonl", ".parquet"):
        test = load_dataset(name, config, split=test_split) if test_split else None
        return load_dataset(name, config, split=train_split), test

    def load_file(split):
        path = name.replace("{split}", split)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no dataset file {path} (--dataset-name {name}, split {split})")
        return load_dataset("parquet" if extension == ".parquet" else "json", data_files=path, split="train")

    return load_file(train_split), (load_file(test_split) if test_split and "{split}" in name else None)


def is_conversational(value) -> bool:
    """TRL's conversational format: a list of {"role": ..., "content": ...} messages."""
    return isinstance(value, list) and len(value) > 0 and isinstance(value[0], dict) and "role" in value[0]


def apply_chat_template(tokenizer, prompt: list, completions: list[list]) -> tuple[str, list[str]]:
    """Render a conversational prompt with the generation prompt, and each completion as the rendered
    prompt + completion conversation minus the rendered prompt."""
    if tokenizer.chat_template is None:
        raise ValueError("the dataset is conversational (lists of messages) but the tokenizer has no chat "
                         "template: set tokenizer.chat_template, or use a dataset of plain strings")
    prompt_text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    texts = []
    for completion in completions:
        if not is_conversational(completion):
            raise ValueError("the prompt is a list of messages but a completion is not: use one format")
        text = tokenizer.apply_chat_template(prompt + completion, tokenize=False)
        if not text.startswith(prompt_text):
            raise ValueError(f"the chat template does not render the prompt {prompt_text!r} as a prefix of "
                             f"prompt + completion {text!r}, so the completion cannot be cut out")
        texts.append(text[len(prompt_text) :])
    return prompt_text, texts


def tokenize_prompt(tokenizer, text: str) -> list[int]:
    """Prompt token ids, starting with BOS (once) when the tokenizer has one."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if tokenizer.bos_token_id is not None and ids[:1] != [tokenizer.bos_token_id]:
        ids = [tokenizer.bos_token_id] + ids
    if not ids:
        raise ValueError("the prompt is empty and the tokenizer has no BOS: nothing to predict the completion from")
    return ids


def truncate(prompt_ids: list[int], completions_ids: list[list[int]], max_length, max_prompt_length, truncation_mode):
    """Cut the prompt to max_prompt_length tokens (keep_end keeps its end, keep_start its start), then each
    completion at its end to fit max_length. Raises if not even one completion token fits."""
    if len(prompt_ids) > max_prompt_length:
        keep_end = truncation_mode == "keep_end"
        prompt_ids = prompt_ids[-max_prompt_length:] if keep_end else prompt_ids[:max_prompt_length]
    room = max_length - len(prompt_ids)
    if room < 1:
        raise ValueError(f"the prompt takes {len(prompt_ids)} tokens, which leaves no room for the completion "
                         f"within --max-length {max_length}: lower --max-prompt-length or raise --max-length")
    return prompt_ids, [ids[:room] for ids in completions_ids]


def tokenize_row(example: dict, tokenizer, max_length, max_prompt_length, truncation_mode) -> dict:
    """A prompt-only example, standard or conversational -> the prompt's token ids, and its text for the judge."""
    prompt = example["prompt"]
    if is_conversational(prompt):
        prompt, _ = apply_chat_template(tokenizer, prompt, [])
    prompt_ids = tokenize_prompt(tokenizer, prompt)
    length = len(prompt_ids)
    prompt_ids, _ = truncate(prompt_ids, [], max_length, max_prompt_length, truncation_mode)
    return {"prompt_ids": prompt_ids, "prompt_text": prompt, "truncated": len(prompt_ids) != length}


def prepare_dataset(dataset: Dataset, tokenizer, vocab_size: int, args: Args, name="the dataset") -> list[dict]:
    """Check a prompt-only dataset and tokenize it into a list of `tokenize_row` rows, each with its index."""
    columns = ["prompt"]
    missing = [column for column in columns if column not in dataset.column_names]
    if missing:
        raise ValueError(f"{name} lacks the column(s) {missing}: it has {dataset.column_names}, and Nash-MD needs "
                         f"{columns} (TRL's prompt-only format, as strings or lists of messages; the completions "
                         "are sampled during training): rename the column")
    if len(dataset) == 0:
        raise ValueError(f"{name} is empty: check --dataset-name and the split")
    rows = []
    for i, example in enumerate(dataset):
        try:
            row = tokenize_row(example, tokenizer, args.max_length, args.max_prompt_length, args.truncation_mode)
        except ValueError as error:
            raise ValueError(f"{name}, example {i}: {error}") from error
        top = max(row["prompt_ids"])
        if top >= vocab_size:
            raise ValueError(f"{name}, example {i}: token id {top} is outside the model's vocabulary of "
                             f"{vocab_size}: the tokenizer does not belong to the model")
        rows.append({**row, "index": i})
    return rows


def collate(rows: list[dict], completions: list[list[int]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """B rows and their sampled completions -> B right-padded sequences: input_ids, attention_mask, labels
    (B, T), labels being the input ids on completion tokens and -100 on prompt and padding."""
    sequences, labels = [], []
    for row, completion in zip(rows, completions):
        sequences.append(row["prompt_ids"] + completion)
        labels.append([-100] * len(row["prompt_ids"]) + completion)
    length = max(map(len, sequences))
    return {
        "input_ids": torch.tensor([s + [pad_token_id] * (length - len(s)) for s in sequences]),
        "attention_mask": torch.tensor([[1] * len(s) + [0] * (length - len(s)) for s in sequences]),
        "labels": torch.tensor([s + [-100] * (length - len(s)) for s in labels]),
    }


def forward_logits(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, fused_linear: bool = False):
    """The (N, T, V) logits of a forward pass; with fused_linear instead the pair (last hidden states (N, T, H),
    lm_head weight (V, H)), which `shifted_logprobs` projects chunk by chunk. Both go through the model's own
    forward (with no logits to keep), so that DDP syncs the gradients and FSDP gathers the parameters."""
    if not fused_linear:
        return model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    no_logits = torch.empty(0, dtype=torch.long, device=input_ids.device)
    output = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, output_hidden_states=True,
                   logits_to_keep=no_logits)
    return output.hidden_states[-1], (model.module if isinstance(model, DDP) else model).get_output_embeddings().weight


def shifted_logprobs(logits, labels: torch.Tensor) -> torch.Tensor:
    """(N, T-1) float32 log π(y_t | x, y_<t) of each label: the logits at position t predict token t + 1.
    `logits` as `forward_logits` returns them: a tensor, or (hidden, weight) for kernels.linear_logprobs."""
    if isinstance(logits, tuple):
        hidden, weight = logits
        return linear_logprobs(hidden[:, :-1], weight, labels[:, 1:])
    return logprobs(logits[:, :-1], labels[:, 1:])


def batch_logps(logits, labels: torch.Tensor) -> torch.Tensor:
    """(N,) float32 sums of log π(y_t | x, y_<t) over the completion tokens. The logits at position t
    predict token t + 1, hence the shift; labels are -100 on prompt and padding, which count 0."""
    return shifted_logprobs(logits, labels).sum(-1)


def completion_logps(model, batch: dict, fused_linear: bool = False) -> torch.Tensor:
    """The (B,) completion log-probs of the sequences of a `collate` batch, in one forward pass."""
    logits = forward_logits(model, batch["input_ids"], batch["attention_mask"], fused_linear)
    return batch_logps(logits, batch["labels"])


def row_generators(seed: int, step: int, indices: list[int], stream: int) -> list[torch.Generator]:
    """One CPU generator per row, seeded by (seed, step, example index, stream): a sample's noise depends
    on nothing else, so a prompt gets the same sample in any batch on any number of processes."""
    keys = [((seed * 1_000_003 + step) * 1_000_003 + index) * 2 + stream for index in indices]
    return [torch.Generator().manual_seed(key % 2**63) for key in keys]


@torch.no_grad()
def sample_completions(policy, ref_model, prompts: list[list[int]], budgets: list[int], mixture_coefs: list[float],
                       temperature: float, generators: list[torch.Generator], pad_token_id: int,
                       eos_token_id: int, sync_ranks: bool = False) -> list[list[int]]:
    """One completion per prompt from the token-level geometric mixture with that row's β (`geometric_mixture`;
    β = 0: the policy alone, β = 1: the reference alone). Each model runs, with its own KV cache, only on the
    rows that give it a weight; the policy runs in eval mode.

    Prompts are left-padded. Completion i ends with its first EOS (kept) or after budgets[i] tokens.
    Row i draws its Gumbel noise from generators[i] alone: argmax(log π^β + Gumbel) is a sample of π^β.
    With sync_ranks every process goes on until all processes are done.
    """
    device = next(policy.parameters()).device
    width = max(map(len, prompts))
    input_ids = torch.tensor([[pad_token_id] * (width - len(p)) + p for p in prompts], device=device)
    attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    mixture_coef = torch.tensor(mixture_coefs, device=device)[:, None]
    players = {"policy": (policy, (mixture_coef[:, 0] < 1).nonzero()[:, 0]),
               "reference": (ref_model, (mixture_coef[:, 0] > 0).nonzero()[:, 0])}
    players = {name: (player, rows) for name, (player, rows) in players.items() if len(rows) > 0}
    caches = dict.fromkeys(players)
    completions, done = [[] for _ in prompts], [False] * len(prompts)
    was_training = policy.training
    policy.eval()
    while True:  # at most max(budgets) tokens: row i is done after budgets[i]
        logits = {"policy": None, "reference": None}
        for name, (player, rows) in players.items():
            output = player(input_ids=input_ids[rows], attention_mask=attention_mask[rows],
                            position_ids=position_ids[rows], cache=caches[name], use_cache=True, logits_to_keep=1)
            caches[name] = output.cache
            row_logits = output.logits[:, -1].float()  # the other rows get zeros, which weigh 0 there
            logits[name] = row_logits.new_zeros(len(prompts), row_logits.shape[-1]).index_copy(0, rows, row_logits)
        logps = geometric_mixture(logits["policy"], logits["reference"], mixture_coef, temperature)
        uniform = torch.stack([torch.rand(logps.shape[-1], generator=g, dtype=torch.float64) for g in generators])
        tokens = (logps - (-uniform.log()).log().to(device)).argmax(-1)
        for i, token in enumerate(tokens.tolist()):
            if not done[i]:
                completions[i].append(token)
                done[i] = token == eos_token_id or len(completions[i]) == budgets[i]
        remaining = done.count(False)
        if sync_ranks:  # FSDP's forward passes are collective: go on while any process has rows left
            remaining = torch.tensor(remaining, device=device)
            dist.all_reduce(remaining)
        if remaining == 0:
            break
        input_ids = tokens[:, None]
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(len(prompts), 1)], dim=1)
        position_ids = position_ids[:, -1:] + 1
    policy.train(was_training)
    return completions


@torch.no_grad()
def preference_probabilities(judge, prompts: list[str], completions: list[str], opponents: list[str], args: Args):
    """(P, scores, opponent_scores), each (B,): P(y ≻ y') for each prompt x, completion y and opponent y'.

    judge = (model, tokenizer), a sequence classifier with one output. A preference model reads
    --preference-template in both orders and P(y ≻ y') = σ((l(x, y, y') - l(x, y', y)) / 2), so that
    P(y ≻ y') + P(y' ≻ y) = 1; a reward model (--reward-model-path) reads x + y and x + y', and
    P(y ≻ y') = σ(r(x, y) - r(x, y')). Identical completions get exactly 1/2. The scores are l(x, y, y')
    and l(x, y', y), or r(x, y) and r(x, y').
    """
    model, tokenizer = judge
    if args.reward_model_path is not None:
        texts = [x + y for x, y in zip(prompts + prompts, completions + opponents)]
    else:
        texts = [args.preference_template.format(prompt=x, a=a, b=b)
                 for x, a, b in zip(prompts + prompts, completions + opponents, opponents + completions)]
    encoded = tokenizer(texts, padding=True, return_tensors="pt").to(next(model.parameters()).device)
    scores, opponent_scores = model(**encoded).logits[:, 0].float().chunk(2)
    margins = scores - opponent_scores
    probabilities = torch.sigmoid(margins if args.reward_model_path is not None else margins / 2)
    identical = torch.tensor([y == z for y, z in zip(completions, opponents)], device=probabilities.device)
    return probabilities.masked_fill(identical, 0.5), scores, opponent_scores


def compute_loss(model, ref_model, judge, tokenizer, rows: list[dict], step: int, args: Args, pad_token_id: int,
                 mixture_coef: float):
    """One round on a micro-batch of prompts: y ~ π, y' ~ π^β (β = mixture_coef), P(y ≻ y') from the judge.
    Returns the mean loss, the sums over its prompts of the logged metrics, and the first
    --num-logged-completions (prompt, y, y', P)."""
    policy = model.module if isinstance(model, DDP) else model
    device = next(policy.parameters()).device
    prompts = [row["prompt_ids"] for row in rows]
    budgets = [min(args.max_new_tokens, args.max_length - len(ids)) for ids in prompts]
    indices = [row["index"] for row in rows]
    generators = row_generators(args.seed, step, indices, 0) + row_generators(args.seed, step, indices, 1)
    sampled = sample_completions(policy, ref_model, prompts + prompts, budgets + budgets,
                                 [0.0] * len(rows) + [mixture_coef] * len(rows), args.temperature, generators,
                                 pad_token_id, tokenizer.eos_token_id, args.fsdp)  # y and y' in one batch
    completions, opponents = sampled[: len(rows)], sampled[len(rows) :]
    prompt_texts = [row["prompt_text"] for row in rows]
    texts, opponent_texts = ([tokenizer.decode(ids, skip_special_tokens=True) for ids in side]
                             for side in (completions, opponents))
    probabilities, scores, opponent_scores = preference_probabilities(judge, prompt_texts, texts, opponent_texts, args)
    batch = {k: v.to(device) for k, v in collate(rows, completions, pad_token_id).items()}
    policy_logps = completion_logps(model, batch, args.fused_linear)
    with torch.no_grad():
        reference_logps = completion_logps(ref_model, batch, args.fused_linear)
    losses, kl = nash_md_loss(policy_logps, reference_logps, probabilities, args.tau)

    def total(values) -> torch.Tensor:
        return torch.tensor(float(sum(values)), device=device)

    def length(ids: list[int]) -> int:
        return len(ids) - (ids[-1] == tokenizer.eos_token_id)

    metrics = {
        "loss": losses.detach().sum(),
        "loss/kl": kl.sum(),
        "objective/entropy": -policy_logps.detach().sum(),
        "rewards/probabilities": probabilities.sum(),
        "rewards/win_rate": ((probabilities > 0.5).float() + 0.5 * (probabilities == 0.5).float()).sum(),
        "completions/length": total(map(length, completions)),
        "completions/opponent_length": total(map(length, opponents)),
        "completions/clipped_ratio": total(ids[-1] != tokenizer.eos_token_id for ids in completions),
        "completions/opponent_clipped_ratio": total(ids[-1] != tokenizer.eos_token_id for ids in opponents),
    }
    if args.reward_model_path is not None:
        metrics.update({"rewards/policy": scores.sum(), "rewards/opponent": opponent_scores.sum()})
    logged = zip(prompt_texts, texts, opponent_texts, probabilities.tolist())
    samples = [dict(zip(("prompt", "completion", "opponent", "probability"), sample)) for sample in logged]
    return losses.mean(), metrics, samples[: args.num_logged_completions]


def global_batches(num_rows: int, global_batch_size: int, seed: int):
    """Endless row indices of global batches: a seeded permutation per epoch, its last partial batch dropped."""
    for epoch in itertools.count():
        order = torch.randperm(num_rows, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
        for start in range(0, num_rows - global_batch_size + 1, global_batch_size):
            yield order[start : start + global_batch_size]


def mean_over_ranks(sums: dict[str, torch.Tensor], count: torch.Tensor) -> dict[str, float]:
    """Metric sums divided by the number of prompts, both summed over all processes."""
    keys = sorted(sums)
    totals = torch.stack([sums[key] for key in keys] + [count]).float()
    if dist.is_initialized():
        dist.all_reduce(totals)
    return {key: (totals[i] / totals[-1]).item() for i, key in enumerate(keys)}


@torch.no_grad()
def evaluate(policy, ref_model, judge, tokenizer, rows: list[dict], args: Args, pad_token_id, device,
             autocast) -> dict[str, float]:
    """eval/ metrics over all rows, each process taking every world_size-th row: the policy against the
    reference (β = 1), with the noise of step 0, the same at every evaluation."""
    policy.eval()
    sums, count = {}, torch.zeros((), device=device)
    rank, world_size = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    mine = rows[rank::world_size]
    for start in range(0, len(mine), args.per_device_eval_batch_size):
        chunk = mine[start : start + args.per_device_eval_batch_size]
        with autocast:
            _, metrics, _ = compute_loss(policy, ref_model, judge, tokenizer, chunk, 0, args, pad_token_id, 1.0)
        sums = {k: sums.get(k, 0) + v for k, v in metrics.items()}
        count += len(chunk)
    policy.train()
    return {f"eval/{k}": v for k, v in mean_over_ranks(sums, count).items()}


def check_args(args: Args, tokenizer) -> None:
    """Nash-MD's own arguments: ValueErrors that name the problem and the fix."""
    if not 0 <= args.mixture_coef <= 1:
        raise ValueError(f"--mixture-coef {args.mixture_coef}: β is the reference's weight in the mixture, in [0, 1]")
    if args.temperature <= 0:
        raise ValueError(f"--temperature {args.temperature}: sampling needs a positive temperature (1 is on-policy)")
    if args.tau < 0:
        raise ValueError(f"--tau {args.tau}: the KL regulariser's strength τ cannot be negative (0 switches it off)")
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens {args.max_new_tokens}: a completion needs at least one token")
    if args.preference_model_path is None and args.reward_model_path is None:
        raise ValueError("no judge: set --preference-model-path (a pairwise preference model) or "
                         "--reward-model-path (a reward model, used through Bradley-Terry)")
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no EOS token, so sampled completions cannot end: set tokenizer.eos_token")


def load_judge(args: Args, dtype: torch.dtype, device) -> tuple:
    """(model, tokenizer) of the reward model if --reward-model-path is set, else of the preference model:
    a frozen sequence classifier with one output, in eval mode."""
    path = args.reward_model_path if args.reward_model_path is not None else args.preference_model_path
    model = AutoModelForSequenceClassification.from_pretrained(path, dtype=dtype).to(device)
    model.eval().requires_grad_(False)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if model.config.num_labels != 1:
        raise ValueError(f"the judge {path} has {model.config.num_labels} outputs; it needs one (a log-odds or "
                         "a reward): train it with num_labels=1")
    if tokenizer.pad_token_id is None:
        raise ValueError(f"the judge {path} has no pad token, so it cannot score a padded batch: set its "
                         "tokenizer's pad_token")
    model.config.pad_token_id = tokenizer.pad_token_id  # where the classifier looks for each text's last token
    return model, tokenizer


class AdaptersDisabled:
    """The reference of a --lora run: the policy called with its adapters disabled (and in eval mode), i.e. the
    base model, without a second copy of its weights. Other attributes are the policy's."""

    def __init__(self, model):
        self.model = model

    def __call__(self, **kwargs):
        training = self.model.training
        self.model.eval()
        with self.model.disable_adapter():
            output = self.model(**kwargs)
        self.model.train(training)
        return output

    def __getattr__(self, name):
        return getattr(self.model, name)


def lora_target_modules(names: tuple[str, ...]) -> str | list[str]:
    """--lora-target-modules for peft: "all-linear" is peft's shorthand only as a plain string."""
    return "all-linear" if names == ("all-linear",) else list(names)


@torch.no_grad()
def check_fused_linear(model, device) -> None:
    """--fused-linear computes the logits as hidden @ lm_head.weight.T: raise unless the model's own forward does
    just that (no bias, no adapter on lm_head, no logit scaling or soft-capping), checked on a few tokens."""
    head = model.get_output_embeddings()
    input_ids = torch.arange(8, device=device)[None] % head.weight.shape[0]
    attention_mask = torch.ones_like(input_ids)
    logits = forward_logits(model, input_ids, attention_mask)
    hidden, weight = forward_logits(model, input_ids, attention_mask, fused_linear=True)
    plain = type(head) is torch.nn.Linear and head.bias is None
    if not plain or getattr(model.config, "final_logit_softcapping", None) or not torch.allclose(
        hidden @ weight.T, logits, rtol=1e-3, atol=1e-4
    ):
        raise ValueError(f"--fused-linear: the logits of {type(model).__name__} are not its last hidden states "
                         "times lm_head.weight (a bias, an adapter on lm_head, logit scaling or soft-capping)")


def shard(model) -> None:
    """FSDP2: shard each decoder layer (the classes the model lists in `_no_split_modules`), innermost first, then
    the rest at the root, so that a layer's full parameters exist only while it runs."""
    if not model._no_split_modules:
        raise ValueError(f"--fsdp: {type(model).__name__} lists no decoder layer classes (_no_split_modules)")
    for module in reversed(list(model.modules())):
        if type(module).__name__ in model._no_split_modules:
            fully_shard(module)
    fully_shard(model)


def check_fsdp_shares(num_rows: int, world_size: int, batch_size: int, name: str) -> None:
    """Under FSDP every forward pass is collective: raise unless each process's share of num_rows rows (every
    world_size-th row, as evaluation takes them) makes as many batches of batch_size as the others'."""
    smallest, largest = num_rows // world_size, -(-num_rows // world_size)
    if -(-smallest // batch_size) != -(-largest // batch_size):
        raise ValueError(f"--fsdp: {name} ({num_rows} rows) gives some of the {world_size} processes one batch "
                         f"more than others at --per-device-eval-batch-size {batch_size}, and FSDP needs as many "
                         "forward passes on each: pick another batch size")


if __name__ == "__main__":
    args = tyro.cli(Args)
    start_time = time.time()
    datasets.disable_progress_bars()
    transformers.logging.disable_progress_bar()

    # distributed: torchrun sets RANK, LOCAL_RANK and WORLD_SIZE; one process otherwise
    rank, world_size = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = args.cuda and torch.cuda.is_available()
    device = torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if args.fsdp and "RANK" not in os.environ:
        raise ValueError("--fsdp shards over the processes torchrun starts: launch with torchrun "
                         "(--nproc_per_node 1 for one process)")
    if world_size > 1 or args.fsdp:
        dist.init_process_group("nccl" if use_cuda else "gloo")
    is_main = rank == 0

    # seeding
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    if args.torch_deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.deterministic = True

    # run name and logging: only rank 0 writes
    dataset_stem = os.path.splitext(os.path.basename(args.dataset_name))[0].replace("{split}", "").strip("_-.")
    run_name = f"{dataset_stem}__{args.exp_name}__{args.seed}__{int(time.time())}"
    output_dir = args.output_dir or os.path.join("runs", run_name)
    if is_main:
        if args.track:
            import wandb

            wandb.init(project=args.wandb_project_name, entity=args.wandb_entity, sync_tensorboard=True,
                       config=asdict(args), name=run_name, save_code=True)
        os.makedirs(output_dir, exist_ok=True)
        writer = SummaryWriter(output_dir)
        table = "\n".join(f"|{key}|{value}|" for key, value in asdict(args).items())
        writer.add_text("hyperparameters", f"|param|value|\n|-|-|\n{table}")
        metrics_file = open(os.path.join(output_dir, "metrics.jsonl"), "w")
        completions_file = open(os.path.join(output_dir, "completions.jsonl"), "w")

    # model and tokenizer: the policy trains; the reference is a frozen copy in eval mode (with --lora: the
    # policy's own base model, adapters disabled); so is the judge; --fsdp shards the policy and the reference
    # (not the judge), DDP replicates the policy otherwise
    tokenizer = AutoTokenizer.from_pretrained(args.model_name_or_path)
    pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    check_args(args, tokenizer)
    dtype = getattr(torch, args.dtype)
    policy = AutoModelForCausalLM.from_pretrained(args.model_name_or_path, dtype=dtype).to(device)
    policy.train()
    if args.gradient_checkpointing:
        policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if args.lora:
        from peft import LoraConfig, get_peft_model

        policy = get_peft_model(policy, LoraConfig(
            r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
            target_modules=lora_target_modules(args.lora_target_modules), task_type="CAUSAL_LM",
        ))
        ref_model = AdaptersDisabled(policy)
    else:
        ref_model = AutoModelForCausalLM.from_pretrained(args.model_name_or_path, dtype=dtype).to(device)
        ref_model.eval().requires_grad_(False)
    if args.fused_linear:
        check_fused_linear(policy, device)
    if args.fsdp:
        shard(policy)
        if not args.lora:
            shard(ref_model)
    judge = load_judge(args, dtype, device)
    model = DDP(policy, device_ids=[local_rank] if use_cuda else None) if world_size > 1 and not args.fsdp else policy
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16)

    # data
    vocab_size = policy.get_input_embeddings().num_embeddings
    train_data, test_data = load_splits(
        args.dataset_name, args.dataset_config, args.dataset_train_split, args.dataset_test_split
    )
    train_rows = prepare_dataset(train_data, tokenizer, vocab_size, args, "the train split")
    eval_rows = prepare_dataset(test_data, tokenizer, vocab_size, args, "the test split") if test_data else []
    truncated = sum(row["truncated"] for row in train_rows + eval_rows)
    if truncated and is_main:
        print(f"warning: {truncated} examples truncated to --max-prompt-length / --max-length")
    if args.fsdp:
        check_fsdp_shares(len(eval_rows), world_size, args.per_device_eval_batch_size, "the test split")

    # optimiser and schedule
    micro_batch_size, accumulation = args.per_device_train_batch_size, args.gradient_accumulation_steps
    global_batch_size = micro_batch_size * world_size * accumulation
    steps_per_epoch = len(train_rows) // global_batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"the train split has {len(train_rows)} prompts, less than a global batch "
                         f"({global_batch_size})")
    total_steps = args.max_steps if args.max_steps is not None else args.num_train_epochs * steps_per_epoch
    optimizer = torch.optim.AdamW(policy.parameters(), lr=args.learning_rate, weight_decay=0.0)
    scheduler = get_scheduler(args.lr_scheduler_type, optimizer, round(args.warmup_ratio * total_steps), total_steps)
    if is_main:
        print(f"{run_name}: {len(train_rows)} train and {len(eval_rows)} test prompts; {total_steps} steps of "
              f"{global_batch_size} prompts ({world_size} processes x {micro_batch_size} x {accumulation}) on {device}")

    # training: each step takes one global batch; micro-batch m of process r is its slice m * world_size + r
    batches = global_batches(len(train_rows), global_batch_size, args.seed)
    sums, count = {}, torch.zeros((), device=device)
    train_metrics, eval_metrics = {}, {}
    progress = tqdm(range(1, total_steps + 1), disable=not is_main, dynamic_ncols=True)
    for step in progress:
        indices = next(batches)
        for micro_step in range(accumulation):
            start = (micro_step * world_size + rank) * micro_batch_size
            rows = [train_rows[i] for i in indices[start : start + micro_batch_size]]
            # DDP all-reduces on the last backward only; FSDP reduce-scatters on each (its gradients are sharded)
            syncing = micro_step == accumulation - 1 or world_size == 1 or args.fsdp
            with nullcontext() if syncing else model.no_sync():
                with autocast:
                    loss, metrics, samples = compute_loss(model, ref_model, judge, tokenizer, rows, step, args,
                                                          pad_token_id, args.mixture_coef)
                (loss / accumulation).backward()
            sums = {k: sums.get(k, 0) + v for k, v in metrics.items()}
            count += len(rows)
        # under FSDP the gradients are DTensor shards: clip_grad_norm_ takes the norm over all of them
        grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), args.max_grad_norm)
        learning_rate = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

        logs = {}
        if step % args.logging_steps == 0 or step == total_steps:
            train_metrics = {f"train/{k}": v for k, v in mean_over_ranks(sums, count).items()}
            train_metrics.update({"train/learning_rate": learning_rate, "train/grad_norm": grad_norm.item(),
                                  "train/epoch": step / steps_per_epoch})
            logs.update(train_metrics)
            sums, count = {}, torch.zeros((), device=device)
            shown = {"loss": "train/loss", "P": "train/rewards/probabilities", "kl": "train/loss/kl"}
            progress.set_postfix({name: f"{train_metrics[key]:.3f}" for name, key in shown.items()})
            if is_main:  # the last micro-batch's first samples
                completions_file.writelines(json.dumps({"step": step, **sample}) + "\n" for sample in samples)
                completions_file.flush()
                writer.add_text("completions", "\n\n".join(f"`{json.dumps(sample)}`" for sample in samples), step)
        if eval_rows and ((args.eval_steps > 0 and step % args.eval_steps == 0) or step == total_steps):
            eval_metrics = evaluate(policy, ref_model, judge, tokenizer, eval_rows, args, pad_token_id, device,
                                    autocast)
            logs.update(eval_metrics)
            if is_main:
                progress.write(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in eval_metrics.items()))
        if logs and is_main:
            for key, value in logs.items():
                writer.add_scalar(key, value, step)
            metrics_file.write(json.dumps({"step": step, **logs}) + "\n")
            metrics_file.flush()

    # save and summarise; under FSDP every process takes part in gathering the full state dict onto rank 0
    state_dict = None
    if args.fsdp:
        state_dict = get_model_state_dict(policy, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if is_main:
        policy.save_pretrained(output_dir, state_dict=state_dict)
        tokenizer.save_pretrained(output_dir)
        writer.close()
        metrics_file.close()
        completions_file.close()
        summary = f"train/loss {train_metrics['train/loss']:.4f}"
        if eval_metrics:
            summary += (f", eval/rewards/probabilities {eval_metrics['eval/rewards/probabilities']:.3f}"
                        f", eval/loss/kl {eval_metrics['eval/loss/kl']:.3f}")
        print(f"{run_name} done in {time.time() - start_time:.0f}s: {summary}; policy saved to {output_dir}")
        if args.lora:
            print(f"{output_dir} holds the LoRA adapter, not the full model: with peft installed, "
                  f"AutoModelForCausalLM.from_pretrained({output_dir!r}) loads the base model and the adapter; "
                  "peft.AutoPeftModelForCausalLM too, and its merge_and_unload() gives a plain model")
    if dist.is_initialized():
        dist.destroy_process_group()
