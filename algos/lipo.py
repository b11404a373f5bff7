"""Listwise Preference Optimization (LiPO-λ), in one file.

Paper: Liu, Qin, Wu, Shen, Khalman, Joshi, Zhao, Saleh, Baumgartner, Liu, Liu, Wang, "LiPO: Listwise
Preference Optimization through Learning-to-Rank", NAACL 2025, arXiv:2402.01878. The λ-weights are
LambdaLoss's (Wang, Li, Golbandi, Bendersky, Najork, "The LambdaLoss Framework for Ranking Metric
Optimization", CIKM 2018), i.e. LambdaRank's NDCG weights.

Idea. Feedback often comes as a list of K completions of one prompt with graded scores, not as a pair.
DPO's implicit reward s = β·log π(y|x)/π_ref(y|x) is a score, so aligning the policy is a
learning-to-rank problem: order each list's rewards like its labels. DPO is the pairwise logistic
ranking loss at K = 2. LiPO-λ uses every ordered pair of the list, and weights each pair by how much
swapping the two would change the list's DCG under the policy's current ranking: pairs far apart in
label and placed where the ranking metric is sensitive count more, pairs that hardly matter count little.

Loss. logp(y) = Σ_t log π(y_t | x, y_<t) summed over the completion tokens (prompt and padding masked),
ref(y) the same under the frozen reference, and for a list (x, y_1..y_K) with labels ψ_1..ψ_K:
    s_i  = β·(logp(y_i) - ref(y_i))
    τ_i  = the rank of y_i when the list is sorted by s, descending (1 = top; equal s: lower index first)
    G_i  = 2^ψ_i - 1,   D(τ) = log2(1 + τ)
    Δ_ij = |G_i - G_j|·|1/D(τ_i) - 1/D(τ_j)|                                 (no gradient)
    loss = -Σ_{i,j: ψ_i > ψ_j} Δ_ij·log σ(s_i - s_j)        summed over the list's pairs, averaged over lists
(the paper's eq. for LiPO-λ). `--loss-type` selects the paper's other listwise objectives, each a sum
over the list, averaged over the lists of the batch:
    pair_logistic  -Σ_{ψ_i > ψ_j} log σ(s_i - s_j)            (DPO_BT in the paper; DPO itself at K = 2)
    list_mle       -Σ_i log[e^{s_i} / (e^{s_i} + Σ_{j: ψ_j < ψ_i} e^{s_j})]   (DPO_PL, Plackett-Luce)
    softmax        -Σ_i (ψ_i / Σ_j ψ_j)·log[e^{s_i} / Σ_j e^{s_j}]              (needs ψ >= 0)
All four equal the DPO loss -log σ(β·h) for a list of two with distinct labels (softmax: with labels
(1, 0), which --score-transform win_rate makes of any two distinct scores).

Run (from anywhere; the defaults point at the bundled task in benchmarks/arith/):
    python algos/lipo.py                                  # 1 process, CPU or one GPU
    torchrun --nproc_per_node 2 algos/lipo.py --per-device-train-batch-size 4   # same global batch
    torchrun --nproc_per_node 2 algos/lipo.py --fsdp --lora --fused-linear   # shard, adapters, no full logits
    python benchmarks/arith/evaluate.py runs/<run_name>  # held-out accuracy of the saved policy
    python algos/lipo.py --model-name-or-path Qwen/Qwen2.5-0.5B-Instruct \\
        --dataset-name my_lists.jsonl --beta 0.05 --learning-rate 5e-7 \\
        --per-device-train-batch-size 1 --gradient-accumulation-steps 32 --num-train-epochs 1 \\
        --max-length 1024 --bf16 --gradient-checkpointing --eval-steps 500 --logging-steps 10
Data: `prompt`, `completions` (a list, of strings or of message lists) and `scores` (a list of numbers, one
per completion, higher is better), as in benchmarks/arith/data/lists_{split}.jsonl.

Deviations from the paper and details it leaves open:
1. Optimiser: AdamW with linear warm-up then linear decay (TRL's default), on a model that is not a T5.
2. The reference is the model we start from (`--model-name-or-path`), not a separately fine-tuned SFT model.
3. Labels: the paper's ψ_i is each response's average win probability against the other responses of its
   list under a pairwise reward-ranking model, so ψ ∈ [0, 1] and G ∈ [0, 1]. `--score-transform win_rate`
   does the same with the dataset's scores as the judge: ψ_i = (#{j: score_j < score_i} + ½·#{j ≠ i:
   score_j = score_i}) / (K - 1), which keeps the order and the ties, in [0, 1] whatever the scores' scale.
   `none` uses the scores as ψ, so that their gaps count (G grows as 2^ψ); the default is set below.
4. Normalisation: the paper's per-list sum, averaged over the lists of the batch. (The RAX library the
   paper's code is built on multiplies the λ-weights by the padded list size, and its loss is a sum.)
   With AdamW the overall scale of the loss hardly matters; the relative weights of pairs and lists do.
5. Ties. Only pairs with strictly ψ_i > ψ_j count; ranks τ come from the current rewards, ties broken
   by index (so at the start, where every s is 0, τ is the dataset order). ListMLE needs a total order,
   which ties do not give: here each completion is compared with itself and the strictly worse ones only
   (the Plackett-Luce likelihood when the labels are distinct; tied completions are never compared).
6. A list without any strict preference (all scores equal, or one completion) carries no ranking: it
   contributes 0 to the loss under every objective (softmax's uniform target would otherwise pull its
   rewards together) and still counts as a list in the average.
7. Batches count lists: `--per-device-train-batch-size 8` is 8 lists, whose Σ K_b completions go through
   the model in one forward pass (flattened and padded), the loss regrouping them by list.
8. Tokens, truncation and the data order are as in dpo.py: BOS once before the prompt, EOS once after each
   completion, every completion cut to fit `--max-length`, a seeded permutation per epoch, the last
   incomplete global batch dropped.

Defaults: chosen for the bundled task (its `lists` files, 2610 training lists of 4) by a small sweep: one process,
seed 1, LiPO-λ, then `python benchmarks/arith/evaluate.py` (256 held-out prompts; sampled = 8 samples each at
temperature 1). The base model: greedy accuracy 0.602, sampled 0.319. Train times with two to six runs sharing
the 2-core CPU:
    flags                                             greedy  sampled  KL    time
    (defaults: β 0.5, lr 2e-4, 1 epoch)               0.676   0.478    1.16  337 s
    --beta 1                                          0.719   0.464    0.61  272 s
    --beta 1 --learning-rate 3e-4                     0.719   0.466    0.89  331 s
    --beta 2                                          0.738   0.442    0.35  235 s
    --beta 0.3 --learning-rate 1e-4                   0.598   0.412    1.32  270 s
    --beta 1 --learning-rate 1e-4 --num-train-epochs 2   0.750  0.488  0.53  522 s
    --beta 0.3 --learning-rate 2e-5 --num-train-epochs 3 0.660  0.433  0.75  694 s
Two epochs at β 1 gain the most, but took 312 s as the default run with two other runs on the CPU (alone, an
estimated 3-4 minutes: over the budget for a default run); one epoch takes half as long.
As for DPO, the rates that move this ~0.9M-parameter model within an epoch or two need a β well above
the 0.05 of the large-model command above to keep it near the reference.

Logged metrics (TRL's names where they fit; `train/` every `--logging-steps` steps, averaged over the
lists seen since the last log and over all processes; `eval/` over the whole held-out split). A list's
"chosen" completion is its best (the first with the highest score), its "rejected" one its worst (the
first with the lowest score):
    loss                 the loss above, per list (Σ Δ_ij·ln 2 for LiPO-λ at the start, where s = 0)
    rewards/chosen       mean s of the chosen completions, s = β·(logp - ref) the implicit reward
    rewards/rejected     mean s of the rejected completions
    rewards/margins      mean of chosen minus rejected reward
    rewards/accuracies   per list, the fraction of its ordered pairs (ψ_i > ψ_j) with s_i > s_j (0 for a
                         list without ordered pairs), averaged over lists
    logps/chosen         mean logp of the chosen completions (summed over tokens); logps/rejected alike
    learning_rate, grad_norm (before clipping), epoch
Everything goes to TensorBoard under runs/<run_name>/ (and W&B with --track), to runs/<run_name>/
metrics.jsonl (one JSON object per logged step), to the progress bar, and into a final summary line.
The trained model (with --lora: the adapter) and tokenizer are saved with save_pretrained into the same directory.
"""

