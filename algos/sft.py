"""Supervised fine-tuning on the chosen completions (SFT), the baseline of every preference-learning paper.

Rafailov et al. 2023 (arXiv:2305.18290) call it Preferred-FT: maximum likelihood on the preferred completions of
the preference data, the rejected ones unused, no reference model. With logp(y) the summed completion log-probs
under the policy and |y| the completion's tokens, for a row (x, yw), averaged over the rows of the batch:
    loss = -logp(yw) / |yw|          (the completion's mean negative log-likelihood per token)
Data: prompt, chosen (strings or lists of messages; TRL's formats; a rejected column is ignored).

    python algos/sft.py                                                        # the bundled task, CPU, minutes
    torchrun --nproc_per_node 2 algos/sft.py --per-device-train-batch-size 4   # same global batch

Usage, metrics, implementation details, defaults and results: docs/algos/sft.md; conventions shared by every
script (tokens, batches, logging, checkpoints, scaling flags): docs/conventions.md.
"""

import itertools
import json
import math
import os
import random
import re
import secrets
import shutil
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from typing import Literal

import datasets
import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import transformers
import tyro
from datasets import Dataset, load_dataset
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_state_dict, set_state_dict
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

SIGNALS = []  # the signals received, see note_signal
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
    """where logs, metrics.jsonl, checkpoints and the trained model go; default runs/<run_name>"""
    overwrite: bool = False
    """if toggled, start afresh in a non-empty --output-dir (its contents are deleted once model and data load)"""
    resume: bool = False
    """if toggled, continue from the newest complete checkpoint in --output-dir"""
    save_steps: int = 500
    """write a checkpoint every this many optimiser steps (0: never); SIGTERM and Ctrl-C also write one"""
    save_total_limit: int = 2
    """keep only the newest this many checkpoints"""

    model_name_or_path: str = os.path.join(REPO, "benchmarks/arith/model")
    """the policy to train, and the frozen reference of the algorithms that have one: a hub id or a local directory"""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """dtype of the weights (and AdamW state); keep float32 and use --bf16 for mixed precision"""
    bf16: bool = False
    """if toggled, run forward passes under bfloat16 autocast (GPU)"""
    gradient_checkpointing: bool = False
    """if toggled, recompute activations in the backward pass to save memory"""
    disable_dropout: bool = True
    """if toggled, set every dropout of the loaded models to 0 (before LoRA, whose own dropout stays)"""
    fsdp: bool = False
    """if toggled, shard the policy (and any reference) over the processes with FSDP2 (each decoder layer, then
    the root) instead of replicating them with DDP; needs torchrun (--nproc_per_node 1 for one process)"""
    lora: bool = False
    """if toggled, train LoRA adapters (peft) instead of all weights; a reference is then the base model with
    the adapters disabled (no second copy), and the adapter is what gets saved"""
    lora_r: int = 16
    """the rank of the LoRA updates"""
    lora_alpha: int = 32
    """LoRA's scale numerator: the updates are scaled by lora_alpha / lora_r"""
    lora_dropout: float = 0.0
    """dropout on the input of the LoRA updates"""
    lora_target_modules: tuple[str, ...] = ("all-linear",)
    """the module names that get adapters (e.g. q_proj v_proj), or all-linear: every linear layer but lm_head
    (not the routed experts of mixture-of-experts models, whose weights are not linear layers)"""
    fused_linear: bool = False
    """if toggled, get the log-probs from the last hidden states and lm_head's weight chunk by chunk
    (kernels.linear_logprobs), never holding the full logits: less memory for large vocabularies"""

    dataset_name: str = os.path.join(REPO, "benchmarks/arith/data/pairs_{split}.jsonl")
    """a hub id or a local .json/.jsonl/.csv/.parquet file; `{split}` in a file name is replaced by the split
    (a local file without it has only a training split, so no evaluation)"""
    dataset_config: str | None = None
    """the hub dataset's configuration name, if it has several"""
    dataset_train_split: str = "train"
    """the split to train on"""
    dataset_test_split: str | None = "test"
    """the split to evaluate on; None to skip evaluation"""
    max_length: int = 1024
    """maximum tokens of prompt + completion (at most the model's positions); completions are cut at the end"""
    max_prompt_length: int = 512
    """maximum tokens of the prompt, cut according to --truncation-mode"""
    truncation_mode: Literal["keep_end", "keep_start"] = "keep_end"
    """which part of a too-long prompt to keep: its end (next to the completion; BOS stays) or its start"""

    learning_rate: float = 2e-4
    """AdamW learning rate after warm-up"""
    lr_scheduler_type: Literal["linear", "cosine", "constant_with_warmup"] = "linear"
    """the learning-rate schedule after warm-up"""
    warmup_ratio: float = 0.1
    """fraction of the optimiser steps spent warming the learning rate up linearly from 0"""
    max_grad_norm: float = 1.0
    """clip the global gradient norm to this (inf: no clipping)"""
    per_device_train_batch_size: int = 8
    """rows per process per micro-batch; global batch = this x processes x accumulation steps"""
    gradient_accumulation_steps: int = 1
    """micro-batches accumulated into one optimiser step"""
    per_device_eval_batch_size: int = 32
    """rows per process per evaluation batch"""
    num_train_epochs: int = 2
    """passes over the training split (ignored when --max-steps is set)"""
    max_steps: int | None = None
    """if set, train for exactly this many optimiser steps"""
    logging_steps: int = 10
    """log training metrics every this many optimiser steps"""
    eval_steps: int = 100
    """evaluate every this many optimiser steps (0: only at the end)"""



