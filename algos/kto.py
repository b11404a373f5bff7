"""Kahneman-Tversky Optimization (KTO), in one file.

Paper: Ethayarajh, Xu, Muennighoff, Jurafsky, Kiela, "KTO: Model Alignment as Prospect Theoretic Optimization",
ICML 2024, arXiv:2402.01306; official code ContextualAI/HALOs.

Idea. Preference pairs are scarce; a thumbs up or down on a single completion is not. KTO needs only that:
each completion is labelled desirable or undesirable. Borrowing prospect theory, a completion's value is
judged against a reference point, not in isolation: the implicit reward r = log π(y|x)/π_ref(y|x) of a
desirable completion should rise above the policy's typical reward, z0 = KL(π || π_ref), and that of an
undesirable one should fall below it. The value saturates (a logistic), so examples already far on the
right side stop pulling, and λD, λU weigh gains against losses (and correct for class imbalance).

Loss. logp(y) = Σ_t log π(y_t | x, y_<t) summed over the completion tokens (prompt and padding masked),
ref(y) the same under the frozen reference, r = logp(y) - ref(y), and for a micro-batch of m examples:
    z0   = max(0, (1/m)·Σ_i [logp(y_{i+1}|x_i) - ref(y_{i+1}|x_i)])     indices mod m; no gradient
    loss = λD·(1 - σ(β·(r - z0)))      for a desirable completion
           λU·(1 - σ(β·(z0 - r)))      for an undesirable one             averaged over the examples
z0 is the paper's estimate of the KL term: each prompt is paired with the next example's completion, so that
no example is matched with itself (whatever m >= 2; a micro-batch of one cannot estimate it: an error), the
log-ratios are averaged, clamped at 0 and not backpropagated through. The loss is the paper's bounded
λ·(1 - σ(.)), not -log σ: its gradient vanishes once r is far past z0, on either side. λ weighs each example.
Batching: the loss of a micro-batch is the mean over its examples (as in TRL and HALOs), so a one-class micro-
batch is fine. The mismatched sequences go through the policy in an extra forward pass without gradient (and
through the reference together with the examples). Under torchrun the processes' micro-batches of one
micro-step form the micro-batch of m examples: its pairs rotate across processes and every process uses the
same z0, the mean over all m pairs (gathered), i.e. the all-reduced mean.

Run (from anywhere; the defaults point at the bundled task in benchmarks/arith/):
    python algos/kto.py                                  # 1 process, CPU or one GPU
    torchrun --nproc_per_node 2 algos/kto.py --per-device-train-batch-size 8   # same global batch and z0
    torchrun --nproc_per_node 2 algos/kto.py --fsdp --lora --fused-linear   # shard, adapters, no full logits
    python benchmarks/arith/evaluate.py runs/<run_name>  # held-out accuracy of the saved policy
    python algos/kto.py --model-name-or-path Qwen/Qwen2.5-0.5B-Instruct \\
        --dataset-name trl-lib/kto-mix-14k --beta 0.1 --learning-rate 1e-6 \\
        --per-device-train-batch-size 4 --gradient-accumulation-steps 8 --num-train-epochs 1 \\
        --max-length 1024 --bf16 --gradient-checkpointing --eval-steps 500 --logging-steps 10

Data: TRL's unpaired preference format, `prompt`, `completion` and a boolean `label` (true: desirable),
as strings or lists of messages. A paired dataset (`prompt`, `chosen`, `rejected`) is unpaired: each
pair gives its chosen completion labelled desirable and its rejected one labelled undesirable.

Deviations from the paper (and its code, ContextualAI/HALOs):
1. Optimiser: AdamW with linear warm-up then linear decay (TRL's default) instead of HALOs' AdamW at 5e-6
   after 150 linear warm-up steps.
2. The reference is the model we start from (`--model-name-or-path`); the bundled model is already trained
   on the task (the paper shows KTO can also skip SFT).
3. Tokens: prompt and completion are tokenized separately (as at generation time), the prompt gets the
   tokenizer's BOS unless its text already starts with it (chat templates often write it), each
   completion gets EOS unless it already ends with it. The prompt is truncated to `--max-prompt-length`
   (`--truncation-mode`), then each completion is cut to fit `--max-length`; an example whose prompt
   leaves no room for a completion token is an error, never silently dropped.
4. Each epoch is a fresh seeded permutation cut into global batches; the last incomplete global batch
   is dropped so that every step sees the same number of examples on any number of processes.
5. Under torchrun the micro-batch that shares one z0 is made of all processes' micro-batches of a
   micro-step: completions rotate across the processes and z0 is the mean over all of them (HALOs rotates
   within each process and all-gathers the estimates). So `torchrun --nproc_per_node N` with B examples per
   process computes exactly what one process does with N·B (not B with N accumulation steps: each
   accumulated micro-batch has its own z0, as in the paper).
6. The mismatched pair's completion is cut to fit `--max-length` after its new prompt. Two examples of the
   same prompt that land next to each other in a micro-batch make a matched pair; with shuffled data this is
   rare (the paper's estimate has the same property).
7. Evaluation cuts the held-out split into consecutive groups of `--per-device-eval-batch-size` x processes
   examples, one z0 each (a last group with fewer than max(2, processes) examples joins the one before).
8. `--precompute-ref-logps` is refused: the mismatched pairs change with every batch, so the reference
   model is needed throughout training (TRL fixes the pairs once to precompute them).
9. Class imbalance: the paper's rule λD·nD / (λU·nU) in [1, 3/2] (nD, nU: desirable and undesirable
   training examples; an earlier version of the paper said [1, 4/3]) is checked at start-up, with a warning
   that gives the λD range that would satisfy it; the weights are never changed silently.

Defaults: chosen for the bundled task by a small sweep: one process, seed 1, then
`python benchmarks/arith/evaluate.py` (256 held-out prompts; sampled = 8 samples each at temperature 1). The
base model: greedy accuracy 0.602, sampled 0.319. Train times with two to four runs sharing the 2-core CPU:
    data                                flags                               greedy  sampled  KL     time
    pairs, unpaired (3378 examples)     (defaults: β 2, lr 2e-4, 1 epoch)  0.699   0.497    0.72   83 s
    pairs, unpaired                     --beta 1 --learning-rate 1e-4      0.711   0.465    0.73   163 s
    unpaired (12000, 30% desirable)     --beta 0.1 --learning-rate 2e-5    0.035   0.046    48.9   479 s
    unpaired                            --beta 0.3 --learning-rate 1e-4    0.059   0.056    37.1   498 s
The default data are the bundled pairs, unpaired by the script: balanced (λD = λU = 1 meets the paper's rule)
and a quarter of the size. The natural `unpaired` files (`--dataset-name
benchmarks/arith/data/unpaired_{split}.jsonl`, where the rule asks for --desirable-weight 2.35 to 3.5) take 750
steps per epoch, and with a small β and the classes unweighted the undesirable majority drove the policy off
(KL above 30, accuracy near 0).

Logged metrics (TRL's names; `train/` every `--logging-steps` steps, averaged over the examples seen since
the last log and over all processes; `eval/` over the whole held-out split):
    loss                 the KTO loss above (λ/2 per example at the start, where policy = reference)
    kl                   z0, the clamped KL estimate of the micro-batches (averaged over their examples)
    rewards/chosen       mean β·r over the desirable completions (left out of a log without any)
    rewards/rejected     mean β·r over the undesirable completions (likewise)
    rewards/margins      mean of β·(r - z0) for desirable and β·(z0 - r) for undesirable completions: how far
                         each example is on its label's side of the reference point (not TRL's difference of
                         the chosen and rejected means, which is rewards/chosen - rewards/rejected)
    rewards/accuracies   fraction of examples with a positive margin (0 at the start, where r = z0 = 0)
    logps/chosen         mean logp(y) of the desirable completions (summed over tokens); logps/rejected alike
    learning_rate, grad_norm (before clipping), epoch
Everything goes to TensorBoard under runs/<run_name>/ (and W&B with --track), to runs/<run_name>/
metrics.jsonl (one JSON object per logged step), to the progress bar, and into a final summary line.
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

    dataset_name: str = os.path.join(REPO, "benchmarks/arith/data/pairs_{split}.jsonl")
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
    per_device_train_batch_size: int = 16
    """examples per process per micro-batch (>= 2 on one process: z0 pairs them); global batch = this x
    processes x accumulation steps"""
    gradient_accumulation_steps: int = 1
    """micro-batches accumulated into one optimiser step"""
    per_device_eval_batch_size: int = 32
    """examples per process per evaluation batch (the examples of all processes share one z0)"""
    num_train_epochs: int = 1
    """passes over the training split (ignored when --max-steps is set)"""
    max_steps: int | None = None
    """if set, train for exactly this many optimiser steps"""
    precompute_ref_logps: bool = False
    """not available in KTO (an error): the reference model scores each batch's mismatched pairs, which change"""
    logging_steps: int = 10
    """log training metrics every this many optimiser steps"""
    eval_steps: int = 100
    """evaluate every this many optimiser steps (0: only at the end)"""

    beta: float = 2.0
    """β, the strength of the KL penalty: the inverse temperature of the implicit reward (the value's slope)"""
    desirable_weight: float = 1.0
    """λD, the weight of the desirable examples' losses"""
    undesirable_weight: float = 1.0
    """λU, the weight of the undesirable examples' losses; keep λD·nD / (λU·nU) in [1, 3/2] (a warning says)"""


