"""Every algorithm on the bundled task, side by side: held-out accuracy, KL to the base model, speed.

    pip install -r requirements.txt -r benchmarks/requirements.txt
    python benchmarks/bench_algos.py --quick       # each script's defaults, 1 seed, 40 steps
    python benchmarks/bench_algos.py               # 3 seeds x 3 values of each main knob, and the variants (hours)
    python benchmarks/bench_algos.py --defaults-only   # 3 seeds of each script's defaults and variants
    python benchmarks/bench_algos.py --scripts dpo ipo --seeds 1 2
    python benchmarks/bench_algos.py --jobs 1      # one run at a time: the step rates of a CPU of its own

Each run is `python algos/<script>.py --seed S --<knob> V --output-dir ...` in its own process, --jobs at a time
(default 2, one per core of a 2-core machine: the table then says that the wall times and step rates were measured
with the CPU shared); its saved policy is then scored by benchmarks/arith/evaluate.py in its own process (greedy
and sampled accuracy on the held-out prompts, step correctness, length, KL(policy || base), ranking accuracy on
the held-out pairs). VARIANTS adds labelled runs of a script without an optional term (SimPO and PRO without their SFT
term, CPL without its BC term, Nash-MD judged by the verifier), at the default knob value, for every seed.
Outputs, under --out-dir: records/<run>.json (one per finished run: its training figures, logged metrics and
evaluation; committed, small), results.json (every run), results.md (the table: mean ± standard error over seeds),
defaults.md (each script's defaults: the change against the base model and against sft.py, for the README),
frontier.png (sampled accuracy against KL, one curve per algorithm over its knob, with standard errors, as in the DPO
paper's reward-KL frontier) and curves.png (training loss per step of each default run). A run whose record exists
is not run again (--rerun does): an interrupted sweep continues where it stopped, and --scripts can add to a table.
The defaults and variants of every script run first, then the rest of each knob sweep.
"""

import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import tyro

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from benchmarks.arith.evaluate import mean_and_stderr  # noqa: E402

# script -> (its main regularisation knob, the sweep of the full mode; the middle value is the default)
KNOBS = {
    "dpo": ("beta", [1.0, 2.0, 4.0]),
    "ipo": ("tau", [0.1, 0.2, 0.3]),
    "simpo": ("beta", [0.5, 1.0, 2.5]),
    "cpl": ("alpha", [0.05, 0.1, 0.2]),
    "step_dpo": ("beta", [1.0, 2.0, 4.0]),
    "kto": ("beta", [1.0, 2.0, 4.0]),
    "lipo": ("beta", [0.25, 0.5, 1.0]),
    "nash_md": ("tau", [0.05, 0.1, 0.3]),
    "sft": ("learning_rate", [1e-4, 2e-4, 5e-4]),
    "rdpo": ("flip_rate", [0.0, 0.0, 0.02]),  # ε cannot go below its default 0 (clean labels): one value above
    "npo": ("beta", [1.0, 2.0, 4.0]),
    "rpo": ("rpo_alpha", [4.0, 16.0, 64.0]),
    "ld_dpo": ("ld_alpha", [0.0, 0.5, 1.0]),  # α in [0, 1]: its ends, DPO (1) and the longer tails cut (0)
    "curry_dpo": ("beta", [2.0, 4.0, 8.0]),
    "pro": ("sft_weight", [0.01, 0.05, 0.25]),
    "orpo": ("orpo_lambda", [0.025, 0.1, 0.4]),
    "bco": ("reward_shift_decay", [0.9, 0.99, 1.0]),  # ρ in [0, 1]: 1 is δ = 0, the paper's BCE baseline
    "online_dpo": ("beta", [1.0, 2.0, 4.0]),
}
# script -> [(label, flags)]: the script without an optional term of its default (or with the exact judge instead of
# the learned one), run beside its defaults
VARIANTS = {
    "simpo": [("no SFT term", ["--sft-weight", "0"])],
    "cpl": [("no BC term", ["--bc-coef", "0"])],
    "pro": [("no SFT term", ["--sft-weight", "0"])],
    "nash_md": [("verifier judge", ["--judge", "verifier"])],
}