def sft_loss(policy_chosen_logps: torch.Tensor, chosen_lengths: torch.Tensor) -> torch.Tensor:
    """The SFT loss of each row: the mean negative log-likelihood per token of its chosen completion.

    Inputs are (B,) sums of completion-token log-probs and (B,) integer completion token counts. Returns the (B,)
    losses -policy_chosen / max(count, 1) (an empty completion has loss 0). Each row weighs the same whatever its
    length, so the loss of a global batch is the same however it is cut into micro-batches and processes (TRL's
    SFTTrainer weighs every token of the batch the same instead).
    """
    return -policy_chosen_logps / chosen_lengths.clamp(min=1)


def algorithm_checks(args: Args) -> list[tuple[str, bool, str]]:
    """This script's own flags for check_args: (flag, whether its value is valid, the valid range); SFT has none."""
    return []


COLUMNS = ["prompt", "chosen"]  # what a row needs (TRL's preference format; rejected is not used)


def tokenize_row(example: dict, tokenizer, args: Args) -> dict:
    """A preference row, standard or conversational -> token ids of prompt and chosen, with the flag that
    prepare_dataset counts: truncated, unknown (a token the tokenizer could not map)."""
    example = extract_prompt(example)
    prompt, *completions = text_columns(example, COLUMNS)
    if not isinstance(prompt, str):
        prompt, completions = apply_chat_template(tokenizer, prompt, completions)
    prompt_ids = tokenize_prompt(tokenizer, prompt)
    completions_ids = [tokenize_completion(tokenizer, text) for text in completions]
    lengths = [len(prompt_ids)] + [len(ids) for ids in completions_ids]
    prompt_ids, (chosen_ids,) = truncate(prompt_ids, completions_ids, tokenizer.bos_token_id, args)
    return {"prompt_ids": prompt_ids, "chosen_ids": chosen_ids,
            "truncated": [len(prompt_ids), len(chosen_ids)] != lengths,
            "unknown": tokenizer.unk_token_id in prompt_ids + chosen_ids}