import itertools
import json
import math
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
import torch.nn.functional as F
import transformers
import tyro
from datasets import Dataset, load_dataset
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer, get_scheduler

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

    dataset_name: str = os.path.join(REPO, "benchmarks/arith/data/lists_{split}.jsonl")
    """a hub id or a local .json/.jsonl/.parquet file; `{split}` in a file name is replaced by the split
    (a local file without it has only a training split, so no evaluation)"""
    dataset_config: str | None = None
    """the hub dataset's configuration name, if it has several"""
    dataset_train_split: str = "train"
    """the split to train on"""
    dataset_test_split: str | None = "test"
    """the split to evaluate on; None to skip evaluation"""
    max_length: int = 1024
    """maximum tokens of prompt + completion; completions are cut at the end to fit"""
    max_prompt_length: int = 512
    """maximum tokens of the prompt, cut according to --truncation-mode"""
    truncation_mode: Literal["keep_end", "keep_start"] = "keep_end"
    """which part of a too-long prompt to keep: its end (next to the completion) or its start"""

    learning_rate: float = 2e-4
    """AdamW learning rate after warm-up"""
    lr_scheduler_type: Literal["linear", "cosine", "constant_with_warmup"] = "linear"
    """the learning-rate schedule after warm-up"""
    warmup_ratio: float = 0.1
    """fraction of the optimiser steps spent warming the learning rate up linearly from 0"""
    max_grad_norm: float = 1.0
    """clip the global gradient norm to this (inf: no clipping)"""
    per_device_train_batch_size: int = 8
    """lists per process per micro-batch; global batch = this x processes x accumulation steps"""
    gradient_accumulation_steps: int = 1
    """micro-batches accumulated into one optimiser step"""
    per_device_eval_batch_size: int = 32
    """lists per process per evaluation batch"""
    num_train_epochs: int = 1
    """passes over the training split (ignored when --max-steps is set)"""
    max_steps: int | None = None
    """if set, train for exactly this many optimiser steps"""
    precompute_ref_logps: bool = False
    """if toggled, compute the reference log-probs once before training and free the reference model"""
    logging_steps: int = 10
    """log training metrics every this many optimiser steps"""
    eval_steps: int = 100
    """evaluate every this many optimiser steps (0: only at the end)"""

    beta: float = 0.5
    """β, the strength of the KL penalty: the inverse temperature of the implicit reward"""
    loss_type: Literal["lambda", "pair_logistic", "list_mle", "softmax"] = "lambda"
    """the ranking objective: LiPO-λ, the pairwise logistic loss (DPO_BT), ListMLE (DPO_PL) or softmax"""
    score_transform: Literal["win_rate", "none"] = "win_rate"
    """the labels ψ made of a list's scores: each score's share of wins in its list (ties ½), or the scores"""


