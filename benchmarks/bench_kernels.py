"""Forward+backward time and peak extra memory of per-token log-probs, side by side.

    pip install -r requirements.txt -r benchmarks/requirements.txt
    python benchmarks/bench_kernels.py            # CUDA: the full sweep; CPU: small shapes, PyTorch paths
    python benchmarks/bench_kernels.py --shapes 8192x128256 --dtypes bf16

Methods, all with the same per-token semantics (log-prob of each label, a per-token upstream gradient):
- `kernels`: `kernels.logprobs` (Triton on CUDA, the chunked PyTorch path on CPU);
- `eager`: `log_softmax(logits.float()).gather(labels)`;
- `compile`: `torch.compile` of `eager`;
- `liger`: Liger-Kernel's cross entropy with `reduction="none"`, negated (CUDA, where installed).

Columns: ms per forward+backward (median), effective TB/s on the minimum-traffic basis (3 x logits
bytes: read in forward, read again and write the gradient in backward), peak memory beyond the inputs
(CUDA only), and the largest gradient error against float64 (a method that is fast but wrong shows
here). Writes Markdown, JSON and a plot under benchmarks/results/.
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
from kernels import logprobs, logprobs_reference


@dataclass
class Args:
    shapes: list[str] = field(default_factory=list)
    """(tokens)x(vocab) shapes; default: a sweep up to 16384x151936 on CUDA, small shapes on CPU"""
    dtypes: list[str] = field(default_factory=lambda: ["bf16", "fp32"])
    """logit dtypes to run: bf16, fp16, fp32"""
    methods: list[str] = field(default_factory=lambda: ["kernels", "eager", "compile", "liger"])
    """methods to compare (unavailable ones are skipped with a note)"""
    repeats: int = 10
    """timed repetitions per measurement (after warm-up); the median is reported"""
    out_dir: str = "benchmarks/results"
    """where the table, JSON and plot go"""


DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
CUDA_SHAPES = ["4096x32000", "8192x32000", "4096x128256", "8192x128256", "16384x128256", "16384x151936"]
CPU_SHAPES = ["512x1024", "1024x8192", "2048x32000"]


def eager(logits, labels):
    return logprobs_reference(logits, labels)


def liger_method():
    from liger_kernel.transformers.cross_entropy import LigerCrossEntropyLoss

    loss = LigerCrossEntropyLoss(reduction="none")
    return lambda logits, labels: -loss(logits, labels)


def methods(names, device):
    available = {}
    for name in names:
        if name == "kernels":
            available[name] = logprobs
        elif name == "eager":
            available[name] = eager
        elif name == "compile":
            available[name] = torch.compile(eager, dynamic=False)
        elif name == "liger":
            if device != "cuda":
                print("liger: skipped (CUDA only)")
                continue
            try:
                available[name] = liger_method()
            except ImportError:
                print("liger: skipped (liger-kernel is not installed)")
    return available


def gradient_error(fn, logits, labels, upstream):
    x = logits.detach().clone().requires_grad_(True)
    fn(x, labels).backward(upstream)
    ref = logits.detach().double().requires_grad_(True)
    logprobs_reference(ref, labels).double().backward(upstream.double())
    return (x.grad.double() - ref.grad).abs().max().item()


def measure(fn, logits, labels, upstream, repeats, device):
    def step():
        x = logits.detach().requires_grad_(True)
        fn(x, labels).backward(upstream)
        return x.grad

    for _ in range(3):
        step()
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - start)
    peak = None
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        sync()
        peak = torch.cuda.max_memory_allocated() - base
    return sorted(times)[len(times) // 2], peak


def plot(rows, path):
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
    ax.set_ylabel("forward+backward, ms (lower is better)")
    ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    args = tyro.cli(Args)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    device_name = torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu"
    shapes = args.shapes or (CUDA_SHAPES if device == "cuda" else CPU_SHAPES)
    fns = methods(args.methods, device)
    rows = []
    lines = [f"device: {device_name}, torch {torch.__version__}",
             "| shape | dtype | method | ms | TB/s (3x logits) | vs eager | peak extra MiB | max grad err |",
             "|---|---|---|---|---|---|---|---|"]
    print("\n".join(lines))
    for dtype_name in args.dtypes:
        for shape in shapes:
            tokens, vocab = map(int, shape.split("x"))
            gen = torch.Generator(device=device).manual_seed(0)
            logits = torch.randn(tokens, vocab, device=device, generator=gen).mul_(2).to(DTYPES[dtype_name])
            labels = torch.randint(0, vocab, (tokens,), device=device, generator=gen)
            labels[::7] = -100
            upstream = torch.randn(tokens, device=device, generator=gen)
            # the error is measured on the first rows only: a float64 copy of the full logits may not fit
            err_rows = min(tokens, 256)
            group = []
            torch._dynamo.reset()  # each shape compiles afresh instead of hitting the recompile limit
            for name, fn in fns.items():
                try:
                    seconds, peak = measure(fn, logits, labels, upstream, args.repeats, device)
                    err = gradient_error(fn, logits[:err_rows], labels[:err_rows], upstream[:err_rows])
                except torch.OutOfMemoryError:
                    torch.cuda.empty_cache()
                    seconds, peak, err = None, None, None
                group.append(dict(shape=shape, dtype=dtype_name, method=name,
                                  ms=None if seconds is None else seconds * 1e3,
                                  tbps=None if seconds is None else 3 * logits.numel() * logits.element_size() / seconds / 1e12,
                                  peak_extra_mib=None if peak is None else peak / 2**20, max_grad_err=err))
            eager_ms = next((r["ms"] for r in group if r["method"] == "eager"), None)
            for r in group:
                if r["ms"] is None:
                    line = f"| {shape} | {dtype_name} | {r['method']} | out of memory | | | | |"
                else:
                    speedup = f"{eager_ms / r['ms']:.2f}x" if eager_ms else "-"
                    peak_text = "-" if r["peak_extra_mib"] is None else f"{r['peak_extra_mib']:.0f}"
                    line = (f"| {shape} | {dtype_name} | {r['method']} | {r['ms']:.3f} | {r['tbps']:.3f} | "
                            f"{speedup} | {peak_text} | {r['max_grad_err']:.1e} |")
                print(line)
                lines.append(line)
            rows += [r for r in group if r["ms"] is not None]
            del logits, labels, upstream
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"kernels_{device}"
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    (out / f"{stem}.json").write_text(json.dumps({"device": device_name, "torch": torch.__version__, "rows": rows}, indent=1))
    plot(rows, out / f"{stem}.png")
    print(f"wrote {out / stem}.md, .json and .png")