def collate(rows: list[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """B rows -> B right-padded sequences: input_ids, attention_mask, labels (B, T),
    labels being the input ids on completion tokens and -100 on prompt and padding."""
    sequences, labels = [], []
    for row in rows:
        sequences.append(row["prompt_ids"] + row["chosen_ids"])
        labels.append([-100] * len(row["prompt_ids"]) + row["chosen_ids"])
    length = max(map(len, sequences))
    batch = {
        "input_ids": torch.tensor([s + [pad_token_id] * (length - len(s)) for s in sequences]),
        "attention_mask": torch.tensor([[1] * len(s) + [0] * (length - len(s)) for s in sequences]),
        "labels": torch.tensor([s + [-100] * (length - len(s)) for s in labels]),
    }
    return batch


def completion_lengths(labels: torch.Tensor) -> torch.Tensor:
    """(N,) number of completion tokens of each sequence: the tokens `batch_logps` sums over."""
    return (labels[:, 1:] != -100).sum(-1)


def compute_loss(model, batch: dict, args: Args) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The mean loss of a batch, and the sums over its rows of the logged metrics."""
    logits, aux_loss = forward_logits(model, batch["input_ids"], batch["attention_mask"], args.fused_linear)
    policy_chosen_logps, chosen_lengths = batch_logps(logits, batch["labels"]), completion_lengths(batch["labels"])
    losses = sft_loss(policy_chosen_logps, chosen_lengths)
    metrics = {
        "loss": losses.detach().sum(),
        "logps/chosen": policy_chosen_logps.detach().sum(),
        "lengths/chosen": chosen_lengths.float().sum(),
    }
    return losses.mean() + aux_loss, metrics


@torch.no_grad()
def evaluate(policy, rows: list[dict], args: Args, pad_token_id, device, autocast) -> dict[str, float]:
    """eval/ metrics over all rows, each process taking every world_size-th row."""
    policy.eval()
    sums, count = {}, torch.zeros((), device=device)
    rank, world_size = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    mine = rows[rank::world_size]
    for start in range(0, len(mine), args.per_device_eval_batch_size):
        chunk = mine[start : start + args.per_device_eval_batch_size]
        batch = {k: v.to(device) for k, v in collate(chunk, pad_token_id).items()}
        with autocast:
            _, metrics = compute_loss(policy, batch, args)
        sums = {k: sums.get(k, 0) + v for k, v in metrics.items()}
        count += len(chunk)
    policy.train()
    return {f"eval/{k}": v for k, v in mean_over_ranks(sums, count).items()}


# ---------------------------------------------------------------------------------------------------------------
# Plumbing: every function below is the same, byte for byte, in every script that uses it (tests/test_template.py)
# ---------------------------------------------------------------------------------------------------------------


def check_args(args: Args) -> None:
    """Every flag, checked before anything is loaded or written: one error naming each bad flag and its range."""
    at_least = {"per_device_train_batch_size": 1, "gradient_accumulation_steps": 1, "per_device_eval_batch_size": 1,
                "num_train_epochs": 1, "max_steps": 1, "logging_steps": 1, "eval_steps": 0, "save_steps": 0,
                "save_total_limit": 1, "max_length": 1, "max_prompt_length": 1, "lora_r": 1, "threads": 1}
    checks = [(name.replace("_", "-"), getattr(args, name) is None or getattr(args, name) >= low, f">= {low}")
              for name, low in at_least.items()]
    checks += [("learning-rate", args.learning_rate > 0, "> 0"), ("max-grad-norm", args.max_grad_norm > 0, "> 0"),
               ("warmup-ratio", 0 <= args.warmup_ratio <= 1, "in [0, 1]"),
               ("lora-dropout", 0 <= args.lora_dropout < 1, "in [0, 1)")] + algorithm_checks(args)
    problems = [f"--{flag} {getattr(args, flag.replace('-', '_'))}: must be {valid_range}"
                for flag, valid, valid_range in checks if not valid]
    path = args.model_name_or_path
    if (os.path.isabs(path) or path.startswith((".", "~")) or path.count("/") > 1) and not os.path.isdir(path):
        problems.append(f"--model-name-or-path: no model at {path} (a local directory, or a hub id like org/name)")
    if args.fsdp and "RANK" not in os.environ:
        problems.append("--fsdp shards over the processes torchrun starts: launch with torchrun (--nproc_per_node 1 "
                        "for one process)")
    if args.resume and args.overwrite:
        problems.append("--resume continues the run in --output-dir, --overwrite deletes it: choose one")
    elif args.resume and (args.output_dir is None or latest_checkpoint(args.output_dir) is None):
        problems.append(f"--resume: no complete checkpoint-<step> in --output-dir {args.output_dir} to continue from")
    elif args.resume:
        saved = json.load(open(os.path.join(latest_checkpoint(args.output_dir), "checkpoint.json")))["world_size"]
        if saved != int(os.environ.get("WORLD_SIZE", "1")):
            problems.append(f"--resume: the checkpoint was written by {saved} processes: resume with as many")
    elif args.output_dir and os.path.isdir(args.output_dir) and os.listdir(args.output_dir) and not args.overwrite:
        problems.append(f"--output-dir {args.output_dir} is not empty: pass --resume to continue its run, --overwrite "
                        "to start afresh (deleting it), or choose another directory")
    if problems:
        raise ValueError("invalid arguments:\n  " + "\n  ".join(problems))


def load_splits(name: str, config: str | None, train_split: str, test_split: str | None):
    """(train, test or None): splits of a hub dataset, or local .json/.jsonl/.csv/.parquet files where `{split}` in
    the name is replaced by the split (a file name without it is the training data only: no test)."""
    extension = os.path.splitext(name)[1]
    if extension not in (".json", ".jsonl", ".csv", ".parquet"):
        test = load_dataset(name, config, split=test_split) if test_split else None
        return load_dataset(name, config, split=train_split), test

    def load_file(split):
        path = name.replace("{split}", split)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no dataset file {path} (--dataset-name {name}, split {split})")
        if extension not in (".json", ".jsonl"):
            return load_dataset(extension[1:], data_files=path, split="train")
        records, kinds = read_json_records(path), {}
        try:
            return Dataset.from_list(records)
        except (TypeError, ValueError):  # pyarrow: a column whose rows hold values of different types
            for i, record in enumerate(records):
                for column, value in record.items():
                    if value is not None and kinds.setdefault(column, type(value)) is not type(value):
                        raise ValueError(f"{path}, row {i}: column {column!r} holds {value!r:.80}, a "
                                         f"{type(value).__name__}, where other rows hold a {kinds[column].__name__}")
            raise

    return load_file(train_split), (load_file(test_split) if test_split and "{split}" in name else None)


def read_json_records(path: str) -> list[dict]:
    """The rows of a JSON file (a list of objects) or a JSON Lines one (an object per line), with an error naming
    the file and line of invalid JSON."""
    with open(path, encoding="utf-8") as file:
        text = file.read()
    documents = [(1, text)] if text.lstrip().startswith("[") else enumerate(text.splitlines(), 1)
    records = []
    for first_line, document in documents:
        try:
            value = json.loads(document) if document.strip() else []
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}, line {first_line + error.lineno - 1}: invalid JSON ({error.msg})") from None
        records += value if isinstance(value, list) else [value]
    if not all(isinstance(record, dict) for record in records):
        raise ValueError(f"{path}: expected one JSON object per row")
    return records


def is_conversational(value) -> bool:
    """TRL's conversational format: a list of {"role": ..., "content": ...} messages."""
    return isinstance(value, list) and len(value) > 0 and isinstance(value[0], dict) and "role" in value[0]


def text_columns(example: dict, columns: list[str]) -> list:
    """The values of a row's text columns, checked: all strings, or all lists of messages."""
    values = [example[column] for column in columns]
    for column, value in zip(columns, values):
        if not isinstance(value, str) and not is_conversational(value):
            raise ValueError(f"column {column!r} holds {value!r:.80} ({type(value).__name__}): expected a string or a "
                             'list of {"role": ..., "content": ...} messages; fix or drop the row')
    if len({isinstance(value, str) for value in values}) > 1:
        raise ValueError(f"the columns {columns} mix strings and lists of messages: use one format")
    return values


def extract_prompt(example: dict) -> dict:
    """TRL's implicit-prompt format (chosen and rejected are whole conversations, no conversational prompt
    column): the leading messages they share become the prompt. Other rows are returned as they are."""
    chosen, rejected = example["chosen"], example.get("rejected")
    if not is_conversational(chosen) or not is_conversational(rejected) or is_conversational(example.get("prompt")):
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


def truncate(prompt_ids: list[int], completions_ids: list[list[int]], bos_token_id: int | None, args: Args):
    """Cut the prompt to --max-prompt-length tokens (keep_end keeps its end and its leading BOS, keep_start its
    start), then each completion at its end to fit --max-length. Raises if not even one completion token fits."""
    if len(prompt_ids) > args.max_prompt_length and args.truncation_mode == "keep_start":
        prompt_ids = prompt_ids[: args.max_prompt_length]
    elif len(prompt_ids) > args.max_prompt_length:
        bos = prompt_ids[:1] if bos_token_id is not None and prompt_ids[:1] == [bos_token_id] else []
        prompt_ids = bos + prompt_ids[len(prompt_ids) - args.max_prompt_length + len(bos) :]
    room = args.max_length - len(prompt_ids)
    if room < 1:
        raise ValueError(f"the prompt takes {len(prompt_ids)} tokens, which leaves no room for the completion "
                         f"within --max-length {args.max_length}: lower --max-prompt-length or raise --max-length")
    return prompt_ids, [ids[:room] for ids in completions_ids]


def prepare_dataset(dataset: Dataset, tokenizer, vocab_size: int, args: Args, name="the dataset") -> list[dict]:
    """Check a dataset and tokenize it into a list of `tokenize_row` rows (each with an `unknown` flag too)."""
    if len(dataset) == 0:
        raise ValueError(f"{name} has no rows: check --dataset-name and the split")
    missing = [column for column in COLUMNS if column not in dataset.column_names]
    if missing == ["prompt"] and is_conversational(dataset[0].get("chosen")):
        missing = []  # implicit prompt, see extract_prompt
    if missing:
        raise ValueError(f"{name} lacks the column(s) {missing}: it has {dataset.column_names}, and "
                         f"{os.path.basename(__file__)} needs {COLUMNS} (TRL's formats): rename the columns")
    rows = []
    for i, example in enumerate(dataset):
        try:
            row = tokenize_row(example, tokenizer, args)
        except ValueError as error:
            raise ValueError(f"{name}, row {i}: {error}") from error
        ids = [token for key, value in row.items() if key.endswith("_ids") for token in value]
        ids = [token for value in ids for token in (value if isinstance(value, list) else [value])]
        if max(ids) >= vocab_size:
            raise ValueError(f"{name}, row {i}: token id {max(ids)} is outside the model's vocabulary of "
                             f"{vocab_size}: the tokenizer does not belong to the model")
        rows.append({**row, "unknown": tokenizer.unk_token_id in ids})
    return rows


def forward_logits(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, fused_linear: bool = False):
    """(logits, aux_loss): the (N, T, V) logits, or with fused_linear the last hidden states (N, T, H) and what
    kernels.linear_logprobs needs to project them chunk by chunk (lm_head's weight and bias, the config's logit_scale
    and final_logit_softcapping), both from the model's own forward (so that DDP syncs and FSDP gathers); aux_loss is
    the router's load-balancing loss x router_aux_loss_coef when the config asks for it (output_router_logits,
    mixture-of-experts models), else 0."""
    no_logits = {"output_hidden_states": True, "logits_to_keep": torch.empty(0, dtype=torch.long, device=input_ids.device)}
    output = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **(no_logits if fused_linear else {}))
    unwrapped = model.module if isinstance(model, DDP) else model
    config, head = unwrapped.config, unwrapped.get_output_embeddings()
    aux_loss = config.router_aux_loss_coef * output.aux_loss if getattr(output, "aux_loss", None) is not None else 0.0
    if not fused_linear:
        return output.logits, aux_loss
    return (output.hidden_states[-1], {"weight": head.weight, "bias": getattr(head, "bias", None), "scale": getattr(
        config, "logit_scale", None), "softcap": getattr(config, "final_logit_softcapping", None)}), aux_loss


def shifted_logprobs(logits, labels: torch.Tensor) -> torch.Tensor:
    """(N, T-1) float32 log π(y_t | x, y_<t) of each label: the logits at position t predict token t + 1.
    `logits` as `forward_logits` returns them: a tensor, or (hidden, head) for kernels.linear_logprobs."""
    if isinstance(logits, tuple):
        hidden, head = logits
        return linear_logprobs(hidden[:, :-1], head["weight"], labels[:, 1:], bias=head["bias"], scale=head["scale"],
                               softcap=head["softcap"])
    return logprobs(logits[:, :-1], labels[:, 1:])


def batch_logps(logits, labels: torch.Tensor) -> torch.Tensor:
    """(N,) float32 sums of log π(y_t | x, y_<t) over the completion tokens. The logits at position t
    predict token t + 1, hence the shift; labels are -100 on prompt and padding, which count 0."""
    return shifted_logprobs(logits, labels).sum(-1)


def global_batches(num_rows: int, global_batch_size: int, seed: int):
    """Endless row indices of global batches: a seeded permutation per epoch, its last partial batch dropped."""
    for epoch in itertools.count():
        order = torch.randperm(num_rows, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
        for start in range(0, num_rows - global_batch_size + 1, global_batch_size):
            yield order[start : start + global_batch_size]


def lr_scheduler(name: str, optimizer, warmup_steps: int, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """The learning rate's multiplier at each step, as transformers' get_scheduler has it (without importing its
    trainer): linear warm-up over warmup_steps, then linear decay to 0 at total_steps, a half cosine to 0, or
    constant."""
    def multiplier(step: int) -> float:
        if step < warmup_steps:
            return float(step) / float(max(1, warmup_steps))
        progress = float(step - warmup_steps) / float(max(1, total_steps - warmup_steps))
        if name == "linear":
            return max(0.0, float(total_steps - step) / float(max(1, total_steps - warmup_steps)))
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress))) if name == "cosine" else 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, multiplier)