def pad_lists(values: torch.Tensor, list_sizes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N,) values of B lists laid end to end, list by list -> (B, K) right-padded with 0 (K the longest
    list), and the (B, K) mask of the real items."""
    padded = torch.nn.utils.rnn.pad_sequence(values.split(list_sizes.tolist()), batch_first=True)
    valid = torch.arange(padded.shape[1], device=values.device) < list_sizes[:, None]
    return padded, valid


def preferred_pairs(scores: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """(B, K, K) mask of the ordered pairs of each list: [b, i, j] when ψ_i > ψ_j strictly, both real."""
    return (scores[:, :, None] > scores[:, None, :]) & valid[:, :, None] & valid[:, None, :]


def lambda_weights(rewards: torch.Tensor, scores: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """LiPO-λ's pair weights, (B, K, K) and without gradient, from (B, K) padded rewards s, labels ψ and
    the mask of real items:
        τ_i  = 1 + #{j: s_j > s_i} + #{j < i: s_j = s_i}     the rank of i under the current rewards
        Δ_ij = |G_i - G_j|·|1/D(τ_i) - 1/D(τ_j)|,  G = 2^ψ - 1,  D(τ) = log2(1 + τ)
    for the ordered pairs ψ_i > ψ_j, 0 elsewhere."""
    rewards, scores = rewards.detach(), scores.detach()
    index = torch.arange(rewards.shape[1], device=rewards.device)
    same = rewards[:, None, :] == rewards[:, :, None]
    ahead = (rewards[:, None, :] > rewards[:, :, None]) | (same & (index[None, :] < index[:, None]))  # j before i
    ranks = 1 + (ahead & valid[:, None, :]).sum(-1)
    gains = torch.exp2(scores) - 1
    inverse_discounts = 1 / torch.log2(1 + ranks.to(rewards.dtype))
    deltas = (gains[:, :, None] - gains[:, None, :]).abs() * (
        inverse_discounts[:, :, None] - inverse_discounts[:, None, :]
    ).abs()
    return torch.where(preferred_pairs(scores, valid), deltas, 0)


def lipo_loss(
    policy_logps: torch.Tensor,
    reference_logps: torch.Tensor,
    scores: torch.Tensor,
    list_sizes: torch.Tensor,
    beta: float,
    loss_type: str = "lambda",
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ranking loss of each list, and the implicit rewards.

    Inputs are (N,) sums of completion-token log-probs and (N,) labels ψ (higher is better, no gradient) of
    the completions of B lists laid end to end, list by list, and the (B,) list sizes (>= 1, summing to N).
    With s_i = β·(policy_i - reference_i) and, within each list, only strict preferences ψ_i > ψ_j:
        lambda         -Σ_{ψ_i > ψ_j} Δ_ij·log σ(s_i - s_j)            Δ from `lambda_weights`
        pair_logistic  -Σ_{ψ_i > ψ_j} log σ(s_i - s_j)
        list_mle       -Σ_i log[e^{s_i} / (e^{s_i} + Σ_{j: ψ_j < ψ_i} e^{s_j})]
        softmax        -Σ_i (ψ_i / Σ_j ψ_j)·log softmax(s)_i             (ψ >= 0)
    A list without a strict preference gets loss 0. Returns (losses (B,), differentiable, and rewards (N,),
    the detached s of each completion).
    """
    rewards = beta * (policy_logps - reference_logps)
    s, valid = pad_lists(rewards, list_sizes)
    psi, _ = pad_lists(scores.detach().to(s.dtype), list_sizes)
    preferred = preferred_pairs(psi, valid)
    if loss_type in ("lambda", "pair_logistic"):
        weights = lambda_weights(s, psi, valid) if loss_type == "lambda" else preferred.to(s.dtype)
        pair_losses = -F.logsigmoid(s[:, :, None] - s[:, None, :])
        losses = torch.where(preferred, weights * pair_losses, 0).sum((1, 2))
    elif loss_type == "list_mle":
        # item i competes with itself and the strictly worse items: Plackett-Luce without ranking ties
        rivals = preferred | torch.eye(s.shape[1], dtype=torch.bool, device=s.device)
        log_normalisers = torch.where(rivals, s[:, None, :], float("-inf")).logsumexp(-1)
        losses = torch.where(valid, log_normalisers - s, 0).sum(-1)
    elif loss_type == "softmax":
        total = psi.sum(-1, keepdim=True)  # padding is 0
        log_probs = torch.where(valid, s, float("-inf")).log_softmax(-1)
        losses = -(psi / torch.where(total > 0, total, 1) * torch.where(valid, log_probs, 0)).sum(-1)
    else:
        raise ValueError(f"unknown loss_type {loss_type!r}: use lambda, pair_logistic, list_mle or softmax")
    losses = torch.where(preferred.any((1, 2)), losses, 0)  # nothing to rank
    return losses, rewards.detach()


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