@dataclass
class Args:
    scripts: list[str] = field(default_factory=lambda: list(KNOBS))
    """which algorithms to run (those missing from algos/ are skipped)"""
    seeds: list[int] = field(default_factory=lambda: [1, 2, 3])
    """training seeds of the full mode"""
    quick: bool = False
    """each script's own defaults only, one seed, at most --quick-steps steps, a smaller evaluation"""
    quick_steps: int = 40
    """the step cap of --quick"""
    defaults_only: bool = False
    """each script's defaults and VARIANTS, every seed, without the rest of the knob sweep"""
    eval_k: int = 8
    """samples per held-out prompt at temperature 1 (--quick uses 4)"""
    out_dir: str | None = None
    """where records, results, table and plots go (policies under <out-dir>/runs/); default
    benchmarks/results/algos, or benchmarks/results/algos_quick with --quick"""
    rerun: bool = False
    """run again the runs that already have a record under <out-dir>/records/"""
    report_only: bool = False
    """run nothing: the tables and plots of the runs that have a record"""
    threads: int = 1
    """torch CPU threads of each training run and evaluation"""
    jobs: int = 2
    """runs at a time (training and evaluation); with more than 1 the wall times and step rates share the CPU"""


def run(script: str, extra: list[str], output_dir: Path, threads: int) -> dict:
    """One training run in its own process: wall time, steps, and peak resident memory (VmHWM)."""
    command = [sys.executable, str(REPO / "algos" / f"{script}.py"), "--output-dir", str(output_dir), "--overwrite",
               "--threads", str(threads), *extra]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
    start = time.time()
    log = open(output_dir.parent / f"{output_dir.name}.log", "w")
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    peak_kib = 0
    while process.poll() is None:
        try:
            status = Path(f"/proc/{process.pid}/status").read_text()
            peak_kib = max(peak_kib, int(status.split("VmHWM:")[1].split()[0]))
        except (FileNotFoundError, IndexError, ProcessLookupError):
            pass
        time.sleep(0.5)
    seconds = time.time() - start
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed; see {output_dir.parent / (output_dir.name + '.log')}")
    metrics = [json.loads(line) for line in open(output_dir / "metrics.jsonl")]
    steps = metrics[-1]["step"]
    return {"seconds": seconds, "steps": steps, "steps_per_second": steps / seconds,
            "peak_memory_mib": peak_kib / 1024, "metrics": metrics}


def evaluate(run_dir: Path, eval_k: int, threads: int, out: Path) -> dict:
    """evaluate.py on a saved policy, in its own process (its sampling seeds torch's global random generator);
    its JSON goes to `out`."""
    command = [sys.executable, str(REPO / "benchmarks/arith/evaluate.py"), str(run_dir), "--k", str(eval_k),
               "--threads", str(threads), "--out", str(out)]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    return json.loads(out.read_text())[str(run_dir)]


def mean_over_seeds(values: list[float]) -> str:
    """The mean over seeds, with its standard error when there are several."""
    mean, stderr = mean_and_stderr(values)
    return f"{mean:.3f}" + (f" ± {stderr:.3f}" if len(values) > 1 else "")


def table(results: list[dict], base: dict) -> str:
    lines = ["| script | knob | seeds | greedy acc | sampled acc | step acc | length | KL | ranking acc | wall s | "
             "steps/s | peak MiB |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|",
             f"| base model | - | - | {base['greedy_accuracy']:.3f} | {base['sampled_accuracy']:.3f} | "
             f"{base['sampled_step_accuracy']:.3f} | {base['mean_length']:.1f} | 0 | {base['ranking_accuracy']:.3f} "
             "| - | - | - |"]
    groups = {}
    for r in results:
        groups.setdefault((r["script"], r["variant"], r["knob"], r["value"]), []).append(r)
    for (script, variant, knob, value), runs in groups.items():
        def cell(key):
            return mean_over_seeds([r["eval"][key] for r in runs])
        knob_text = f"{knob}={value}" if value is not None else "defaults"
        name = f"{script} ({variant})" if variant else script
        lines.append(f"| {name} | {knob_text} | {len(runs)} | {cell('greedy_accuracy')} | {cell('sampled_accuracy')} | "
                     f"{cell('sampled_step_accuracy')} | {statistics.mean(r['eval']['mean_length'] for r in runs):.1f} | "
                     f"{cell('kl')} | {cell('ranking_accuracy')} | "
                     f"{statistics.mean(r['train']['seconds'] for r in runs):.0f} | "
                     f"{statistics.mean(r['train']['steps_per_second'] for r in runs):.2f} | "
                     f"{max(r['train']['peak_memory_mib'] for r in runs):.0f} |")
    return "\n".join(lines) + "\n"


