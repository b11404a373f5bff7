"""Forward+backward time and peak extra memory of per-token log-probs, side by side.

    pip install -r requirements.txt -r benchmarks/requirements.txt
    python benchmarks/bench_kernels.py            # CUDA: the full sweep; CPU: small shapes, PyTorch paths
    python benchmarks/bench_kernels.py --shapes 8192x128256 --dtypes bf16 --no-linear

Part 1, logits -> log-probs (same per-token semantics everywhere, a random upstream gradient per token):
- `kernels`: `kernels.logprobs` (Triton on CUDA, the chunked PyTorch path on CPU);
- `eager`: `log_softmax(logits.float()).gather(labels)`;
- `compile`: `torch.compile` of `eager`;
- `liger`: Liger-Kernel's cross entropy with `reduction="none"`, negated (CUDA, where installed).
Columns: ms per forward+backward (median), effective TB/s on the minimum-traffic basis (3 x logits
bytes: read in forward, read again and write the gradient in backward), speed-up over eager, peak
memory beyond the inputs (CUDA only), and the largest gradient error against float64 on the first
rows (a method that is fast but wrong shows here).

Part 2, hidden states + output projection -> log-probs (`--linear`, hidden size `--hidden`):
- `kernels`: `kernels.linear_logprobs` (chunked, logits recomputed in backward);
- `unfused`: `kernels.logprobs(hidden @ weight.T, labels)`;
- `matmuls`: the bare output-projection matmuls alone (forward, and the two of backward): the floor;
- `liger`: Liger-Kernel's fused linear cross entropy with `reduction="none"` (CUDA, where installed).

Writes Markdown, JSON and a plot per part under benchmarks/results/.
"""

import json
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import tyro

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, for `kernels`
from kernels import linear_logprobs, logprobs, logprobs_reference


@dataclass
class Args:
    shapes: list[str] = field(default_factory=list)
    """(tokens)x(vocab) shapes; default: a sweep up to 16384x151936 on CUDA, small shapes on CPU"""
    dtypes: list[str] = field(default_factory=lambda: ["bf16", "fp32"])
    """dtypes to run: bf16, fp16, fp32"""
    linear: bool = True
    """also run part 2: hidden states and output projection (`linear_logprobs`)"""
    hidden: int = 0
    """hidden size for part 2; 0 means 4096 on CUDA and 256 on CPU"""
    repeats: int = 10
    """timed repetitions per measurement (after warm-up); the median is reported"""
    out_dir: str = "benchmarks/results"
    """where the tables, JSON and plots go"""


DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
CUDA_SHAPES = ["4096x32000", "8192x32000", "4096x128256", "8192x128256", "16384x128256", "16384x151936"]
CPU_SHAPES = ["512x1024", "1024x8192", "2048x32000"]


def logits_methods(device):
    def eager(logits, labels):
        return logprobs_reference(logits, labels)

    fns = {"kernels": logprobs, "eager": eager, "compile": torch.compile(eager, dynamic=False)}
    if device == "cuda":
        try:
            from liger_kernel.transformers.cross_entropy import LigerCrossEntropyLoss

            liger = LigerCrossEntropyLoss(reduction="none")
            fns["liger"] = lambda logits, labels: -liger(logits, labels)
        except ImportError:
            print("liger: skipped (liger-kernel is not installed)")
    return fns


def linear_methods(device):
    def unfused(hidden, weight, labels):
        return logprobs(hidden @ weight.T, labels)

    def matmuls(hidden, weight, labels):
        # The matmuls an output projection costs anyway: logits, then (in backward) dhidden and dweight.
        return (hidden @ weight.T).float().sum(-1)

    fns = {"kernels": linear_logprobs, "unfused": unfused, "matmuls": matmuls}
    if device == "cuda":
        try:
            from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss

            liger = LigerFusedLinearCrossEntropyLoss(reduction="none")
            fns["liger"] = lambda hidden, weight, labels: -liger(weight, hidden, labels)
        except ImportError:
            print("liger: skipped (liger-kernel is not installed)")
    return fns


def run_once(fn, inputs, labels, upstream):
    leaves = [x.detach().requires_grad_(True) for x in inputs]
    fn(*leaves, labels).backward(upstream)
    return [x.grad for x in leaves]


