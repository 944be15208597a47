"""The LM head's cross-entropy without the tensors it need not keep.

The plain path materialises the [tokens, vocab] logits in the product's dtype, an fp32 copy for the
loss, the fp32 log-softmax autograd saves, the fp32 gradient and its cast back: five passes over
the largest tensor of the step (GPT-2 small at 8 x 512 tokens: 206 M values each). Here the logits
are computed a chunk of tokens at a time, the loss is taken in fp32, and the only thing kept for
backward is the loss's gradient with respect to the logits (softmax - one-hot, in the product's
dtype), written once; backward is two matrix products. Same loss and gradients as
``F.cross_entropy(logits.float(), targets, ignore_index=-100)`` up to float rounding.
"""
from __future__ import annotations

import torch

IGNORE = -100
CHUNK_VALUES = 1 << 23  # logits per chunk (fp32: 32 MB), whatever the vocabulary


def _compute_dtype(device: torch.device) -> torch.dtype:
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return torch.float32


def _chunks(n: int, vocab: int):
    step = max(1, CHUNK_VALUES // max(vocab, 1))
    for i in range(0, n, step):
        yield i, min(i + step, n)


def _loss(logits: torch.Tensor, t: torch.Tensor, valid: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed cross-entropy of fp32 ``logits`` (vocabulary along ``dim``) at targets ``t``, valid
    tokens only; and the log-sum-exp per token."""
    lse = torch.logsumexp(logits, dim=dim)
    picked = logits.gather(dim, t.unsqueeze(dim)).squeeze(dim)
    return torch.where(valid, lse - picked, 0.0).sum(), lse


class _HeadLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, w, targets, dt):
        n, vocab = h.shape[0], w.shape[0]
        hd, wd = h.to(dt), w.to(dt)
        valid = targets != IGNORE
        t = torch.where(valid, targets, 0)
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        if dt == torch.float32 and h.device.type == "cpu":
            # fp32 needs no second copy, so all tokens at once, vocabulary-major: MKL writes the 512-wide
            # rows of W h^T faster than the 50,257-wide rows of h W^T (2 Zen 4 cores: ~140 vs ~100 GFLOP/s)
            grad = torch.mm(wd, hd.t())  # [V, n]
            total, lse = _loss(grad, t, valid, 0)
            _to_softmax_grad(grad, lse, t, valid, 0)
            vmajor = True
        else:
            grad = torch.empty(n, vocab, dtype=dt, device=h.device)  # d(sum of losses)/d(logits)
            for i, j in _chunks(n, vocab):
                z = torch.mm(hd[i:j], wd.t()).float()
                part, lse = _loss(z, t[i:j], valid[i:j], 1)
                total += part
                grad[i:j].copy_(_to_softmax_grad(z, lse, t[i:j], valid[i:j], 1))
            vmajor = False
        n_valid = valid.sum()
        ctx.save_for_backward(hd, wd, grad, n_valid)
        ctx.h_dtype, ctx.w_dtype, ctx.vmajor = h.dtype, w.dtype, vmajor
        return total / n_valid

    @staticmethod
    def backward(ctx, g):
        hd, wd, grad, n_valid = ctx.saved_tensors
        scale = (g / n_valid).to(grad.dtype)
        z = grad.t() if ctx.vmajor else grad  # [n, V]
        gh = gw = None
        if ctx.needs_input_grad[0]:
            gh = torch.mm(z, wd).mul_(scale).to(ctx.h_dtype)
        if ctx.needs_input_grad[1]:
            gw = torch.mm(z.t(), hd).mul_(scale).to(ctx.w_dtype)
        return gh, gw, None, None


def _to_softmax_grad(z, lse, t, valid, dim):
    """fp32 logits -> softmax - one-hot, in place; ignored tokens get no gradient."""
    z.sub_(lse.unsqueeze(dim)).exp_()
    z.scatter_add_(dim, t.unsqueeze(dim), torch.full_like(lse, -1.0).unsqueeze(dim))
    if not bool(valid.all()):
        z.mul_(valid.unsqueeze(dim))
    return z


def lm_head_loss(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of the logits ``h @ weight.T`` (h [..., C], weight [V, C]) at ``targets``
    (-100 = ignore), in the autocast dtype when autocast is on and fp32 otherwise."""
    h2 = h.reshape(-1, h.shape[-1])
    t = targets.reshape(-1).to(h.device)
    dt = _compute_dtype(h.device)
    if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
        return _HeadLoss.apply(h2, weight, t, dt)
    # evaluation: only the loss, a chunk at a time
    hd, wd = h2.to(dt), weight.to(dt)
    valid = t != IGNORE
    tt = torch.where(valid, t, 0)
    total = torch.zeros((), dtype=torch.float32, device=h.device)
    for i, j in _chunks(h2.shape[0], weight.shape[0]):
        total += _loss(torch.mm(hd[i:j], wd.t()).float(), tt[i:j], valid[i:j], 1)[0]
    return total / valid.sum()