def tokenize_completion(tokenizer, text: str, add_eos: bool = True) -> list[int]:
    """Completion token ids, ending with EOS (once) when add_eos."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if add_eos and tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no EOS token to end the completions with: set tokenizer.eos_token")
    if add_eos and ids[-1:] != [tokenizer.eos_token_id]:
        ids = ids + [tokenizer.eos_token_id]
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


def win_rates(scores: list[float]) -> list[float]:
    """Each score's share of wins against the other scores of its list, a tie counting ½: in [0, 1], in the
    same order as the scores, ties kept (a list of one gets 0)."""
    others = max(len(scores) - 1, 1)
    return [(sum(other < score for other in scores) + (scores.count(score) - 1) / 2) / others for score in scores]


def list_labels(example: dict, args: Args) -> list[float]:
    """Check a list's completions and scores and return its labels ψ (see --score-transform)."""
    completions, scores = example["completions"], example["scores"]
    if not isinstance(completions, list) or not completions:
        raise ValueError(f"`completions` must be a non-empty list of completions, not {completions!r}")
    if not isinstance(scores, list) or len(scores) != len(completions):
        raise ValueError(f"`scores` must be a list with one score per completion: {len(completions)} completions, "
                         f"scores {scores!r}")
    if not all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in scores):
        raise ValueError(f"the scores must be finite numbers (higher is better), not {scores!r}")
    scores = [float(x) for x in scores]
    if args.score_transform == "win_rate":
        return win_rates(scores)
    if args.loss_type == "softmax" and min(scores) < 0:
        raise ValueError(f"the softmax objective's target ψ/Σψ needs scores >= 0, not {scores}: shift them, or use "
                         "--score-transform win_rate")
    if args.loss_type == "lambda" and max(scores) >= 128:
        raise ValueError(f"the gains 2^ψ - 1 overflow float32 for scores of 128 and more ({max(scores)}): rescale "
                         "the scores, or use --score-transform win_rate")
    return scores