def defaults_table(results: list[dict], base: dict) -> str:
    """One row per script at its defaults (and per variant): mean ± standard error over seeds, and the change of
    sampled accuracy against the base model and against sft.py's defaults (the standard errors combined)."""
    groups = {}
    for r in results:
        if r["is_default"] or r["variant"]:
            groups.setdefault((r["script"], r["variant"]), []).append(r)
    sft = [r["eval"]["sampled_accuracy"] for r in groups.get(("sft", None), [])]
    lines = ["| script | seeds | greedy | sampled | sampled, change | against sft.py | KL | ranking acc | train s |",
             "|---|---|---|---|---|---|---|---|---|",
             f"| base model | - | {base['greedy_accuracy']:.3f} | {base['sampled_accuracy']:.3f} | | | 0 | "
             f"{base['ranking_accuracy']:.3f} | |"]
    for (script, variant), runs in groups.items():
        sampled = [r["eval"]["sampled_accuracy"] for r in runs]
        mean, stderr = mean_and_stderr(sampled)
        change = f"{100 * (mean - base['sampled_accuracy']):+.1f} ± {100 * stderr:.1f} pts"
        against = "" if script == "sft" or not sft else \
            f"{100 * (mean - mean_and_stderr(sft)[0]):+.1f} ± {100 * (stderr**2 + mean_and_stderr(sft)[1]**2) ** 0.5:.1f} pts"
        name = f"{script}.py" + (f" ({variant})" if variant else "")
        cells = [mean_over_seeds([r["eval"][key] for r in runs]) for key in ("greedy_accuracy", "sampled_accuracy")]
        lines.append(f"| {name} | {len(runs)} | {cells[0]} | {cells[1]} | {change} | {against} | "
                     f"{mean_over_seeds([r['eval']['kl'] for r in runs])} | "
                     f"{mean_over_seeds([r['eval']['ranking_accuracy'] for r in runs])} | "
                     f"{statistics.mean(r['train']['seconds'] for r in runs):.0f} |")
    return "\n".join(lines) + "\n"


def plots(results: list[dict], base: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.5))
    ax.scatter([0], [base["sampled_accuracy"]], color="black", marker="*", s=120, label="base model", zorder=3)
    off_plot = []  # collapsed runs (KL > 5): named in the title, so that they do not squeeze the rest
    for i, (script, variant) in enumerate(dict.fromkeys((r["script"], r["variant"]) for r in results)):
        points = {}
        for r in results:
            if (r["script"], r["variant"]) == (script, variant):
                points.setdefault(r["value"], []).append((r["eval"]["kl"], r["eval"]["sampled_accuracy"]))
        xy = sorted((statistics.mean(p[0] for p in v), statistics.mean(p[1] for p in v),
                     statistics.stdev(p[1] for p in v) / len(v) ** 0.5 if len(v) > 1 else 0.0) for v in points.values())
        name = f"{script} ({variant})" if variant else script
        off_plot += [f"{name}: KL {x:.0f}, accuracy {y:.2f}" for x, y, _ in xy if x > 5]
        xy = [p for p in xy if p[0] <= 5]
        if xy:
            ax.errorbar([p[0] for p in xy], [p[1] for p in xy], yerr=[p[2] for p in xy], marker="osD^v"[i // 10],
                        linestyle="-" if i < 10 else "--", capsize=2, label=name)
    ax.set_xlabel("KL(policy || base), nats per completion")
    ax.set_ylabel("held-out accuracy of samples at temperature 1")
    if off_plot:
        ax.set_title("off the plot: " + "; ".join(off_plot), fontsize=8)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1, 0.5))
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "frontier.png", dpi=120)

    defaults = [r for r in results if r["is_default"] and r["seed"] == min(x["seed"] for x in results)]
    fig, axes = plt.subplots(1, len(defaults), figsize=(3 * len(defaults), 3), squeeze=False)
    for ax, r in zip(axes[0], defaults):
        rows = [m for m in r["train"]["metrics"] if "train/loss" in m]
        ax.plot([m["step"] for m in rows], [m["train/loss"] for m in rows])
        ax.set_title(r["script"], fontsize=9)
        ax.set_xlabel("step")
    axes[0][0].set_ylabel("train/loss")
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=120)


