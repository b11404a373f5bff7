"""`logprobs(logits, labels)`: the autograd op, its dispatch, and the chunked PyTorch path.

Semantics (both paths):
    logp[i]      = logits[i, labels[i]] - logsumexp(logits[i, :])          (float32)
    dlogits[i,v] = g[i] * (1[v == labels[i]] - softmax(logits[i])[v])      (fp32 math, rounded once)
    ignored positions (labels[i] == ignore_index): logp 0, gradient exactly 0 (selected, not multiplied
    by 0, so a NaN or inf logit in an ignored row does not reach the gradient).
"""

import os

import torch

# Rows per chunk on the PyTorch path are chosen so that one chunk's fp32 copy stays near this many
# elements (16 MiB): the only full-width fp32 buffer the op ever holds.
_CHUNK_ELEMENTS = 1 << 22

# Run the Triton kernels on CPU tensors too: only for tests, under the interpreter (TRITON_INTERPRET=1).
TRITON_ON_CPU = os.environ.get("KERNELS_TRITON_ON_CPU") == "1"


def _check_labels(labels: torch.Tensor, vocab_size: int, ignore_index: int, name: str) -> None:
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab_size))
    if bool(bad.any()):
        value = labels[bad][0].item()
        raise ValueError(
            f"{name}: label {value} is outside the vocabulary [0, {vocab_size}) and is not "
            f"ignore_index ({ignore_index}). Mask padding and prompt positions with ignore_index, and "
            f"check that the tokenizer and the model's output layer have the same vocabulary size."
        )


def _as_rows(logits: torch.Tensor) -> torch.Tensor:
    """View logits as (A, T, V) without copying: a sliced `logits[:, :-1]` cannot be flattened to
    rows as a view (its batch stride is not T * V), but it can be addressed with two strides."""
    vocab = logits.shape[-1]
    try:
        return logits.view(1, -1, vocab)
    except RuntimeError:
        return logits.flatten(0, -3) if logits.dim() > 3 else logits


def _row_chunks(logits3d: torch.Tensor):
    """(a, t-slice) pieces of about _CHUNK_ELEMENTS elements each."""
    _, length, vocab = logits3d.shape
    step = max(1, _CHUNK_ELEMENTS // max(vocab, 1))
    for a in range(logits3d.shape[0]):
        for start in range(0, length, step):
            yield a, slice(start, start + step)


def _torch_forward(logits3d: torch.Tensor, labels2d: torch.Tensor, ignore_index: int):
    valid = labels2d != ignore_index
    safe = torch.where(valid, labels2d, 0)
    logp = torch.empty(labels2d.shape, dtype=torch.float32, device=logits3d.device)
    lse = torch.empty(labels2d.shape, dtype=torch.float32, device=logits3d.device)
    for a, t in _row_chunks(logits3d):
        chunk = logits3d[a, t].float()
        lse[a, t] = torch.logsumexp(chunk, dim=-1)
        logp[a, t] = chunk.gather(-1, safe[a, t, None]).squeeze(-1) - lse[a, t]
    return torch.where(valid, logp, 0.0), lse


def _torch_backward(logits3d, labels2d, lse, grad_logp, ignore_index: int):
    grad = torch.empty(logits3d.shape, dtype=logits3d.dtype, device=logits3d.device)
    valid = labels2d != ignore_index
    g = torch.where(valid, grad_logp, 0.0)
    safe = torch.where(valid, labels2d, 0)
    for a, t in _row_chunks(logits3d):
        probs = torch.exp(logits3d[a, t].float() - lse[a, t, None])
        # d logp / d logits = onehot - softmax; the label's entry, 1 - p, is formed in fp32 from the
        # saved logsumexp so it does not cancel when p -> 1, then rounded once to the logits dtype.
        chunk_grad = -probs
        chunk_grad.scatter_add_(-1, safe[a, t, None], torch.ones_like(probs[:, :1]))
        # Ignored rows are selected to 0, not multiplied by g = 0: their logits may be NaN or inf.
        chunk_grad = torch.where(valid[a, t, None], chunk_grad * g[a, t, None], 0.0)
        grad[a, t] = chunk_grad.to(grad.dtype)
    return grad


def forward_rows(logits3d, labels2d, ignore_index: int):
    """(A, T, V) logits, (A, T) labels -> logp, lse (A, T) fp32: Triton on CUDA, PyTorch elsewhere."""
    if logits3d.is_cuda or TRITON_ON_CPU:
        from kernels import triton_logprobs

        return triton_logprobs.forward(logits3d, labels2d, ignore_index)
    return _torch_forward(logits3d, labels2d, ignore_index)


def backward_rows(logits3d, labels2d, lse, grad_logp, ignore_index: int):
    """The gradient w.r.t. (A, T, V) logits, contiguous, in their dtype."""
    grad_logp = grad_logp.reshape(labels2d.shape).float().contiguous()
    if logits3d.is_cuda or TRITON_ON_CPU:
        from kernels import triton_logprobs

        return triton_logprobs.backward(logits3d, labels2d, lse, grad_logp, ignore_index)
    return _torch_backward(logits3d, labels2d, lse, grad_logp, ignore_index)


class _LogProbs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, ignore_index):
        logits3d = _as_rows(logits)
        labels2d = labels.reshape(logits3d.shape[:2]).contiguous()
        logp, lse = forward_rows(logits3d, labels2d, ignore_index)
        ctx.save_for_backward(logits3d, labels2d, lse)
        ctx.ignore_index = ignore_index
        ctx.logits_shape = logits.shape
        return logp.view(labels.shape)

    @staticmethod
    def backward(ctx, grad_logp):
        logits3d, labels2d, lse = ctx.saved_tensors
        grad = backward_rows(logits3d, labels2d, lse, grad_logp, ctx.ignore_index)
        return grad.view(ctx.logits_shape), None, None