def mean_over_ranks(sums: dict[str, torch.Tensor], count: torch.Tensor) -> dict[str, float]:
    """Metric sums divided by the number of rows, both summed over all processes."""
    keys = sorted(sums)
    totals = torch.stack([sums[key] for key in keys] + [count]).float()
    if dist.is_initialized():
        dist.all_reduce(totals)
    return {key: (totals[i] / totals[-1]).item() for i, key in enumerate(keys)}


def load_model(args: Args, dtype: torch.dtype, device):
    """from_pretrained onto the device; with --disable-dropout every dropout set to 0 (a torch.nn.Dropout's p, an
    attention's float dropout rate), so that the policy trains (and samples) as the reference runs."""
    model = AutoModelForCausalLM.from_pretrained(args.model_name_or_path, dtype=dtype).to(device)
    for module in model.modules() if args.disable_dropout else []:
        for name, value in list(vars(module).items()):
            if isinstance(value, float) and ("dropout" in name or (name == "p" and isinstance(module, torch.nn.Dropout))):
                setattr(module, name, 0.0)
    return model


def lora_target_modules(names: tuple[str, ...]) -> str | list[str]:
    """--lora-target-modules for peft: "all-linear" is peft's shorthand only as a plain string."""
    return "all-linear" if names == ("all-linear",) else list(names)


