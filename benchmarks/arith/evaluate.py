"""Evaluate saved policies on the held-out arithmetic problems (benchmarks/arith/data/eval.jsonl).

    python benchmarks/arith/evaluate.py benchmarks/arith/model runs/dpo/model [--k 8] [--out results.json]

Per policy: accuracy of the final answer under greedy decoding and under pure sampling at
temperature 1 (mean over k samples per prompt), the fraction of correct steps (same samples), the
mean completion length in tokens (= characters, EOS excluded), and a Monte Carlo estimate of
KL(policy || base): for completions y sampled from the policy, the mean of
sum_t [log pi(y_t | x, y_<t) - log base(y_t | x, y_<t)] over the completion tokens including EOS.
Sampling masks the special tokens other than EOS (which a trained policy all but never samples).
The base model's tokenizer is used for every policy (they share its vocabulary).
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


def evaluate_policy(model_dir: str, base_dir: str = str(HERE / "model"), eval_file: str = str(HERE / "data" / "eval.jsonl"),
                    k: int = 8, batch_size: int = 512, seed: int = 0) -> dict:
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
    kl = torch.cat(kls)
    return {
        "greedy_accuracy": sum(g.answer_correct for g in greedy) / len(greedy),
        "sampled_accuracy": sum(g.answer_correct for g in sampled) / len(sampled),
        "sampled_step_accuracy": sum(g.correct_steps / g.total_steps for g in sampled) / len(sampled),
        "greedy_step_accuracy": sum(g.correct_steps / g.total_steps for g in greedy) / len(greedy),
        "mean_length": sum(lengths) / len(lengths),
        "kl": kl.mean().item(),
        "kl_stderr": (kl.std() / len(kl) ** 0.5).item(),
        "n_prompts": len(prompts),
        "k": k,
    }


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
    out: str | None = None
    """one JSON file for all results; default: RUN_DIR/eval.json for each policy"""


COLUMNS = ["greedy_accuracy", "sampled_accuracy", "sampled_step_accuracy", "mean_length", "kl"]

if __name__ == "__main__":
    args = tyro.cli(Args)
    torch.set_num_threads(args.threads)
    results = {}
    for run_dir in args.run_dirs:
        results[run_dir] = evaluate_policy(run_dir, args.base, args.eval_file, args.k, args.batch_size, args.seed)
        if args.out is None:
            Path(run_dir, "eval.json").write_text(json.dumps(results[run_dir], indent=2) + "\n")
    if args.out is not None:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    width = max(len(r) for r in results)
    print(f"{'run':<{width}}  " + "  ".join(f"{c:>21}" for c in COLUMNS))
    for run_dir, r in results.items():
        print(f"{run_dir:<{width}}  " + "  ".join(f"{r[c]:>21.3f}" for c in COLUMNS))
