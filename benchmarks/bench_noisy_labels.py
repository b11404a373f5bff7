"""Robust DPO on the labels it is made for: the bundled pairs with a fraction ε of their labels flipped.

    pip install -r requirements.txt -r benchmarks/requirements.txt
    python benchmarks/bench_noisy_labels.py                        # ε = 0.2, seed 1: dpo.py, cDPO, rdpo.py (~15 min)
    python benchmarks/bench_noisy_labels.py --flip-rate 0.3 --seeds 1 2 3

The bundled pairs are exact (the chosen completion is right, the rejected one wrong). This writes a copy of them in
which each training pair, chosen by a seeded coin with probability --flip-rate, has chosen and rejected swapped (the
held-out split is left clean), and trains three scripts on it with their defaults otherwise: dpo.py (which fits the
noisy labels), dpo.py --label-smoothing ε (conservative DPO, which assumes the same flip rate) and rdpo.py --flip-rate ε
(the unbiased loss of Chowdhury et al. 2024). Each saved policy is scored by benchmarks/arith/evaluate.py, as in
bench_algos.py. Outputs under --out-dir: records/<run>.json (one per finished run, reused
unless --rerun), results.md (the table: mean ± standard error over seeds, beside dpo.py's default run on the clean
pairs from benchmarks/results/algos when it is there); runs/ (the flipped pairs, the policies and logs; not committed).
"""

import json
import random
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import tyro

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from benchmarks.arith.evaluate import mean_and_stderr  # noqa: E402
from benchmarks.bench_algos import evaluate, run  # noqa: E402

DATA = REPO / "benchmarks/arith/data"


@dataclass
class Args:
    flip_rate: float = 0.2
    """ε, the share of training pairs whose labels are flipped (and the rate the robust losses assume)"""
    flip_seed: int = 0
    """seed of the coin that picks the flipped pairs"""
    seeds: list[int] = field(default_factory=lambda: [1])
    """training seeds"""
    eval_k: int = 8
    """samples per held-out prompt at temperature 1"""
    threads: int = 1
    """torch CPU threads of each training run and evaluation"""
    jobs: int = 2
    """runs at a time (one per core of a 2-core machine)"""
    out_dir: str | None = None
    """default benchmarks/results/noisy_labels_<ε>"""
    rerun: bool = False
    """run again the runs that already have a record"""


def flip_labels(source: Path, target: Path, flip_rate: float, seed: int) -> int:
    """Copy a pairs file, swapping chosen and rejected in each row with probability flip_rate; the number flipped."""
    coin, flipped, lines = random.Random(seed), 0, []
    for line in source.read_text().splitlines():
        row = json.loads(line)
        if coin.random() < flip_rate:
            row["chosen"], row["rejected"] = row["rejected"], row["chosen"]
            flipped += 1
        lines.append(json.dumps(row))
    target.write_text("\n".join(lines) + "\n")
    return flipped


if __name__ == "__main__":
    args = tyro.cli(Args)
    if not 0 <= args.flip_rate < 0.5:
        sys.exit(f"error: --flip-rate {args.flip_rate}: must be in [0, 0.5)")
    out = Path(args.out_dir or REPO / "benchmarks/results" / f"noisy_labels_{args.flip_rate}")
    for name in ("records", "runs/data"):
        (out / name).mkdir(parents=True, exist_ok=True)
    data = out / "runs/data"
    flipped = flip_labels(DATA / "pairs_train.jsonl", data / "pairs_train.jsonl", args.flip_rate, args.flip_seed)
    shutil.copy(DATA / "pairs_test.jsonl", data / "pairs_test.jsonl")
    total = len((DATA / "pairs_train.jsonl").read_text().splitlines())
    print(f"{flipped} of {total} training pairs flipped ({flipped / total:.3f})")
    dataset = ["--dataset-name", str(data / "pairs_{split}.jsonl")]
    configs = {"dpo.py": ("dpo", []), f"dpo.py --label-smoothing {args.flip_rate} (cDPO)": (
        "dpo", ["--label-smoothing", str(args.flip_rate)]), f"rdpo.py --flip-rate {args.flip_rate}": (
        "rdpo", ["--flip-rate", str(args.flip_rate)])}
    def run_config(config) -> dict:
        label, seed = config
        script, flags = configs[label]
        name = f"{script}{'_' + '_'.join(flags).replace('--', '') if flags else ''}__seed{seed}"
        record = out / "records" / f"{name}.json"
        if not record.exists() or args.rerun:
            start = time.time()
            train = run(script, [*dataset, *flags, "--seed", str(seed)], out / "runs" / name, args.threads)
            scores = evaluate(out / "runs" / name, args.eval_k, args.threads, out / "runs" / f"{name}.eval.json")
            record.write_text(json.dumps({"label": label, "seed": seed, "train": train, "eval": scores,
                                          "seconds": time.time() - start, "jobs": args.jobs}, indent=1))
            print(f"{name}: greedy {scores['greedy_accuracy']:.3f}, sampled {scores['sampled_accuracy']:.3f}, "
                  f"KL {scores['kl']:.2f}", flush=True)
        return json.loads(record.read_text())

    records = {}
    with ThreadPoolExecutor(args.jobs) as pool:
        for result in pool.map(run_config, [(label, seed) for label in configs for seed in args.seeds]):
            records.setdefault(result["label"], []).append(result["eval"])
    clean = [json.loads(path.read_text())["eval"] for path in
             sorted((REPO / "benchmarks/results/algos/records").glob("dpo__beta2.0__seed*.json"))]
    if clean:
        records[f"dpo.py on the clean pairs (benchmarks/results/algos, {len(clean)} seeds)"] = clean

    def cell(runs, key):
        mean, stderr = mean_and_stderr([r[key] for r in runs])
        return f"{mean:.3f}" + (f" ± {stderr:.3f}" if len(runs) > 1 else "")

    lines = [f"Bundled pairs, {flipped} of {total} training labels flipped (ε = {args.flip_rate}, flip seed "
             f"{args.flip_seed}); held-out (clean): {next(iter(records.values()))[0]['n_prompts']} prompts, greedy and "
             f"{args.eval_k} samples each; mean ± standard error over seeds.", "",
             "| run | seeds | greedy acc | sampled acc | KL | ranking acc |", "|---|---|---|---|---|---|"]
    lines += [f"| {label} | {len(runs)} | {cell(runs, 'greedy_accuracy')} | {cell(runs, 'sampled_accuracy')} | "
              f"{cell(runs, 'kl')} | {cell(runs, 'ranking_accuracy')} |" for label, runs in records.items()]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