def tokenize_row(example: dict, tokenizer, max_length, max_prompt_length, truncation_mode) -> dict:
    """A ranked-list example, standard or conversational -> token ids of the prompt and of each completion."""
    prompt, completions = example["prompt"], list(example["completions"])
    if is_conversational(prompt):
        prompt, completions = apply_chat_template(tokenizer, prompt, completions)
    prompt_ids = tokenize_prompt(tokenizer, prompt)
    completions_ids = [tokenize_completion(tokenizer, text) for text in completions]
    lengths = [len(prompt_ids)] + [len(ids) for ids in completions_ids]
    prompt_ids, completions_ids = truncate(
        prompt_ids, completions_ids, max_length, max_prompt_length, truncation_mode
    )
    truncated = [len(prompt_ids)] + [len(ids) for ids in completions_ids] != lengths
    return {"prompt_ids": prompt_ids, "completions_ids": completions_ids, "truncated": truncated}


def prepare_dataset(dataset: Dataset, tokenizer, vocab_size: int, args: Args, name="the dataset") -> list[dict]:
    """Check a ranked-list dataset and tokenize it into a list of `tokenize_row` rows with their labels ψ."""
    columns = ["prompt", "completions", "scores"]
    missing = [column for column in columns if column not in dataset.column_names]
    if missing:
        raise ValueError(f"{name} lacks the column(s) {missing}: it has {dataset.column_names}, and LiPO needs "
                         f"{columns} (a prompt, a list of completions as strings or lists of messages, and one "
                         "score per completion, higher is better): rename the columns")
    if len(dataset) == 0:
        raise ValueError(f"{name} is empty: check --dataset-name and the split")
    rows = []
    for i, example in enumerate(dataset):
        try:
            scores = list_labels(example, args)
            row = tokenize_row(example, tokenizer, args.max_length, args.max_prompt_length, args.truncation_mode)
        except ValueError as error:
            raise ValueError(f"{name}, example {i}: {error}") from error
        top = max(row["prompt_ids"] + [token for ids in row["completions_ids"] for token in ids])
        if top >= vocab_size:
            raise ValueError(f"{name}, example {i}: token id {top} is outside the model's vocabulary of "
                             f"{vocab_size}: the tokenizer does not belong to the model")
        rows.append({**row, "scores": scores})
    return rows