def measure(fn, inputs, labels, upstream, repeats, device):
    for _ in range(3):
        run_once(fn, inputs, labels, upstream)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        run_once(fn, inputs, labels, upstream)
        sync()
        times.append(time.perf_counter() - start)
    peak = None
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        run_once(fn, inputs, labels, upstream)
        sync()
        peak = torch.cuda.max_memory_allocated() - base
    return sorted(times)[len(times) // 2], peak


def exact(*inputs_and_labels):
    """float64 log_softmax + gather, of the logits or of hidden @ weight.T."""
    *inputs, labels = inputs_and_labels
    logits = inputs[0] if len(inputs) == 1 else inputs[0] @ inputs[1].T
    valid = labels != -100
    picked = torch.log_softmax(logits, -1).gather(-1, torch.where(valid, labels, 0)[:, None])[:, 0]
    return torch.where(valid, picked, 0.0)


def gradient_error(fn, inputs, labels, upstream):
    """Largest gradient difference against the float64 unfused computation, on the same inputs."""
    grads = run_once(fn, inputs, labels, upstream)
    ref = run_once(exact, [x.double() for x in inputs], labels, upstream.double())
    return max((g.double() - r).abs().max().item() for g, r in zip(grads, ref))


def plot(rows, path, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = list(dict.fromkeys((r["dtype"], r["shape"]) for r in rows))
    names = list(dict.fromkeys(r["method"] for r in rows))
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(groups)), 4))
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        values = [next((r["ms"] for r in rows if (r["dtype"], r["shape"]) == g and r["method"] == name), 0) for g in groups]
        ax.bar([j + i * width for j in range(len(groups))], values, width, label=name)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(groups))])
    ax.set_xticklabels([f"{s}\n{d}" for d, s in groups], fontsize=7)
    ax.set_ylabel("forward+backward, ms (log scale)")
    ax.set_yscale("log")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def run_part(part, fns, shapes, args, device, device_name, hidden_size):
    baseline = "eager" if part == "logits" else "matmuls"
    lines = [f"{part}: device {device_name}, torch {torch.__version__}" + (f", hidden {hidden_size}" if part == "linear" else ""),
             f"| shape | dtype | method | ms | TB/s (3x logits) | vs {baseline} | peak extra MiB | max grad err |",
             "|---|---|---|---|---|---|---|---|"]
    print("\n".join(lines))
    rows = []
    for dtype_name in args.dtypes:
        dtype = DTYPES[dtype_name]
        for shape in shapes:
            tokens, vocab = map(int, shape.split("x"))
            gen = torch.Generator(device=device).manual_seed(0)
            if part == "logits":
                inputs = [torch.randn(tokens, vocab, device=device, generator=gen).mul_(2).to(dtype)]
            else:
                inputs = [torch.randn(tokens, hidden_size, device=device, generator=gen).to(dtype),
                          (torch.randn(vocab, hidden_size, device=device, generator=gen) / hidden_size**0.5).to(dtype)]
            labels = torch.randint(0, vocab, (tokens,), device=device, generator=gen)
            labels[::7] = -100
            upstream = torch.randn(tokens, device=device, generator=gen)
            # errors on the first rows only: a float64 copy of the full logits may not fit
            err_rows = min(tokens, 256)
            err_inputs = [inputs[0][:err_rows], *inputs[1:]]
            group = []
            torch._dynamo.reset()  # each shape compiles afresh instead of hitting the recompile limit
            for name, fn in fns.items():
                try:
                    seconds, peak = measure(fn, inputs, labels, upstream, args.repeats, device)
                    err = None if name == "matmuls" else gradient_error(fn, err_inputs, labels[:err_rows], upstream[:err_rows])
                except torch.OutOfMemoryError:
                    torch.cuda.empty_cache()
                    seconds, peak, err = None, None, None
                group.append(dict(part=part, shape=shape, dtype=dtype_name, method=name,
                                  ms=None if seconds is None else seconds * 1e3,
                                  tbps=None if seconds is None else 3 * tokens * vocab * inputs[0].element_size() / seconds / 1e12,
                                  peak_extra_mib=None if peak is None else peak / 2**20, max_grad_err=err))
            base_ms = next((r["ms"] for r in group if r["method"] == baseline), None)
            for r in group:
                if r["ms"] is None:
                    line = f"| {shape} | {dtype_name} | {r['method']} | out of memory | | | | |"
                else:
                    ratio = f"{base_ms / r['ms']:.2f}x" if base_ms else "-"
                    peak_text = "-" if r["peak_extra_mib"] is None else f"{r['peak_extra_mib']:.0f}"
                    err_text = "-" if r["max_grad_err"] is None else f"{r['max_grad_err']:.1e}"
                    line = (f"| {shape} | {dtype_name} | {r['method']} | {r['ms']:.3f} | {r['tbps']:.3f} | "
                            f"{ratio} | {peak_text} | {err_text} |")
                print(line)
                lines.append(line)
            rows += [r for r in group if r["ms"] is not None]
            del inputs, labels, upstream
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"kernels_{part}_{device}"
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    stem.with_suffix(".json").write_text(json.dumps({"device": device_name, "torch": torch.__version__, "rows": rows}, indent=1))
    plot(rows, stem.with_suffix(".png"), f"{part} -> log-probs, {device_name}")
    print(f"wrote {stem}.md, .json and .png\n")


if __name__ == "__main__":
    args = tyro.cli(Args)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    device_name = torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu"
    shapes = args.shapes or (CUDA_SHAPES if device == "cuda" else CPU_SHAPES)
    hidden_size = args.hidden or (4096 if device == "cuda" else 256)
    run_part("logits", logits_methods(device), shapes, args, device, device_name, hidden_size)
    if args.linear:
        run_part("linear", linear_methods(device), shapes, args, device, device_name, hidden_size)
