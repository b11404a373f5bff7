"""Evaluate saved policies on the held-out arithmetic problems (benchmarks/arith/data/eval.jsonl).

    python benchmarks/arith/evaluate.py benchmarks/arith/model runs/dpo/model [--k 8] [--out results.json]

Per policy: accuracy of the final answer under greedy decoding and under pure sampling at
temperature 1 (mean over k samples per prompt), the fraction of correct steps (same samples), the
mean completion length in tokens (= characters, EOS excluded), and a Monte Carlo estimate of
KL(policy || base): for completions y sampled from the policy, the mean of
sum_t [log pi(y_t | x, y_<t) - log base(y_t | x, y_<t)] over the completion tokens including EOS.
Sampling masks the special tokens other than EOS (which a trained policy all but never samples).
The base model's tokenizer is used for every policy (they share its vocabulary).

Standard errors (`*_stderr`) are over prompts: the k samples of a prompt are not independent (one hard prompt
fails all of them), so each sampled metric and the KL are first averaged per prompt, and the standard error is
that of the mean of the n per-prompt values (the cluster-robust one for equal cluster sizes).

Ranking accuracy on the held-out preference pairs (benchmarks/arith/data/pairs_test.jsonl), as in Chen et al.
2024, "Preference Learning Algorithms Do Not Learn Preference Rankings" (arXiv:2405.19534): the fraction of pairs
with log π(chosen) > log π(rejected), summed over the completion tokens (the prompt tokenized with BOS, each
completion with EOS, as the training scripts do), and the same with log-probs averaged over the completion's tokens
(the reference-free, length-normalised form of SimPO). Ties count as wrong.
Writes RUN_DIR/eval.json for each policy, or all results to one file with --out.
"""

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import tyro
from transformers import AutoModelForCausalLM, AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # so that it also runs as a script
from benchmarks.arith import task

HERE = Path(__file__).resolve().parent
MAX_NEW_TOKENS = 72  # the longest correct completion has 54 characters


@dataclass
class Generation:
    texts: list[str]  # completions, without EOS
    ids: torch.Tensor  # (batch, prompt_len + new) left-padded prompts, then the new tokens
    mask: torch.Tensor  # 1 on real prompt tokens and on completion tokens up to and including EOS
    prompt_len: int


@torch.no_grad()
def generate_batch(model, tokenizer, prompts: list[str], temperature: float) -> Generation:
    """Greedy decoding at temperature 0, else pure sampling (no top-k, no top-p). The special
    tokens other than EOS are masked: a completion is plain text that tokenises back to itself."""
    enc = tokenizer(prompts, padding=True, padding_side="left", return_tensors="pt")
    sampling = dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0) if temperature > 0 else dict(do_sample=False)
    suppress = [i for i in tokenizer.all_special_ids if i != tokenizer.eos_token_id]
    ids = model.generate(**enc, **sampling, max_new_tokens=MAX_NEW_TOKENS, suppress_tokens=suppress,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    new = ids[:, enc.input_ids.shape[1]:]
    is_eos = new == tokenizer.eos_token_id
    # completion tokens: everything before the first EOS, and the EOS itself
    completion_mask = (is_eos.cumsum(1) - is_eos.long()) == 0
    texts = [tokenizer.decode(row[m & ~e]) for row, m, e in zip(new, completion_mask, is_eos)]
    return Generation(texts, ids, torch.cat([enc.attention_mask, completion_mask.long()], 1), enc.input_ids.shape[1])


def generate(model, tokenizer, prompts: list[str], temperature: float, batch_size: int = 512) -> list[str]:
    return [t for i in range(0, len(prompts), batch_size)
            for t in generate_batch(model, tokenizer, prompts[i:i + batch_size], temperature).texts]


@torch.no_grad()
def completion_logprobs(model, gen: Generation) -> torch.Tensor:
    """(batch,) summed log-probs of the completion tokens of `gen` under `model`."""
    position_ids = (gen.mask.cumsum(1) - 1).clamp(min=0)
    logits = model(input_ids=gen.ids, attention_mask=gen.mask, position_ids=position_ids).logits.float()
    logp = logits[:, gen.prompt_len - 1:-1].log_softmax(-1).gather(-1, gen.ids[:, gen.prompt_len:, None])[..., 0]
    return (logp * gen.mask[:, gen.prompt_len:]).sum(1)


def mean_and_stderr(values: list[float]) -> tuple[float, float]:
    """The mean of independent values and its standard error, std / sqrt(n) (0 for a single value)."""
    n = len(values)
    mean = sum(values) / n
    variance = sum((v - mean) ** 2 for v in values) / (n - 1) if n > 1 else 0.0
    return mean, (variance / n) ** 0.5


@torch.no_grad()
def ranking_accuracy(model, tokenizer, pairs_file: str, batch_size: int = 256) -> dict:
    """Fraction of held-out pairs the policy ranks right: summed and per-token-averaged completion log-probs."""
    pairs = [json.loads(line) for line in open(pairs_file)]
    sums, means = [], []
    for key in ("chosen", "rejected"):
        sequences, starts = [], []
        for pair in pairs:
            prompt = [tokenizer.bos_token_id] + tokenizer(pair["prompt"], add_special_tokens=False).input_ids
            completion = tokenizer(pair[key], add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
            sequences.append(prompt + completion)
            starts.append(len(prompt))
        side_sums, side_means = [], []
        for i in range(0, len(sequences), batch_size):
            batch, first = sequences[i:i + batch_size], starts[i:i + batch_size]
            width = max(map(len, batch))
            ids = torch.tensor([s + [tokenizer.pad_token_id] * (width - len(s)) for s in batch])
            mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in batch])
            logp = model(input_ids=ids, attention_mask=mask).logits.float()[:, :-1].log_softmax(-1)
            logp = logp.gather(-1, ids[:, 1:, None])[..., 0]
            positions = torch.arange(1, width)[None]
            completion = (positions >= torch.tensor(first)[:, None]) & (mask[:, 1:] == 1)
            total = (logp * completion).sum(1)
            side_sums += total.tolist()
            side_means += (total / completion.sum(1)).tolist()
        sums.append(side_sums)
        means.append(side_means)
    summed = [float(c > r) for c, r in zip(*sums)]
    averaged = [float(c > r) for c, r in zip(*means)]
    (summed_accuracy, summed_stderr), (averaged_accuracy, averaged_stderr) = map(mean_and_stderr, (summed, averaged))
    return {"ranking_accuracy": summed_accuracy, "ranking_accuracy_stderr": summed_stderr,
            "ranking_accuracy_length_normalised": averaged_accuracy,
            "ranking_accuracy_length_normalised_stderr": averaged_stderr, "n_pairs": len(pairs)}


