"""Triton kernels for `logprobs`: one pass forward, a 2-D grid backward.

Logits are addressed as (A, T, V) with two row strides, so the view `logits[:, :-1]` needs no copy.
Every load is cast to fp32 at once (the CPU interpreter, TRITON_INTERPRET=1, does no bf16 math).
Row offsets are computed in int64: `row * stride` overflows int32 at 8192 x 128256.
"""

import torch
import triton
import triton.language as tl

FORWARD_BLOCK = 4096
BACKWARD_BLOCK = 4096


@triton.jit
def _forward_kernel(
    logits_ptr, labels_ptr, logp_ptr, lse_ptr,
    length, vocab, stride_a, stride_t,
    IGNORE_INDEX: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + (row // length) * stride_a + (row % length) * stride_t
    cols = tl.arange(0, BLOCK)
    # Online softmax, kept per lane and combined once at the end: one read of the row.
    running_max = tl.full([BLOCK], float("-inf"), tl.float32)
    running_sum = tl.zeros([BLOCK], tl.float32)
    for start in range(0, vocab, BLOCK):
        mask = start + cols < vocab
        x = tl.load(row_ptr + start + cols, mask=mask, other=float("-inf")).to(tl.float32)
        running_max_new = tl.maximum(running_max, x)
        # Lanes that have seen only -inf (padding lanes) shift by 0 instead: no -inf - -inf = nan.
        shift = tl.where(running_max_new == float("-inf"), 0.0, running_max_new)
        running_sum = running_sum * tl.exp(running_max - shift) + tl.exp(x - shift)
        running_max = running_max_new
    row_max = tl.max(running_max, axis=0)
    lse = row_max + tl.log(tl.sum(running_sum * tl.exp(running_max - row_max), axis=0))

    label = tl.load(labels_ptr + row)
    in_vocab = (label >= 0) & (label < vocab)
    label_logit = tl.load(row_ptr + tl.where(in_vocab, label, 0)).to(tl.float32)
    logp = tl.where(in_vocab, label_logit - lse, float("nan"))
    tl.store(logp_ptr + row, tl.where(label == IGNORE_INDEX, 0.0, logp))
    tl.store(lse_ptr + row, lse)


@triton.jit
def _backward_kernel(
    logits_ptr, labels_ptr, lse_ptr, grad_logp_ptr, grad_ptr,
    length, vocab, stride_a, stride_t,
    IGNORE_INDEX: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < vocab
    row_ptr = logits_ptr + (row // length) * stride_a + (row % length) * stride_t
    x = tl.load(row_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    label = tl.load(labels_ptr + row)
    g = tl.load(grad_logp_ptr + row)
    probs = tl.exp(x - tl.load(lse_ptr + row))
    # onehot - softmax in fp32 (at the label: 1 - p, no cancellation to the logits' precision),
    # times the upstream gradient, rounded once by the store. Ignored rows are selected to 0, not
    # multiplied by 0: their logits may be NaN or inf.
    grad = tl.where(label == IGNORE_INDEX, 0.0, g * (tl.where(cols == label, 1.0, 0.0) - probs))
    tl.store(grad_ptr + row * vocab + cols, grad.to(grad_ptr.dtype.element_ty), mask=mask)


def forward(logits3d: torch.Tensor, labels2d: torch.Tensor, ignore_index: int):
    """logits3d (A, T, V) with unit stride over V; labels2d (A, T) contiguous. Returns logp, lse (A, T) fp32."""
    if logits3d.stride(-1) != 1:
        logits3d = logits3d.contiguous()
    a, length, vocab = logits3d.shape
    logp = torch.empty((a, length), dtype=torch.float32, device=logits3d.device)
    lse = torch.empty((a, length), dtype=torch.float32, device=logits3d.device)
    block = min(FORWARD_BLOCK, triton.next_power_of_2(vocab))
    _forward_kernel[(a * length,)](
        logits3d, labels2d, logp, lse, length, vocab, logits3d.stride(0), logits3d.stride(1),
        IGNORE_INDEX=ignore_index, BLOCK=block, num_warps=8 if block >= 2048 else 4,
    )
    return logp, lse


def backward(logits3d, labels2d, lse, grad_logp, ignore_index: int):
    """The gradient w.r.t. logits, (A, T, V) contiguous, in the logits' dtype."""
    if logits3d.stride(-1) != 1:
        logits3d = logits3d.contiguous()
    a, length, vocab = logits3d.shape
    grad = torch.empty((a, length, vocab), dtype=logits3d.dtype, device=logits3d.device)
    block = min(BACKWARD_BLOCK, triton.next_power_of_2(vocab))
    _backward_kernel[(a * length, triton.cdiv(vocab, block))](
        logits3d, labels2d, lse, grad_logp, grad, length, vocab, logits3d.stride(0), logits3d.stride(1),
        IGNORE_INDEX=ignore_index, BLOCK=block, num_warps=8 if block >= 2048 else 4,
    )
    return grad
