"""Forward+backward time and peak extra memory of per-token log-probs, side by side.

    pip install -r requirements.txt -r benchmarks/requirements.txt
    python benchmarks/bench_kernels.py            # CUDA: the full sweep; CPU: small shapes, PyTorch paths
    python benchmarks/bench_kernels.py --shapes 8192x32000 --dtypes fp32 --repeats 1 --tag memory   # CPU memory
    python benchmarks/bench_kernels.py --shapes 8192x128256 --dtypes bf16 --no-linear

Part 1, logits -> log-probs (same per-token semantics everywhere, a random upstream gradient per token):
- `kernels`: `kernels.logprobs` (Triton on CUDA, the chunked PyTorch path on CPU);
- `eager`: `log_softmax(logits.float()).gather(labels)`;
- `compile`: `torch.compile` of `eager`;
- `liger`: Liger-Kernel's cross entropy with `reduction="none"`, negated (CUDA only, where installed);
- `copy`: a device-to-device copy of the logits (CUDA only): the bandwidth the others are held to; its
  TB/s counts the bytes it moves (2 x logits), not 3 x logits.
Part 2, hidden states + output projection -> log-probs (`--linear`, hidden size `--hidden`):
- `kernels`: `kernels.linear_logprobs` (chunked, logits recomputed in backward);
- `unfused`: `kernels.logprobs(hidden @ weight.T, labels)`;
- `matmuls`: the bare output-projection matmuls alone (forward, and the two of backward): the floor;
- `trl`: TRL 1.16's `ChunkedLogProbFunction` (its default chunked DPO path; valid rows only, as TRL does);
- `liger`: Liger-Kernel's fused linear cross entropy with `reduction="none"` (CUDA only, where installed).
A column that cannot run here is listed with the reason (not installed, needs CUDA).

Columns: ms per forward+backward (median); effective TB/s on the minimum-traffic basis (3 x logits bytes:
read in forward, read again and write the gradient in backward); time relative to the baseline (eager,
or the bare matmuls); peak memory above the inputs during one forward+backward, the gradients it returns
included; the largest gradient error against float64 on the first rows (fast but wrong shows here).

Peak memory: on CPU each variant runs in a fresh subprocess, which reports its peak resident memory
(VmHWM, reset after the inputs are built and one warm-up run) minus the resident memory at that point;
a shared process would reuse memory that earlier variants left to the allocator. On CUDA the variants
share a process (that keeps the sweep inside the device check's minutes), since
`torch.cuda.max_memory_allocated` after `reset_peak_memory_stats` is exact per variant; `--isolate`
forces subprocesses there too.

Writes Markdown and JSON (and a plot, where matplotlib is installed) per part under benchmarks/results/,
with the issue's targets, met or not, at the end of the JSON and the Markdown.
"""

import ctypes
import gc
import json
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import tyro

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, for `kernels`
from kernels import linear_logprobs, logprobs, logprobs_reference
from kernels.linear import _CHUNK_ELEMENTS


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
    methods: list[str] = field(default_factory=list)
    """run only these methods (e.g. kernels eager matmuls); default: all of each part's"""
    isolate: bool | None = None
    """run each variant in a fresh subprocess; default: on CPU (resident-memory peaks), not on CUDA"""
    out_dir: str = "benchmarks/results"
    """where the tables, JSON and plots go"""
    tag: str = ""
    """appended to the output files' names (kernels_<part>_<device>[_<tag>]), so a run does not overwrite another"""
    worker: str = ""
    """internal: one measurement as JSON, run in this (fresh) process; prints its result as JSON"""


DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
CUDA_SHAPES = ["4096x32000", "8192x32000", "4096x128256", "8192x128256", "16384x128256", "16384x151936"]
CPU_SHAPES = ["512x1024", "1024x8192", "2048x32000"]
METHODS = {"logits": ["kernels", "eager", "compile", "liger", "copy"],
           "linear": ["kernels", "unfused", "matmuls", "trl", "liger"]}
BASELINE = {"logits": "eager", "linear": "matmuls"}
# The targets, at this shape and dtype.
TARGET_SHAPE, TARGET_DTYPE = "8192x128256", "bf16"