def evaluate_policy(model_dir: str, base_dir: str = str(HERE / "model"), eval_file: str = str(HERE / "data" / "eval.jsonl"),
                    k: int = 8, batch_size: int = 512, seed: int = 0,
                    pairs_file: str = str(HERE / "data" / "pairs_test.jsonl")) -> dict:
    """Held-out metrics of one saved policy (see the module docstring)."""
    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    policy = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    prompts = [json.loads(line)["prompt"] for line in open(eval_file)]

    greedy = [task.grade(p, c) for p, c in zip(prompts, generate(policy, tokenizer, prompts, 0.0, batch_size))]
    sampled_prompts = [p for p in prompts for _ in range(k)]
    sampled, lengths, kls = [], [], []
    for i in range(0, len(sampled_prompts), batch_size):
        gen = generate_batch(policy, tokenizer, sampled_prompts[i:i + batch_size], 1.0)
        sampled += [task.grade(p, c) for p, c in zip(sampled_prompts[i:i + batch_size], gen.texts)]
        lengths += [len(tokenizer(t, add_special_tokens=False).input_ids) for t in gen.texts]
        kls.append(completion_logprobs(policy, gen) - completion_logprobs(base, gen))
    kl = torch.cat(kls).tolist()

    def per_prompt(values: list[float]) -> list[float]:
        """The mean over each prompt's k samples (sampled_prompts repeats each prompt k times in a row)."""
        return [sum(values[i:i + k]) / k for i in range(0, len(values), k)]

    metrics = {
        "greedy_accuracy": [float(g.answer_correct) for g in greedy],
        "sampled_accuracy": per_prompt([float(g.answer_correct) for g in sampled]),
        "sampled_step_accuracy": per_prompt([g.correct_steps / g.total_steps for g in sampled]),
        "greedy_step_accuracy": [g.correct_steps / g.total_steps for g in greedy],
        "mean_length": per_prompt([float(n) for n in lengths]),
        "kl": per_prompt(kl),
    }
    results = {}
    for name, values in metrics.items():
        results[name], results[f"{name}_stderr"] = mean_and_stderr(values)
    results.update(ranking_accuracy(policy, tokenizer, pairs_file) if pairs_file else {})
    return {**results, "n_prompts": len(prompts), "k": k}


@dataclass
class Args:
    run_dirs: tyro.conf.Positional[list[str]]
    """saved policies (save_pretrained directories)"""
    base: str = str(HERE / "model")
    """the reference for the KL and the source of the tokenizer"""
    eval_file: str = str(HERE / "data" / "eval.jsonl")
    """held-out prompts (JSONL with a `prompt` column)"""
    k: int = 8
    """samples per prompt at temperature 1"""
    batch_size: int = 512
    """prompts generated in parallel"""
    seed: int = 0
    """seed of the sampling"""
    threads: int = 1
    """torch CPU threads (the figures depend on it through rounding)"""
    pairs_file: str = str(HERE / "data" / "pairs_test.jsonl")
    """held-out preference pairs for the ranking accuracy (prompt, chosen, rejected)"""
    out: str | None = None
    """one JSON file for all results; default: RUN_DIR/eval.json for each policy"""


COLUMNS = ["greedy_accuracy", "sampled_accuracy", "sampled_step_accuracy", "mean_length", "kl", "ranking_accuracy",
           "ranking_accuracy_length_normalised"]

if __name__ == "__main__":
    args = tyro.cli(Args)
    torch.set_num_threads(args.threads)
    results = {}
    for run_dir in args.run_dirs:
        results[run_dir] = evaluate_policy(run_dir, args.base, args.eval_file, args.k, args.batch_size, args.seed,
                                           args.pairs_file)
        if args.out is None:
            Path(run_dir, "eval.json").write_text(json.dumps(results[run_dir], indent=2) + "\n")
    if args.out is not None:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    width = max(len(r) for r in results)
    print(f"{'run':<{width}}  " + "  ".join(f"{c:>32}" for c in COLUMNS) + "   (mean ± standard error)")
    for run_dir, r in results.items():
        print(f"{run_dir:<{width}}  " + "  ".join(f"{r[c]:>24.3f} ± {r[c + '_stderr']:.3f}" for c in COLUMNS))