if __name__ == "__main__":
    args = tyro.cli(Args)
    out = Path(args.out_dir or REPO / "benchmarks/results" / ("algos_quick" if args.quick else "algos"))
    (out / "runs").mkdir(parents=True, exist_ok=True)
    (out / "records").mkdir(exist_ok=True)
    eval_k = 4 if args.quick else args.eval_k
    start = time.time()
    base_record = out / "records" / "base_model.json"
    if base_record.exists() and (args.report_only or not args.rerun):
        base = json.loads(base_record.read_text())
    else:
        base = evaluate(REPO / "benchmarks/arith/model", eval_k, args.threads, out / "runs" / "base_model.eval.json")
        base_record.write_text(json.dumps(base, indent=1))
    print(f"base model: greedy {base['greedy_accuracy']:.3f}, sampled {base['sampled_accuracy']:.3f}")
    defaults, sweeps = [], []  # (script, variant label, flags, knob, value, seed)
    for script in args.scripts:
        if not (REPO / "algos" / f"{script}.py").exists():
            print(f"{script}: skipped (no algos/{script}.py)")
            continue
        knob, values = KNOBS[script]
        seeds = [1] if args.quick else args.seeds
        default = values[len(values) // 2]
        defaults += [(script, None, [], knob, None if args.quick else default, seed) for seed in seeds]
        defaults += [(script, label, flags, knob, None, seed) for label, flags in VARIANTS.get(script, [])
                     for seed in seeds]
        sweeps += [(script, None, [], knob, value, seed) for value in ([] if args.quick or args.defaults_only else values)
                   for seed in seeds if value != default]

    def run_config(config) -> dict:
        script, variant, flags, knob, value, seed = config
        label = f"{knob}{value}" if value is not None else (variant or "defaults").replace(" ", "_")
        name = f"{script}__{label}__seed{seed}"
        record = out / "records" / f"{name}.json"
        is_default = variant is None and (value is None or value == KNOBS[script][1][len(KNOBS[script][1]) // 2])
        if record.exists() and not args.rerun:  # whether it is the default is KNOBS's say now, not when it ran
            return {**json.loads(record.read_text()), "is_default": is_default}
        if args.report_only:
            return None
        extra = ["--seed", str(seed), *flags]
        extra += ["--max-steps", str(args.quick_steps)] if args.quick else []
        extra += [f"--{knob.replace('_', '-')}", str(value)] if value is not None else []
        train = run(script, extra, out / "runs" / name, args.threads)
        eval_start = time.time()
        scores = evaluate(out / "runs" / name, eval_k, args.threads, out / "runs" / f"{name}.eval.json")
        print(f"{name}: {train['seconds']:.0f}s, greedy {scores['greedy_accuracy']:.3f}, "
              f"sampled {scores['sampled_accuracy']:.3f}, KL {scores['kl']:.2f}", flush=True)
        result = {"script": script, "variant": variant, "knob": knob, "value": value, "seed": seed, "train": train,
                  "eval_seconds": time.time() - eval_start, "eval": scores, "is_default": is_default,
                  "jobs": args.jobs}
        record.write_text(json.dumps(result, indent=1))
        return result

    results = []
    with ThreadPoolExecutor(args.jobs) as pool:
        for result in pool.map(run_config, defaults + sweeps):
            if result is None:
                continue
            results.append(result)
            (out / "results.json").write_text(json.dumps({"base": base, "quick": args.quick, "runs": results}, indent=1))
    results.sort(key=lambda r: (list(KNOBS).index(r["script"]), r["variant"] or "", r["value"] or 0, r["seed"]))
    text = table(results, base)
    compute = sum(r["train"]["seconds"] + r.get("eval_seconds", 0) for r in results) / 60
    mode = ("--quick (defaults, 1 seed, " + str(args.quick_steps) + " steps max)" if args.quick else
            "defaults and variants" if args.defaults_only else "full sweep")
    header = (f"Bundled task, {mode}; "
              f"evaluation: {base['n_prompts']} held-out prompts, greedy and {eval_k} samples each; mean ± standard "
              f"error over seeds; {len(results)} runs, {compute:.0f} min of training and evaluation in all (this "
              f"invocation {(time.time() - start) / 60:.1f} min) on {os.cpu_count()} CPU cores, "
              f"{max(r.get('jobs', 1) for r in results)} runs at a time"
              f"{' (wall times and step rates measured with the CPU shared)' if max(r.get('jobs', 1) for r in results) > 1 else ''}\n\n")
    (out / "results.md").write_text(header + text)
    (out / "defaults.md").write_text(header + defaults_table(results, base))
    print(header + text)
    plots(results, base, out)