@torch.no_grad()
def check_fused_linear(model, device) -> None:
    """Raise unless --fused-linear's log-probs (see forward_logits) equal those of the model's own logits, on a few
    tokens in eval mode (dropout would differ between the two passes)."""
    input_ids = torch.arange(8, device=device)[None] % model.get_output_embeddings().weight.shape[0]
    training = model.training
    model.eval()
    full, fused = (shifted_logprobs(forward_logits(model, input_ids, torch.ones_like(input_ids), fused_linear)[0],
                                    input_ids) for fused_linear in (False, True))
    model.train(training)
    if not torch.allclose(fused, full, rtol=1e-4, atol=1e-4):
        raise ValueError(f"--fused-linear: the logits of {type(model).__name__} are not what its last hidden states, "
                         "lm_head (weight, bias), logit_scale and final_logit_softcapping give (an adapter on lm_head, "
                         "another transform): run without --fused-linear")


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


def note_signal(signum: int, frame) -> None:
    """SIGTERM (a preempted job) or Ctrl-C: noted, so that the run checkpoints after its step and exits; a second
    one acts as usual."""
    SIGNALS.append(signum)
    signal.signal(signum, signal.SIG_DFL)


def latest_checkpoint(output_dir: str) -> str | None:
    """The newest complete checkpoint-<step> in output_dir (one being written is named checkpoint-<step>.tmp)."""
    names = os.listdir(output_dir) if os.path.isdir(output_dir) else []
    steps = [int(name.split("-")[1]) for name in names if re.fullmatch(r"checkpoint-\d+", name)]
    return os.path.join(output_dir, f"checkpoint-{max(steps)}") if steps else None