def kto_loss(
    policy_logps: torch.Tensor,
    reference_logps: torch.Tensor,
    desirable: torch.Tensor,
    policy_kl_logps: torch.Tensor,
    reference_kl_logps: torch.Tensor,
    beta: float,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The KTO loss of each example, the implicit rewards and the reference point.

    policy_logps, reference_logps: (B,) sums of completion-token log-probs of the examples; desirable: (B,) bool
    labels. policy_kl_logps, reference_kl_logps: (M,) the same for the mismatched pairs (x_i, y_{i+1 mod M}) of the
    whole micro-batch (all processes' examples under torchrun, so M >= B), M >= 2. With r = policy - reference,
        z0   = max(0, mean(policy_kl - reference_kl))                         (no gradient flows into it)
        loss = λD·(1 - σ(β·(r - z0)))  if desirable,  λU·(1 - σ(β·(z0 - r)))  otherwise
    (computed as λ·σ(-β·(...)), equal and exact where σ(.) rounds to 1) returns (losses, rewards, z0): the (B,)
    per-example losses (differentiable), the (B,) rewards β·r (detached) and z0 () (detached).
    """
    if policy_kl_logps.numel() < 2:
        raise ValueError("z0 cannot be estimated from a micro-batch of one example: its prompt has no other "
                         "example's completion to be paired with. Use micro-batches of at least 2 examples")
    reference_point = (policy_kl_logps - reference_kl_logps).mean().clamp(min=0).detach()
    logratios = policy_logps - reference_logps
    desirable_losses = desirable_weight * torch.sigmoid(-beta * (logratios - reference_point))
    undesirable_losses = undesirable_weight * torch.sigmoid(-beta * (reference_point - logratios))
    losses = torch.where(desirable, desirable_losses, undesirable_losses)
    return losses, beta * logratios.detach(), reference_point


def class_weight_warning(num_desirable: int, num_undesirable: int, desirable_weight: float,
                         undesirable_weight: float) -> str | None:
    """The paper's rule for imbalanced data: λD·nD / (λU·nU) in [1, 3/2]. A message when the weights break it (with
    the λD range that would keep it), or None. Raises on weights that are not positive."""
    if desirable_weight <= 0 or undesirable_weight <= 0:
        raise ValueError(f"--desirable-weight {desirable_weight} and --undesirable-weight {undesirable_weight} must "
                         "both be positive: a weight of 0 ignores a class, a negative one trains the wrong way")
    if num_desirable == 0 or num_undesirable == 0:
        return (f"the train split has {num_desirable} desirable and {num_undesirable} undesirable examples: KTO "
                "trains on one class alone, but the paper's class-balance rule cannot be applied")
    ratio = desirable_weight * num_desirable / (undesirable_weight * num_undesirable)
    low, high = (undesirable_weight * num_undesirable / num_desirable * bound for bound in (1, 1.5))
    if not 1 <= ratio <= 1.5:
        return (f"λD·nD / (λU·nU) = {desirable_weight}·{num_desirable} / ({undesirable_weight}·{num_undesirable}) = "
                f"{ratio:.3f} is outside the paper's [1, 3/2]: with --undesirable-weight {undesirable_weight}, a "
                f"--desirable-weight in [{low:.3g}, {high:.3g}] keeps it there")
    return None


def check_args(args: Args, world_size: int, num_eval_rows: int) -> None:
    """Errors for what KTO cannot run with: z0 needs micro-batches (all processes' examples together) of at least
    2 examples, and the reference model throughout training."""
    if min(args.per_device_train_batch_size, args.per_device_eval_batch_size) * world_size < 2:
        raise ValueError("a micro-batch of one example cannot estimate z0, which pairs each prompt with the next "
                         "example's completion: use --per-device-train-batch-size and --per-device-eval-batch-size "
                         "of at least 2 (or 2 per process count: the processes' micro-batches pair together)")
    if num_eval_rows in range(1, world_size):
        raise ValueError(f"the test split has {num_eval_rows} examples, fewer than the {world_size} processes")
    if args.precompute_ref_logps:
        raise ValueError("--precompute-ref-logps: KTO's reference model scores the mismatched pairs of every batch "
                         "(they change from batch to batch), so it cannot be freed before training")


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


def extract_prompt(example: dict) -> dict:
    """TRL's implicit-prompt format (chosen and rejected are whole conversations, no conversational prompt
    column): the leading messages they share become the prompt."""
    chosen, rejected = example["chosen"], example["rejected"]
    if not is_conversational(chosen) or is_conversational(example.get("prompt")):
        return example
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    return {**example, "prompt": chosen[:shared], "chosen": chosen[shared:], "rejected": rejected[shared:]}


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


def tokenize_row(example: dict, tokenizer, max_length, max_prompt_length, truncation_mode) -> dict:
    """An unpaired example, standard or conversational -> token ids of prompt and completion, and its label."""
    if not isinstance(example["label"], bool):
        raise ValueError(f"the label is {example['label']!r} ({type(example['label']).__name__}), not true (desirable) "
                         "or false (undesirable): cast the column, e.g. dataset.cast_column('label', Value('bool'))")
    prompt, completions = example["prompt"], [example["completion"]]
    if is_conversational(prompt):
        prompt, completions = apply_chat_template(tokenizer, prompt, completions)
    prompt_ids = tokenize_prompt(tokenizer, prompt)
    completions_ids = [tokenize_completion(tokenizer, text) for text in completions]
    lengths = [len(prompt_ids)] + [len(ids) for ids in completions_ids]
    prompt_ids, (completion_ids,) = truncate(prompt_ids, completions_ids, max_length, max_prompt_length, truncation_mode)
    truncated = [len(prompt_ids), len(completion_ids)] != lengths
    return {"prompt_ids": prompt_ids, "completion_ids": completion_ids, "label": example["label"], "truncated": truncated}


def prepare_dataset(dataset: Dataset, tokenizer, vocab_size: int, args: Args, name="the dataset") -> list[dict]:
    """Check an unpaired preference dataset (or a paired one, unpaired: chosen desirable, rejected undesirable)
    and tokenize it into a list of `tokenize_row` rows."""
    paired = {"chosen", "rejected"} <= set(dataset.column_names) and "completion" not in dataset.column_names
    columns = ["prompt", "chosen", "rejected"] if paired else ["prompt", "completion", "label"]
    missing = [column for column in columns if column not in dataset.column_names]
    if missing == ["prompt"] and paired and len(dataset) > 0 and is_conversational(dataset[0]["chosen"]):
        missing = []  # implicit prompt, see extract_prompt
    if missing:
        raise ValueError(f"{name} lacks the column(s) {missing}: it has {dataset.column_names}, and KTO needs "
                         "prompt, completion, label (TRL's unpaired preference format, label true for a desirable "
                         "completion) or TRL's preference format (prompt, chosen, rejected; unpaired here), as strings "
                         "or lists of messages: rename the columns")
    if len(dataset) == 0:
        raise ValueError(f"{name} is empty: check --dataset-name and the split")
    examples = enumerate(dataset)
    if paired:  # each pair i gives two examples: its chosen completion desirable, its rejected one undesirable
        examples = ((i, {"prompt": pair["prompt"], "completion": pair[key], "label": key == "chosen"})
                    for i, pair in enumerate(map(extract_prompt, dataset)) for key in ("chosen", "rejected"))
    rows = []
    for i, example in examples:
        try:
            row = tokenize_row(example, tokenizer, args.max_length, args.max_prompt_length, args.truncation_mode)
        except ValueError as error:
            raise ValueError(f"{name}, example {i}: {error}") from error
        top = max(row["prompt_ids"] + row["completion_ids"])
        if top >= vocab_size:
            raise ValueError(f"{name}, example {i}: token id {top} is outside the model's vocabulary of "
                             f"{vocab_size}: the tokenizer does not belong to the model")
        rows.append(row)
    if len(rows) < 2:
        raise ValueError(f"{name} has a single example: KTO's reference point pairs each prompt with another "
                         "example's completion, so it needs at least 2")
    return rows


def collate(rows: list[dict], partners: list[dict], pad_token_id: int, max_length: int) -> dict[str, torch.Tensor]:
    """B rows -> 2B right-padded sequences, the examples first, then the mismatched pairs (row i's prompt followed
    by partners[i]'s completion, cut to fit max_length): input_ids, attention_mask, labels (2B, T), labels being
    the input ids on completion tokens and -100 on prompt and padding; plus `desirable`, the (B,) bool labels."""
    sequences, labels = [], []
    mismatched = [partner["completion_ids"][: max_length - len(row["prompt_ids"])] for row, partner in zip(rows, partners)]
    for completions in ([row["completion_ids"] for row in rows], mismatched):
        for row, completion in zip(rows, completions):
            sequences.append(row["prompt_ids"] + completion)
            labels.append([-100] * len(row["prompt_ids"]) + completion)
    length = max(map(len, sequences))
    batch = {
        "input_ids": torch.tensor([s + [pad_token_id] * (length - len(s)) for s in sequences]),
        "attention_mask": torch.tensor([[1] * len(s) + [0] * (length - len(s)) for s in sequences]),
        "labels": torch.tensor([s + [-100] * (length - len(s)) for s in labels]),
    }
    batch["desirable"] = torch.tensor([row["label"] for row in rows])
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


def concatenated_forward(model, batch: dict, fused_linear: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Examples and mismatched pairs in one forward pass: the (B,) completion log-probs of each."""
    logits = forward_logits(model, batch["input_ids"], batch["attention_mask"], fused_linear)
    return batch_logps(logits, batch["labels"]).chunk(2)


def policy_forward(model, batch: dict, fused_linear: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """concatenated_forward in two passes, the mismatched pairs first and without gradient (they only set z0),
    so that backward spends nothing on them and the last forward before it is the one that DDP tracks."""
    (input_ids, kl_input_ids), (attention_mask, kl_attention_mask), (labels, kl_labels) = (
        batch[key].chunk(2) for key in ("input_ids", "attention_mask", "labels")
    )
    with torch.no_grad():
        kl_logits = forward_logits(model, kl_input_ids, kl_attention_mask, fused_linear)
        kl_logps = batch_logps(kl_logits, kl_labels)
    logits = forward_logits(model, input_ids, attention_mask, fused_linear)
    return batch_logps(logits, labels), kl_logps


def gather_from_ranks(values: torch.Tensor) -> torch.Tensor:
    """(..., n) on each process, n possibly different -> (..., total n) of all processes, in rank order."""
    if not dist.is_initialized():
        return values
    shares = [None] * dist.get_world_size()
    dist.all_gather_object(shares, values.tolist())
    return torch.cat([torch.tensor(share, dtype=values.dtype, device=values.device) for share in shares], dim=-1)


def compute_loss(model, ref_model, batch: dict, args: Args) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The mean loss of a micro-batch, and the sums over its examples of the logged metrics (with the counts of
    desirable and undesirable examples). z0 comes from the mismatched pairs of all processes' micro-batches."""
    policy_logps, policy_kl_logps = policy_forward(model, batch, args.fused_linear)
    with torch.no_grad():
        reference_logps, reference_kl_logps = concatenated_forward(ref_model, batch, args.fused_linear)
    policy_kl_logps, reference_kl_logps = gather_from_ranks(torch.stack([policy_kl_logps, reference_kl_logps]))
    desirable = batch["desirable"]
    losses, rewards, reference_point = kto_loss(
        policy_logps, reference_logps, desirable, policy_kl_logps, reference_kl_logps,
        args.beta, args.desirable_weight, args.undesirable_weight,
    )
    margins = torch.where(desirable, rewards - args.beta * reference_point, args.beta * reference_point - rewards)
    metrics = {
        "loss": losses.detach().sum(),
        "kl": reference_point * len(losses),
        "rewards/chosen": rewards[desirable].sum(),
        "rewards/rejected": rewards[~desirable].sum(),
        "rewards/margins": margins.sum(),
        "rewards/accuracies": (margins > 0).float().sum(),
        "logps/chosen": policy_logps.detach()[desirable].sum(),
        "logps/rejected": policy_logps.detach()[~desirable].sum(),
        "count/chosen": desirable.float().sum(),
        "count/rejected": (~desirable).float().sum(),
    }
    return losses.mean(), metrics


def mismatched_partners(group: list[int]) -> list[int]:
    """z0's pairs: in a micro-batch (all processes' examples, in order) example i gets the completion of example
    i + 1 mod m, so that none is paired with itself when m >= 2."""
    return group[1:] + group[:1]


def global_batches(num_rows: int, global_batch_size: int, seed: int):
    """Endless row indices of global batches: a seeded permutation per epoch, its last partial batch dropped."""
    for epoch in itertools.count():
        order = torch.randperm(num_rows, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
        for start in range(0, num_rows - global_batch_size + 1, global_batch_size):
            yield order[start : start + global_batch_size]


def mean_over_ranks(sums: dict[str, torch.Tensor], count: torch.Tensor) -> dict[str, float]:
    """Metric sums divided by the number of examples, both summed over all processes; a */chosen or */rejected
    metric by the number of desirable or undesirable examples, and left out when there are none."""
    keys = sorted(sums)
    totals = torch.stack([sums[key] for key in keys] + [count]).float()
    if dist.is_initialized():
        dist.all_reduce(totals)
    counts = {key.split("/")[-1]: totals[i] for i, key in enumerate(keys) if key.startswith("count/")}
    means = {}
    for i, key in enumerate(keys):
        divisor = counts.get(key.split("/")[-1], totals[-1])
        if not key.startswith("count/") and divisor > 0:
            means[key] = (totals[i] / divisor).item()
    return means


def eval_groups(num_rows: int, group_size: int, world_size: int) -> list[list[int]]:
    """Consecutive groups of row indices, each sharing one z0; a last group too small to be shared by the
    processes or to pair its examples (fewer than max(2, world_size) rows) joins the group before."""
    groups = [list(range(start, min(start + group_size, num_rows))) for start in range(0, num_rows, group_size)]
    if len(groups) > 1 and len(groups[-1]) < max(2, world_size):
        last = groups.pop()
        groups[-1] += last
    return groups


@torch.no_grad()
def evaluate(policy, ref_model, rows: list[dict], args: Args, pad_token_id, device, autocast) -> dict[str, float]:
    """eval/ metrics over all rows: groups of per_device_eval_batch_size x world_size rows share one z0 like a
    training micro-batch, each process taking every world_size-th row of a group."""
    policy.eval()
    sums, count = {}, torch.zeros((), device=device)
    rank, world_size = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    for group in eval_groups(len(rows), args.per_device_eval_batch_size * world_size, world_size):
        shifted = mismatched_partners(group)
        chunk, partners = [rows[i] for i in group[rank::world_size]], [rows[i] for i in shifted[rank::world_size]]
        batch = {k: v.to(device) for k, v in collate(chunk, partners, pad_token_id, args.max_length).items()}
        with autocast:
            _, metrics = compute_loss(policy, ref_model, batch, args)
        sums = {k: sums.get(k, 0) + v for k, v in metrics.items()}
        count += len(chunk)
    policy.train()
    return {f"eval/{k}": v for k, v in mean_over_ranks(sums, count).items()}


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
    desirable = sum(row["label"] for row in train_rows)
    warning = class_weight_warning(desirable, len(train_rows) - desirable, args.desirable_weight, args.undesirable_weight)
    if warning and is_main:
        print(f"warning: {warning}")
    check_args(args, world_size, len(eval_rows))

    # optimiser and schedule
    micro_batch_size, accumulation = args.per_device_train_batch_size, args.gradient_accumulation_steps
    global_batch_size = micro_batch_size * world_size * accumulation
    steps_per_epoch = len(train_rows) // global_batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"the train split has {len(train_rows)} examples, less than a global batch ({global_batch_size})")
    total_steps = args.max_steps if args.max_steps is not None else args.num_train_epochs * steps_per_epoch
    optimizer = torch.optim.AdamW(policy.parameters(), lr=args.learning_rate, weight_decay=0.0)
    scheduler = get_scheduler(args.lr_scheduler_type, optimizer, round(args.warmup_ratio * total_steps), total_steps)
    if is_main:
        print(f"{run_name}: {len(train_rows)} train ({desirable} desirable) and {len(eval_rows)} test examples; "
              f"{total_steps} steps of {global_batch_size} examples ({world_size} processes x {micro_batch_size} x "
              f"{accumulation}) on {device}")

    # training: each step takes one global batch; micro-batch m of process r is its slice m * world_size + r
    batches = global_batches(len(train_rows), global_batch_size, args.seed)
    sums, count = {}, torch.zeros((), device=device)
    train_metrics, eval_metrics = {}, {}
    progress = tqdm(range(1, total_steps + 1), disable=not is_main, dynamic_ncols=True)
    for step in progress:
        indices = next(batches)
        for micro_step in range(accumulation):
            group = indices[micro_step * world_size * micro_batch_size :][: world_size * micro_batch_size]
            shifted = mismatched_partners(group)  # one micro-batch of all processes' examples shares one z0
            start = rank * micro_batch_size
            rows = [train_rows[i] for i in group[start : start + micro_batch_size]]
            partners = [train_rows[i] for i in shifted[start : start + micro_batch_size]]
            batch = {k: v.to(device) for k, v in collate(rows, partners, pad_token_id, args.max_length).items()}
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