class Unavailable(Exception):
    """This method cannot run here; the message says why."""


def _eager(logits, labels):
    return logprobs_reference(logits, labels)


def _masked(fn):
    """Run `fn` on the valid rows only and scatter back zeros, as TRL's fused forward does."""
    def wrapper(hidden, weight, labels):
        mask = labels != -100
        return torch.zeros(labels.shape, device=hidden.device).masked_scatter(mask, fn(hidden[mask], weight, labels[mask]))
    return wrapper


def make_method(part, name, device):
    """The function (inputs..., labels) -> per-token log-probs, or raise Unavailable."""
    cuda_only = name in ("liger", "copy")
    if cuda_only and device != "cuda":
        raise Unavailable("needs CUDA (its Triton kernels)" if name == "liger" else "CUDA only (the device-to-device copy)")
    if (part, name) == ("logits", "kernels"):
        return logprobs
    if name == "eager":
        return _eager
    if name == "compile":
        return torch.compile(_eager, dynamic=False)
    if name == "copy":
        return None  # timed separately: not a forward+backward
    if (part, name) == ("logits", "liger"):
        try:
            from liger_kernel.transformers.cross_entropy import LigerCrossEntropyLoss
        except ImportError as error:
            raise Unavailable(f"liger-kernel does not import ({error})")
        liger = LigerCrossEntropyLoss(reduction="none")
        return lambda logits, labels: -liger(logits, labels)
    if name == "kernels":
        return linear_logprobs
    if name == "unfused":
        return lambda hidden, weight, labels: logprobs(hidden @ weight.T, labels)
    if name == "matmuls":
        # The matmuls an output projection costs anyway: logits, then (in backward) dhidden and dweight.
        return lambda hidden, weight, labels: (hidden @ weight.T).float().sum(-1)
    if name == "trl":
        try:
            from trl.kernels.chunked_logprob import ChunkedLogProbFunction
            from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE
        except ImportError as error:
            raise Unavailable(f"trl does not import ({error})")
        # TRL's own call in its fused forward: temperature 1, no cap, scale 1, log-probs only.
        return _masked(lambda h, w, y: ChunkedLogProbFunction.apply(h, w, None, y, 1.0, _CHUNKED_LOGPROB_CHUNK_SIZE, None, 1.0, ())[0])
    if (part, name) == ("linear", "liger"):
        try:
            from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss
        except ImportError as error:
            raise Unavailable(f"liger-kernel does not import ({error})")
        liger = LigerFusedLinearCrossEntropyLoss(reduction="none")
        return lambda hidden, weight, labels: -liger(weight, hidden, labels)
    raise ValueError(f"unknown method {part}/{name}")


def make_inputs(part, shape, dtype, device, hidden_size):
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
    return inputs, labels, upstream


def run_once(fn, inputs, labels, upstream):
    leaves = [x.detach().requires_grad_(True) for x in inputs]
    fn(*leaves, labels).backward(upstream)
    return [x.grad for x in leaves]


def exact(*inputs_and_labels):
    """float64 log_softmax + gather, of the logits or of hidden @ weight.T."""
    *inputs, labels = inputs_and_labels
    logits = inputs[0] if len(inputs) == 1 else inputs[0] @ inputs[1].T
    valid = labels != -100
    picked = torch.log_softmax(logits, -1).gather(-1, torch.where(valid, labels, 0)[:, None])[:, 0]
    return torch.where(valid, picked, 0.0)


def gradient_error(fn, inputs, labels, upstream):
    """Largest gradient difference against the float64 unfused computation, on the first 256 rows (a
    float64 copy of the full logits may not fit)."""
    rows = min(labels.shape[0], 256)
    inputs, labels, upstream = [inputs[0][:rows], *inputs[1:]], labels[:rows], upstream[:rows]
    grads = run_once(fn, inputs, labels, upstream)
    ref = run_once(exact, [x.double() for x in inputs], labels, upstream.double())
    return max((g.double() - r).abs().max().item() for g, r in zip(grads, ref))