def trainable_state(policy, optimizer) -> tuple[dict, dict]:
    """The state dicts of the trainable weights (with --lora the adapter; a weight tied to a frozen one, as lm_head to
    the embeddings, is left out too) and of AdamW, as torch.distributed.checkpoint saves and loads them."""
    model_state, optimizer_state = get_state_dict(policy, optimizer, options=StateDictOptions(ignore_frozen_params=True))
    trainable = {name for name, parameter in policy.named_parameters() if parameter.requires_grad}
    return {key: value for key, value in model_state.items() if key in trainable}, optimizer_state


def save_checkpoint(output_dir: str, step: int, policy, optimizer, scheduler, state: dict, args: Args) -> None:
    """checkpoint-<step>/: the trainable weights and AdamW state through torch.distributed.checkpoint (one shard per
    process under FSDP), and each process's RNG states, scheduler and `state`. Written as checkpoint-<step>.tmp and
    renamed when complete; only the newest --save-total-limit are kept."""
    rank, world_size = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    path = os.path.join(output_dir, f"checkpoint-{step}")
    model_state, optimizer_state = trainable_state(policy, optimizer)
    dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=path + ".tmp",
             no_dist=not dist.is_initialized())
    rng = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
           "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}
    torch.save({**state, "rng": rng, "scheduler": scheduler.state_dict()}, os.path.join(path + ".tmp", f"rank{rank}.pt"))
    if dist.is_initialized():
        dist.barrier()
    if rank == 0:
        with open(os.path.join(path + ".tmp", "checkpoint.json"), "w") as file:
            json.dump({"step": step, "world_size": world_size, "args": asdict(args)}, file, indent=1)
        shutil.rmtree(path, ignore_errors=True)
        os.rename(path + ".tmp", path)
        steps = sorted(int(name.split("-")[1]) for name in os.listdir(output_dir) if re.fullmatch(r"checkpoint-\d+", name))
        for old in steps[: -args.save_total_limit]:
            shutil.rmtree(os.path.join(output_dir, f"checkpoint-{old}"))