# Dtypes the op reads (fp64 is accepted and, like the others, computed in fp32). Labels: the two integer
# dtypes that hold both token ids and a negative ignore_index; others (uint8, int16, bool) would wrap or
# overflow, so they are refused rather than converted.
LOGIT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
LABEL_DTYPES = (torch.int64, torch.int32)


def _validate_labels(labels: torch.Tensor, name: str) -> None:
    if labels.dtype not in LABEL_DTYPES:
        raise ValueError(
            f"{name}: labels must be int64 or int32 token ids, got {labels.dtype} (other dtypes cannot hold "
            f"every token id and a negative ignore_index); cast them with labels.long()"
        )


def _validate_floats(name: str, **tensors: torch.Tensor) -> None:
    for what, tensor in tensors.items():
        if tensor.dtype not in LOGIT_DTYPES:
            raise ValueError(
                f"{name}: {what} must be float32, bfloat16 or float16 (or float64), got {tensor.dtype}; "
                f"cast with {what}.float()"
            )


def _validate(logits_shape, labels, is_cuda: bool, ignore_index: int, check_labels: bool | None, name="logprobs") -> None:
    if logits_shape[:-1] != labels.shape:
        raise ValueError(
            f"{name}: logits {tuple(logits_shape)} and labels {tuple(labels.shape)} must share the "
            f"leading shape (logits is (..., V), labels is (...)); shift one of them by a position?"
        )
    _validate_labels(labels, name)
    if check_labels is None:
        check_labels = not is_cuda or os.environ.get("KERNELS_CHECK_LABELS") == "1"
    if check_labels:
        _check_labels(labels, logits_shape[-1], ignore_index, name)


def logprobs(
    logits: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = -100,
    check_labels: bool | None = None,
) -> torch.Tensor:
    """Log-probability of each label under softmax(logits), differentiable with respect to logits.

    Args:
        logits: (..., V) float32, bfloat16 or float16 (float64 is computed in fp32); any strides (e.g. the
            view `logits[:, :-1]`).
        labels: (...) int64 or int32 token ids, the leading shape of `logits`; `ignore_index` marks
            positions to skip (their log-prob is 0 and their gradient exactly 0, whatever their logits).
        ignore_index: the label value that marks ignored positions.
        check_labels: raise a ValueError for labels outside [0, V) other than `ignore_index`.
            None (default) checks CPU tensors, where it costs no device sync, and skips CUDA tensors
            unless the environment sets KERNELS_CHECK_LABELS=1; unchecked out-of-range labels on CUDA
            give a NaN log-prob (never an out-of-bounds read).

    Returns:
        float32 tensor of `labels.shape`.
    """
    _validate_floats("logprobs", logits=logits)
    _validate(logits.shape, labels, logits.is_cuda, ignore_index, check_labels)
    return _LogProbs.apply(logits, labels.long(), ignore_index)


def logprobs_reference(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100):
    """The unfused definition, `log_softmax(logits.float()).gather(labels)`: for tests and benchmarks."""
    valid = labels != ignore_index
    logp = torch.log_softmax(logits.float(), dim=-1)
    picked = logp.gather(-1, torch.where(valid, labels, 0).unsqueeze(-1)).squeeze(-1)
    return torch.where(valid, picked, 0.0)