def _resident_mib():
    """(current, peak) resident memory of this process in MiB, from /proc (Linux)."""
    values = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(("VmRSS:", "VmHWM:")):
            key, value = line.split(":")
            values[key] = int(value.split()[0]) / 1024
    return values["VmRSS"], values["VmHWM"]


def _timed(fn, sync):
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start


def measure(spec):
    """One method at one shape and dtype: {ms, peak_extra_mib, max_grad_err} or {skipped: reason}."""
    part, name, device = spec["part"], spec["method"], spec["device"]
    try:
        fn = make_method(part, name, device)
    except Unavailable as reason:
        return dict(skipped=str(reason))
    inputs, labels, upstream = make_inputs(part, spec["shape"], DTYPES[spec["dtype"]], device, spec["hidden"])
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    if name == "copy":
        target = torch.empty_like(inputs[0])
        step = lambda: target.copy_(inputs[0])  # noqa: E731
    else:
        step = lambda: run_once(fn, inputs, labels, upstream)  # noqa: E731
    try:
        if device == "cuda":
            for _ in range(3):
                step()
            times = [_timed(step, sync) for _ in range(spec["repeats"])]
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            step()
            sync()
            peak = (torch.cuda.max_memory_allocated() - base) / 2**20
        else:
            step()  # warm-up (torch.compile compiles here), then give freed memory back to the system
            gc.collect()
            ctypes.CDLL("libc.so.6").malloc_trim(0)
            Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
            base, _ = _resident_mib()
            times = [_timed(step, sync)]
            peak = _resident_mib()[1] - base
            times += [_timed(step, sync) for _ in range(spec["repeats"] - 1)]
    except torch.OutOfMemoryError:
        return dict(skipped="out of memory")
    err = None if name in ("matmuls", "copy") else gradient_error(fn, inputs, labels, upstream)
    return dict(ms=sorted(times)[len(times) // 2] * 1e3, peak_extra_mib=peak, max_grad_err=err)


def measure_isolated(spec):
    """`measure` in a fresh Python process, so its peak resident memory is its own."""
    result = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True, text=True)
    if result.returncode != 0:
        return dict(skipped=f"failed in its subprocess: {result.stderr.strip().splitlines()[-1:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def plot(rows, path, title):
    try:
        import matplotlib
    except ImportError:
        print("plot: skipped (matplotlib is not installed; pip install -r benchmarks/requirements.txt)")
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r.get("ms") is not None]
    groups = list(dict.fromkeys((r["dtype"], r["shape"]) for r in rows))
    names = list(dict.fromkeys(r["method"] for r in rows))
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(groups)), 4))
    width = 0.8 / max(len(names), 1)
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