def load_checkpoint(path: str, policy, optimizer, scheduler, device) -> dict:
    """Restore what save_checkpoint wrote into the policy, optimizer, scheduler and RNGs; return its `state`."""
    model_state, optimizer_state = trainable_state(policy, optimizer)
    dcp.load({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=path,  # raises if a key is missing
             no_dist=not dist.is_initialized())
    set_state_dict(policy, optimizer, model_state_dict=model_state, optim_state_dict=optimizer_state,
                   options=StateDictOptions(strict=False))  # the frozen weights are not in it
    rank = dist.get_rank() if dist.is_initialized() else 0
    state = torch.load(os.path.join(path, f"rank{rank}.pt"), map_location=device, weights_only=False)
    scheduler.load_state_dict(state.pop("scheduler"))
    rng = state.pop("rng")
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    torch.set_rng_state(rng["torch"])
    if rng["cuda"]:
        torch.cuda.set_rng_state_all(rng["cuda"])
    return state


if __name__ == "__main__":
    args = tyro.cli(Args)
    try:
        check_args(args)
    except ValueError as error:  # a bad flag: its message, not a traceback
        sys.exit(f"error: {error}")
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

    # run name: the random suffix keeps two runs started in the same second apart; rank 0's is everyone's
    dataset_stem = os.path.splitext(os.path.basename(args.dataset_name))[0].replace("{split}", "").strip("_-.")
    names = [f"{dataset_stem}__{args.exp_name}__{args.seed}__{int(time.time())}_{secrets.token_hex(2)}"]
    if dist.is_initialized():
        dist.broadcast_object_list(names)
    run_name = names[0]
    output_dir = args.output_dir or os.path.join("runs", run_name)

    # data, tokenized and checked before the models load
    tokenizer = AutoTokenizer.from_pretrained(args.model_name_or_path)
    pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    config = AutoConfig.from_pretrained(args.model_name_or_path)
    positions = getattr(config, "max_position_embeddings", None)
    if positions is not None and args.max_length > positions:
        if is_main:
            print(f"note: --max-length {args.max_length} is beyond the model's {positions} positions: using {positions}")
        args.max_length = positions
    train_data, test_data = load_splits(
        args.dataset_name, args.dataset_config, args.dataset_train_split, args.dataset_test_split
    )
    train_rows = prepare_dataset(train_data, tokenizer, config.vocab_size, args, "the train split")
    eval_rows = prepare_dataset(test_data, tokenizer, config.vocab_size, args, "the test split") if test_data else []
    for flag, what in (("truncated", "were truncated to --max-prompt-length / --max-length"),
                       ("unknown", "hold text the tokenizer maps to its unknown token"),
                       ("identical", "have chosen equal to rejected: they give no gradient")):
        count = sum(row.get(flag, False) for row in train_rows + eval_rows)
        if count and is_main:
            print(f"warning: {count} of {len(train_rows) + len(eval_rows)} rows {what}")
    if args.fsdp:
        check_fsdp_shares(len(eval_rows), world_size, args.per_device_eval_batch_size, "the test split")

    # model: the policy trains; SFT has no reference model; --fsdp shards the policy, DDP replicates it otherwise
    dtype = getattr(torch, args.dtype)
    policy = load_model(args, dtype, device)
    policy.train()
    if args.gradient_checkpointing:
        policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if args.lora:
        from peft import LoraConfig, get_peft_model

        policy = get_peft_model(policy, LoraConfig(
            r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
            target_modules=lora_target_modules(args.lora_target_modules), task_type="CAUSAL_LM",
        ))
    if args.fused_linear:
        check_fused_linear(policy, device)
    if args.fsdp:
        shard(policy)
    model = DDP(policy, device_ids=[local_rank] if use_cuda else None) if world_size > 1 and not args.fsdp else policy
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16)

    # optimiser and schedule
    micro_batch_size, accumulation = args.per_device_train_batch_size, args.gradient_accumulation_steps
    global_batch_size = micro_batch_size * world_size * accumulation
    steps_per_epoch = len(train_rows) // global_batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"the train split has {len(train_rows)} rows, less than a global batch ({global_batch_size})")
    total_steps = args.max_steps if args.max_steps is not None else args.num_train_epochs * steps_per_epoch
    optimizer = torch.optim.AdamW(policy.parameters(), lr=args.learning_rate, weight_decay=0.0)
    scheduler = lr_scheduler(args.lr_scheduler_type, optimizer, round(args.warmup_ratio * total_steps), total_steps)

    # output directory: written only now that model and data have loaded; --resume restores the newest checkpoint
    state = {"step": 0, "sums": {}, "count": torch.zeros((), device=device), "train_metrics": {}, "eval_metrics": {}}
    if args.resume:
        state = load_checkpoint(latest_checkpoint(output_dir), policy, optimizer, scheduler, device)
    if is_main:
        if args.overwrite:
            shutil.rmtree(output_dir, ignore_errors=True)
        os.makedirs(output_dir, exist_ok=True)
        if args.track:
            import wandb

            wandb.init(project=args.wandb_project_name, entity=args.wandb_entity, sync_tensorboard=True,
                       config=asdict(args), name=run_name, save_code=True)
        writer = SummaryWriter(output_dir, purge_step=state["step"] + 1 if args.resume else None)
        table = "\n".join(f"|{key}|{value}|" for key, value in asdict(args).items())
        writer.add_text("hyperparameters", f"|param|value|\n|-|-|\n{table}")
        metrics_path = os.path.join(output_dir, "metrics.jsonl")
        kept = [line for line in open(metrics_path) if json.loads(line)["step"] <= state["step"]] if args.resume else []
        metrics_file = open(metrics_path, "w")
        metrics_file.writelines(kept)
        print(f"{run_name}: {len(train_rows)} train and {len(eval_rows)} test rows; {total_steps} steps of "
              f"{global_batch_size} rows ({world_size} processes x {micro_batch_size} x {accumulation}) on {device}; "
              + (f"resuming after step {state['step']}" if args.resume else f"writing to {output_dir}"))
    if dist.is_initialized():
        dist.barrier()

    # training: each step takes one global batch; micro-batch m of process r is its slice m * world_size + r
    batches = itertools.islice(global_batches(len(train_rows), global_batch_size, args.seed), state["step"], None)
    sums, count, train_metrics, eval_metrics = state["sums"], state["count"], state["train_metrics"], state["eval_metrics"]
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, note_signal)
    progress = tqdm(range(state["step"] + 1, total_steps + 1), disable=not is_main, dynamic_ncols=True)
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
                    loss, metrics = compute_loss(model, batch, args)
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
            shown = {"loss": "train/loss", "logp": "train/logps/chosen"}
            progress.set_postfix({name: f"{train_metrics[key]:.3f}" for name, key in shown.items()})
        if eval_rows and ((args.eval_steps > 0 and step % args.eval_steps == 0) or step == total_steps):
            eval_metrics = evaluate(policy, eval_rows, args, pad_token_id, device, autocast)
            logs.update(eval_metrics)
            if is_main:
                progress.write(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in eval_metrics.items()))
        if logs and is_main:
            for key, value in logs.items():
                writer.add_scalar(key, value, step)
            metrics_file.write(json.dumps({"step": step, **logs}) + "\n")
            metrics_file.flush()
        stop = torch.tensor(float(len(SIGNALS)), device=device)
        if dist.is_initialized():
            dist.all_reduce(stop, op=dist.ReduceOp.MAX)  # every process stops after the same step
        if stop or (args.save_steps > 0 and step % args.save_steps == 0):
            state = {"step": step, "sums": sums, "count": count, "train_metrics": train_metrics, "eval_metrics": eval_metrics}
            save_checkpoint(output_dir, step, policy, optimizer, scheduler, state, args)
        if stop:
            if is_main:
                print(f"stopped by a signal after step {step} of {total_steps}, checkpoint saved: continue with "
                      f"--resume --output-dir {output_dir}")
            if dist.is_initialized():
                dist.destroy_process_group()
            sys.exit(128 + (SIGNALS or [signal.SIGTERM])[0])

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
            summary += f", eval/loss {eval_metrics['eval/loss']:.4f}"
        print(f"{run_name} done in {time.time() - start_time:.0f}s: {summary}; policy saved to {output_dir}")
        if args.lora:
            print(f"{output_dir} holds the LoRA adapter: with peft installed, from_pretrained loads base and adapter")
    if dist.is_initialized():
        dist.destroy_process_group()