def collate(rows: list[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """B lists -> their N completions as right-padded sequences, list by list: input_ids, attention_mask,
    labels (N, T), labels being the input ids on completion tokens and -100 on prompt and padding; the (N,)
    scores ψ and the (B,) list sizes; plus the (N,) reference log-probs when the rows carry them."""
    sequences, labels = [], []
    for row in rows:
        for ids in row["completions_ids"]:
            sequences.append(row["prompt_ids"] + ids)
            labels.append([-100] * len(row["prompt_ids"]) + ids)
    length = max(map(len, sequences))
    batch = {
        "input_ids": torch.tensor([s + [pad_token_id] * (length - len(s)) for s in sequences]),
        "attention_mask": torch.tensor([[1] * len(s) + [0] * (length - len(s)) for s in sequences]),
        "labels": torch.tensor([s + [-100] * (length - len(s)) for s in labels]),
        "scores": torch.tensor([score for row in rows for score in row["scores"]]),
        "list_sizes": torch.tensor([len(row["completions_ids"]) for row in rows]),
    }
    if "reference_logps" in rows[0]:
        batch["reference_logps"] = torch.tensor([logp for row in rows for logp in row["reference_logps"]])
    return batch


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


def concatenated_forward(model, batch: dict, fused_linear: bool = False) -> torch.Tensor:
    """All completions of the batch's lists in one forward pass: their (N,) completion log-probs."""
    logits = forward_logits(model, batch["input_ids"], batch["attention_mask"], fused_linear)
    return batch_logps(logits, batch["labels"])


def compute_loss(model, ref_model, batch: dict, args: Args) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The mean loss of a batch, and the sums over its lists of the logged metrics."""
    policy_logps = concatenated_forward(model, batch, args.fused_linear)
    if ref_model is None:  # precomputed
        reference_logps = batch["reference_logps"]
    else:
        with torch.no_grad():
            reference_logps = concatenated_forward(ref_model, batch, args.fused_linear)
    losses, rewards = lipo_loss(
        policy_logps, reference_logps, batch["scores"], batch["list_sizes"], args.beta, args.loss_type
    )
    # each list's chosen (best) and rejected (worst) completion: the first with the highest / lowest score
    sizes = batch["list_sizes"]
    scores, valid = pad_lists(batch["scores"], sizes)
    chosen = torch.where(valid, scores, float("-inf")).argmax(-1, keepdim=True)
    rejected = torch.where(valid, scores, float("inf")).argmin(-1, keepdim=True)
    rewards, logps = pad_lists(rewards, sizes)[0], pad_lists(policy_logps.detach(), sizes)[0]
    chosen_rewards, rejected_rewards = rewards.gather(1, chosen)[:, 0], rewards.gather(1, rejected)[:, 0]
    ordered = preferred_pairs(scores, valid)
    ranked_right = (ordered & (rewards[:, :, None] > rewards[:, None, :])).sum((1, 2))
    metrics = {
        "loss": losses.detach().sum(),
        "rewards/chosen": chosen_rewards.sum(),
        "rewards/rejected": rejected_rewards.sum(),
        "rewards/margins": (chosen_rewards - rejected_rewards).sum(),
        "rewards/accuracies": (ranked_right / ordered.sum((1, 2)).clamp(min=1)).sum(),
        "logps/chosen": logps.gather(1, chosen).sum(),
        "logps/rejected": logps.gather(1, rejected).sum(),
    }
    return losses.mean(), metrics


def global_batches(num_rows: int, global_batch_size: int, seed: int):
    """Endless row indices of global batches: a seeded permutation per epoch, its last partial batch dropped."""
    for epoch in itertools.count():
        order = torch.randperm(num_rows, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
        for start in range(0, num_rows - global_batch_size + 1, global_batch_size):
            yield order[start : start + global_batch_size]


def mean_over_ranks(sums: dict[str, torch.Tensor], count: torch.Tensor) -> dict[str, float]:
    """Metric sums divided by the number of pairs, both summed over all processes."""
    keys = sorted(sums)
    totals = torch.stack([sums[key] for key in keys] + [count]).float()
    if dist.is_initialized():
        dist.all_reduce(totals)
    return {key: (totals[i] / totals[-1]).item() for i, key in enumerate(keys)}


@torch.no_grad()
def evaluate(policy, ref_model, rows: list[dict], args: Args, pad_token_id, device, autocast) -> dict[str, float]:
    """eval/ metrics over all rows, each process taking every world_size-th row."""
    policy.eval()
    sums, count = {}, torch.zeros((), device=device)
    rank, world_size = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    mine = rows[rank::world_size]
    for start in range(0, len(mine), args.per_device_eval_batch_size):
        chunk = mine[start : start + args.per_device_eval_batch_size]
        batch = {k: v.to(device) for k, v in collate(chunk, pad_token_id).items()}
        with autocast:
            _, metrics = compute_loss(policy, ref_model, batch, args)
        sums = {k: sums.get(k, 0) + v for k, v in metrics.items()}
        count += len(chunk)
    policy.train()
    return {f"eval/{k}": v for k, v in mean_over_ranks(sums, count).items()}


@torch.no_grad()
def precompute_ref_logps(ref_model, rows: list[dict], args: Args, pad_token_id, device, autocast) -> None:
    """Store each row's reference log-probs in it, computed once (each process a share, then exchanged)."""
    rank, world_size = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    mine, indices = {}, list(range(rank, len(rows), world_size))
    for start in range(0, len(indices), args.per_device_eval_batch_size):
        chunk = indices[start : start + args.per_device_eval_batch_size]
        batch = {k: v.to(device) for k, v in collate([rows[i] for i in chunk], pad_token_id).items()}
        with autocast:
            logps = concatenated_forward(ref_model, batch, args.fused_linear)
        mine.update(zip(chunk, (part.tolist() for part in logps.split(batch["list_sizes"].tolist()))))
    shares = [mine]
    if dist.is_initialized():
        shares = [None] * world_size
        dist.all_gather_object(shares, mine)
    for share in shares:
        for i, logps in share.items():
            rows[i]["reference_logps"] = logps


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

    # model and tokenizer: the policy trains; the reference is a frozen copy in eval mode (with --lora: the
    # policy's own base model, adapters disabled); --fsdp shards both, DDP replicates the policy otherwise
    tokenizer = AutoTokenizer.from_pretrained(args.model_name_or_path)
    pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
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
        if args.precompute_ref_logps:
            check_fsdp_shares(len(train_rows), world_size, args.per_device_eval_batch_size, "the train split")
    if args.precompute_ref_logps:
        precompute_ref_logps(ref_model, train_rows, args, pad_token_id, device, autocast)
        precompute_ref_logps(ref_model, eval_rows, args, pad_token_id, device, autocast)
        ref_model = None

    # optimiser and schedule
    micro_batch_size, accumulation = args.per_device_train_batch_size, args.gradient_accumulation_steps
    global_batch_size = micro_batch_size * world_size * accumulation
    steps_per_epoch = len(train_rows) // global_batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"the train split has {len(train_rows)} lists, less than a global batch ({global_batch_size})")
    total_steps = args.max_steps if args.max_steps is not None else args.num_train_epochs * steps_per_epoch
    optimizer = torch.optim.AdamW(policy.parameters(), lr=args.learning_rate, weight_decay=0.0)
    scheduler = get_scheduler(args.lr_scheduler_type, optimizer, round(args.warmup_ratio * total_steps), total_steps)
    if is_main:
        print(f"{run_name}: {len(train_rows)} train and {len(eval_rows)} test lists; {total_steps} steps of "
              f"{global_batch_size} lists ({world_size} processes x {micro_batch_size} x {accumulation}) on {device}")

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
            batch = {k: v.to(device) for k, v in collate(rows, pad_token_id).items()}
            # DDP all-reduces on the last backward only; FSDP reduce-scatters on each (its gradients are sharded)
            syncing = micro_step == accumulation - 1 or world_size == 1 or args.fsdp
            with nullcontext() if syncing else model.no_sync():
                with autocast:
                    loss, metrics = compute_loss(model, ref_model, batch, args)
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
            shown = {"loss": "train/loss", "margin": "train/rewards/margins", "acc": "train/rewards/accuracies"}
            progress.set_postfix({name: f"{train_metrics[key]:.3f}" for name, key in shown.items()})
        if eval_rows and ((args.eval_steps > 0 and step % args.eval_steps == 0) or step == total_steps):
            eval_metrics = evaluate(policy, ref_model, eval_rows, args, pad_token_id, device, autocast)
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
        summary = f"train/loss {train_metrics['train/loss']:.4f}"
        if eval_metrics:
            summary += (f", eval/rewards/accuracies {eval_metrics['eval/rewards/accuracies']:.3f}"
                        f", eval/rewards/margins {eval_metrics['eval/rewards/margins']:.3f}")
        print(f"{run_name} done in {time.time() - start_time:.0f}s: {summary}; policy saved to {output_dir}")
        if args.lora:
            print(f"{output_dir} holds the LoRA adapter, not the full model: with peft installed, "
                  f"AutoModelForCausalLM.from_pretrained({output_dir!r}) loads the base model and the adapter; "
                  "peft.AutoPeftModelForCausalLM too, and its merge_and_unload() gives a plain model")
    if dist.is_initialized():
        dist.destroy_process_group()