def targets(part, rows, device):
    """The issue's targets at bf16 8192x128256, from this run's rows: met, not met, or not measured."""
    at = {r["method"]: r for r in rows if (r["shape"], r["dtype"]) == (TARGET_SHAPE, TARGET_DTYPE) and r.get("ms")}
    if "kernels" not in at:
        return [f"targets ({part}): not measured (they are set at {TARGET_DTYPE} {TARGET_SHAPE} on a GPU; this run: {device})"]
    k = at["kernels"]

    def ahead(name):
        if name not in at:
            return f"ahead of {name}: not measured"
        return f"ahead of {name} ({at[name]['ms']:.3f} ms): {'met' if k['ms'] < at[name]['ms'] else 'NOT met'}"

    if part == "logits":
        if "copy" not in at:
            share = "copy bandwidth not measured"
        else:
            fraction = k["tbps"] / at["copy"]["tbps"]
            share = (f">= 85% of the device copy's {at['copy']['tbps']:.2f} TB/s: {fraction:.0%}, "
                     f"{'met' if fraction >= 0.85 else 'NOT met'}")
        return [f"target (logits, {TARGET_DTYPE} {TARGET_SHAPE}): kernels at {k['tbps']:.2f} TB/s; {share}",
                f"target (logits): {ahead('liger')}; {ahead('compile')}"]
    tokens, vocab = map(int, TARGET_SHAPE.split("x"))
    chunk_mib = min(tokens, _CHUNK_ELEMENTS // vocab) * vocab * 2 / 2**20
    full_mib = tokens * vocab * 2 / 2**20
    lines = [f"target (linear, {TARGET_DTYPE} {TARGET_SHAPE}): peak extra {k['peak_extra_mib']:.0f} MiB "
             f"(one chunk of logits {chunk_mib:.0f} MiB, the full logits {full_mib:.0f} MiB)"]
    if "matmuls" in at:
        ratio = k["ms"] / at["matmuls"]["ms"]
        lines.append(f"target (linear): within 1.35x of the bare matmuls: {ratio:.2f}x, {'met' if ratio <= 1.35 else 'NOT met'}")
    lines.append(f"target (linear): {ahead('trl')}")
    return lines


def run_part(part, shapes, args, device, device_name, hidden_size):
    baseline = BASELINE[part]
    isolate = args.isolate if args.isolate is not None else device == "cpu"
    header = (f"{part}: device {device_name}, torch {torch.__version__}"
              + (f", hidden {hidden_size}" if part == "linear" else "")
              + (", each variant in a fresh subprocess" if isolate else ", variants in one process"))
    memory = "peak RSS above inputs, MiB" if device == "cpu" else "peak allocated above inputs, MiB"
    lines = [header, f"| shape | dtype | method | ms | TB/s (3x logits) | time / {baseline} | {memory} | max grad err |",
             "|---|---|---|---|---|---|---|---|"]
    print("\n".join(lines), flush=True)
    rows = []
    for dtype_name in args.dtypes:
        for shape in shapes:
            tokens, vocab = map(int, shape.split("x"))
            group = []
            torch._dynamo.reset()  # each shape compiles afresh instead of hitting the recompile limit
            for name in [m for m in METHODS[part] if not args.methods or m in args.methods]:
                spec = dict(part=part, method=name, shape=shape, dtype=dtype_name, device=device,
                            hidden=hidden_size, repeats=args.repeats)
                result = (measure_isolated if isolate else measure)(spec)
                row = dict(spec, **result)
                if row.get("ms"):
                    moved = (2 if name == "copy" else 3) * tokens * vocab * DTYPES[dtype_name].itemsize
                    row["tbps"] = moved / (row["ms"] / 1e3) / 1e12
                group.append(row)
                if device == "cuda":
                    torch.cuda.empty_cache()
            base_ms = next((r["ms"] for r in group if r["method"] == baseline and r.get("ms")), None)
            for r in group:
                if not r.get("ms"):
                    line = f"| {shape} | {dtype_name} | {r['method']} | skipped: {r['skipped']} | | | | |"
                else:
                    ratio = f"{r['ms'] / base_ms:.2f}x" if base_ms else "-"
                    err = "-" if r["max_grad_err"] is None else f"{r['max_grad_err']:.1e}"
                    line = (f"| {shape} | {dtype_name} | {r['method']} | {r['ms']:.3f} | {r['tbps']:.3f} | "
                            f"{ratio} | {r['peak_extra_mib']:.0f} | {err} |")
                print(line, flush=True)
                lines.append(line)
            rows += group
    goals = targets(part, rows, device)
    print("\n".join(goals))
    lines += [""] + [f"- {goal}" for goal in goals]
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"kernels_{part}_{device}{'_' + args.tag if args.tag else ''}"
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    stem.with_suffix(".json").write_text(json.dumps(
        {"device": device_name, "torch": torch.__version__, "rows": rows, "targets": goals}, indent=1))
    plot(rows, stem.with_suffix(".png"), f"{part} -> log-probs, {device_name}")
    print(f"wrote {stem}.md and .json\n", flush=True)


def main(args):
    if args.worker:
        print(json.dumps(measure(json.loads(args.worker))))
        return
    device = "cuda" if torch.cuda.is_available() else "cpu"
    device_name = torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu"
    shapes = args.shapes or (CUDA_SHAPES if device == "cuda" else CPU_SHAPES)
    hidden_size = args.hidden or (4096 if device == "cuda" else 256)
    start = time.perf_counter()
    run_part("logits", shapes, args, device, device_name, hidden_size)
    if args.linear:
        run_part("linear", shapes, args, device, device_name, hidden_size)
    print(f"total {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main(tyro.cli(Args))
