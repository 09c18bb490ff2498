"""Training-time forward passes and losses of the four dictionary architectures.

One ``SAETrainer`` module holds the parameters in the serving layout (``W_enc [d_in,
d_sae]``, ``W_dec [d_sae, d_in]``, ``b_enc``, ``b_dec``) and computes what training needs
beyond serving: the loss, the auxiliary dead-latent loss, straight-through gradients and
running statistics. ``to_tensors()`` gives what ``SparseDictionary`` serves:

==========  =====================================  ===================================
trainer      training rule                           saved as
==========  =====================================  ===================================
topk         ReLU, top k per token, + AuxK           ``topk`` with the same k
batchtopk    ReLU, top k*B over the batch, + AuxK    ``jumprelu``, threshold = running
                                                     mean of the smallest kept value
jumprelu     ``pre * H(pre - theta)``, STE for       ``jumprelu`` with theta
             theta, + l0_coeff * L0
standard     ReLU, + l1_coeff * sum(a)               ``standard``
==========  =====================================  ===================================

The reconstruction loss is the batch's fraction of variance unexplained (squared error
over the variance about the batch mean), so loss values and sparsity coefficients mean
the same at every input scale. Decoder rows are kept at unit norm: the gradient
component parallel to each row is removed before the step (it would only change the
norm) and rows are renormalised after it. With unit rows an activation is the length of
its feature's contribution, which is what the L1/L0 penalties and steering values assume.
"""

from __future__ import annotations

import math
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..kernels import sparse_decode

TrainerKind = Literal["topk", "batchtopk", "jumprelu", "standard"]
TRAINERS: tuple[str, ...] = ("topk", "batchtopk", "jumprelu", "standard")


class StepOutput(NamedTuple):
    loss: Tensor
    fvu: Tensor
    """Batch FVU of the reconstruction (detached)."""
    l0: Tensor
    """Mean active latents per token (detached)."""
    aux_loss: Tensor
    """AuxK loss (topk/batchtopk) or the sparsity penalty (jumprelu/standard), detached."""
    fired: Tensor
    """``[d_sae]`` bool: latents that fired on this batch."""


def batch_fvu(x: Tensor, x_hat: Tensor) -> Tensor:
    """Squared error over the variance about the batch mean (the training loss)."""
    total = (x - x.mean(0)).pow(2).sum()
    return (x - x_hat).pow(2).sum() / total.clamp(min=1e-12)


@torch.no_grad()
def geometric_median(x: Tensor, iters: int = 50, eps: float = 1e-6) -> Tensor:
    """Weiszfeld's algorithm: the point minimising the summed distance to the rows of ``x``.

    A better decoder bias than the mean for heavy-tailed activations: a few huge-norm
    tokens move the mean, not the median.
    """
    x = x.double()
    y = x.mean(0)
    for _ in range(iters):
        w = 1.0 / (x - y).norm(dim=1).clamp(min=eps)
        y_new = (w[:, None] * x).sum(0) / w.sum()
        if (y_new - y).norm() < eps * max(1.0, float(y.norm())):
            y = y_new
            break
        y = y_new
    return y.float()


class _JumpReLU(torch.autograd.Function):
    """``pre * H(pre - theta)``; theta gets the rectangle-kernel straight-through gradient."""

    @staticmethod
    def forward(ctx, pre: Tensor, theta: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(pre, theta)
        ctx.bandwidth = bandwidth
        return pre * (pre > theta)

    @staticmethod
    def backward(ctx, grad: Tensor):
        pre, theta = ctx.saved_tensors
        eps = ctx.bandwidth
        near = ((pre - theta).abs() < eps / 2).to(grad.dtype)
        grad_pre = grad * (pre > theta)
        grad_theta = (-(theta / eps) * near * grad).sum(0)
        return grad_pre, grad_theta, None


class _Step(torch.autograd.Function):
    """``H(pre - theta)`` (for the L0 penalty); gradient only to theta, straight through."""

    @staticmethod
    def forward(ctx, pre: Tensor, theta: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(pre, theta)
        ctx.bandwidth = bandwidth
        return (pre > theta).to(pre.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):
        pre, theta = ctx.saved_tensors
        eps = ctx.bandwidth
        near = ((pre - theta).abs() < eps / 2).to(grad.dtype)
        return None, (-(1.0 / eps) * near * grad).sum(0), None


_CHUNK_ELEMS = 1 << 23  # bounds the [rows, k, d_in] temporary of the sparse backward


class _GatheredPre(torch.autograd.Function):
    """Pre-activations of the selected latents only, ``pre[n, idx[n, j]]``, with a sparse backward.

    The forward values come from the dense pre-activations computed without autograd
    (``values``); the backward touches only the selected latents: ``dW_enc[:, i] +=
    g * x`` and ``dx += g * W_enc[:, i]`` for each selection. With k of d_sae latents
    selected this replaces two dense ``[N, d_in] x [d_in, d_sae]`` products by work
    proportional to ``N * k * d_in``: a TopK step costs about a third of the dense one.
    """

    @staticmethod
    def forward(ctx, xc: Tensor, W_enc: Tensor, b_enc: Tensor, idx: Tensor, values: Tensor) -> Tensor:
        ctx.save_for_backward(xc, W_enc, idx)
        return values.clone()

    @staticmethod
    def backward(ctx, grad: Tensor):
        xc, W_enc, idx = ctx.saved_tensors
        g = grad.float()
        grad_x = grad_W = grad_b = None
        d_in, d_sae = W_enc.shape
        if ctx.needs_input_grad[2]:
            grad_b = torch.zeros(d_sae, device=g.device).index_add_(0, idx.reshape(-1), g.reshape(-1))
        if ctx.needs_input_grad[0]:
            grad_x = F.embedding_bag(idx, W_enc.float().t().contiguous(), per_sample_weights=g,
                                     mode="sum").to(xc.dtype)
        if ctx.needs_input_grad[1]:
            gWT = torch.zeros(d_sae, d_in, device=g.device)
            rows = max(1, _CHUNK_ELEMS // max(idx.shape[1] * d_in, 1))
            x32 = xc.float()
            for r0 in range(0, idx.shape[0], rows):
                contrib = g[r0:r0 + rows, :, None] * x32[r0:r0 + rows, None, :]
                gWT.index_add_(0, idx[r0:r0 + rows].reshape(-1), contrib.reshape(-1, d_in))
            grad_W = gWT.t().contiguous().to(W_enc.dtype)
        return grad_x, grad_W, grad_b, None, None


class SAETrainer(nn.Module):
    """Parameters of a dictionary plus its training-time forward pass and statistics."""

    W_enc: nn.Parameter
    W_dec: nn.Parameter
    b_enc: nn.Parameter
    b_dec: nn.Parameter
    log_threshold: nn.Parameter  # jumprelu only
    # buffers, registered in __init__
    tokens_since_fired: Tensor
    batch_threshold: Tensor

    def __init__(self, kind: TrainerKind, d_in: int, d_sae: int, *, k: int = 64,
                 auxk_alpha: float = 1 / 32, dead_window: int = 1_000_000,
                 l0_coeff: float = 1e-3, l1_coeff: float = 2e-3,
                 jumprelu_init_threshold: float = 0.1, jumprelu_bandwidth: float = 0.05,
                 threshold_momentum: float = 0.01, seed: int = 0):
        super().__init__()
        if kind not in TRAINERS:
            raise ValueError(f"unknown trainer {kind!r}; choose from {', '.join(TRAINERS)}")
        if kind in ("topk", "batchtopk") and not 1 <= k <= d_sae:
            raise ValueError(f"k must be in [1, d_sae={d_sae}], got {k}")
        self.kind, self.d_in, self.d_sae, self.k = kind, d_in, d_sae, k
        self.auxk_alpha, self.dead_window = auxk_alpha, dead_window
        self.l0_coeff, self.l1_coeff = l0_coeff, l1_coeff
        self.bandwidth, self.threshold_momentum = jumprelu_bandwidth, threshold_momentum
        self.sparsity_scale = 1.0  # warm-up factor for the L0/L1 penalty, set by the loop

        gen = torch.Generator().manual_seed(seed)
        W_dec = torch.randn(d_sae, d_in, generator=gen)
        W_dec /= W_dec.norm(dim=1, keepdim=True)
        self.W_dec = nn.Parameter(W_dec)
        # Encoder starts as the decoder's transpose: every latent first reads the
        # direction it writes, which avoids many latents dying in the first steps.
        self.W_enc = nn.Parameter(W_dec.T.clone().contiguous())
        self.b_enc = nn.Parameter(torch.zeros(d_sae))
        self.b_dec = nn.Parameter(torch.zeros(d_in))
        if kind == "jumprelu":
            self.log_threshold = nn.Parameter(torch.full((d_sae,), math.log(jumprelu_init_threshold)))
        # Running statistics (buffers: saved in checkpoints, restored on resume).
        self.register_buffer("tokens_since_fired", torch.zeros(d_sae, dtype=torch.long))
        self.register_buffer("batch_threshold", torch.tensor(-1.0))

    # ------------------------------------------------------------ init / constraints

    @torch.no_grad()
    def init_b_dec(self, sample: Tensor, method: Literal["geometric_median", "mean", "zeros"]) -> None:
        """Start the decoder bias at the centre of the data (a sample of training inputs)."""
        if method == "geometric_median":
            self.b_dec.copy_(geometric_median(sample))
        elif method == "mean":
            self.b_dec.copy_(sample.float().mean(0))
        elif method != "zeros":
            raise ValueError(f"unknown b_dec init {method!r}")

    @torch.no_grad()
    def remove_parallel_grad(self) -> None:
        """Drop the part of each decoder row's gradient that would only change its norm."""
        if self.W_dec.grad is None:
            return
        W, g = self.W_dec.data, self.W_dec.grad
        g -= (g * W).sum(dim=1, keepdim=True) * W

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        self.W_dec.data /= self.W_dec.data.norm(dim=1, keepdim=True).clamp(min=1e-8)

    # ------------------------------------------------------------ forward

    def pre_acts(self, x: Tensor) -> Tensor:
        return (x - self.b_dec) @ self.W_enc + self.b_enc

    def dead_mask(self) -> Tensor:
        return self.tokens_since_fired > self.dead_window

    def _selected(self, xc: Tensor, idx: Tensor, values: Tensor) -> Tensor:
        """ReLU'd pre-activations of the selected latents, differentiable (sparse backward)."""
        return _GatheredPre.apply(xc, self.W_enc, self.b_enc, idx, values).relu()

    def _auxk(self, x: Tensor, xc: Tensor, x_hat: Tensor, pre: Tensor) -> Tensor:
        """AuxK: the dead latents' top activations must explain the main residual error.

        Gives dead latents a gradient towards directions the live ones miss; scaled down
        while few latents are dead (as in Gao et al. 2024).
        """
        dead = self.dead_mask()
        n_dead = int(dead.sum())
        if n_dead == 0 or self.auxk_alpha == 0:
            return x.new_zeros(())
        k_aux = min(self.d_in // 2, n_dead)
        masked = torch.where(dead, pre, torch.full_like(pre, -math.inf))
        top, idx = masked.topk(k_aux, dim=-1, sorted=False)
        vals = self._selected(xc, idx, top)
        error = (x - x_hat).detach()
        e_hat = sparse_decode(idx, vals, self.W_dec)
        scale = min(n_dead / k_aux, 1.0)
        return scale * batch_fvu(error, e_hat)

    def forward(self, x: Tensor) -> StepOutput:
        """Loss and statistics for a batch ``x [B, d_in]`` (float32, already normalised)."""
        aux = x.new_zeros(())
        if self.kind in ("topk", "batchtopk"):
            xc = x - self.b_dec
            with torch.no_grad():  # dense pre-activations, no autograd graph (see _GatheredPre)
                pre = xc @ self.W_enc + self.b_enc
            if self.kind == "topk":
                top, idx = pre.topk(self.k, dim=-1, sorted=False)
                n_active = (top > 0).sum(-1)
            else:
                acts = pre.relu()
                flat = acts.flatten()
                kept = flat.topk(self.k * x.shape[0], sorted=False)
                mask = torch.zeros_like(flat, dtype=torch.bool)
                mask[kept.indices] = True
                mask = mask.view_as(acts) & (acts > 0)
                if self.training and bool(mask.any()):
                    self._update_threshold(kept.values[kept.values > 0].min())
                # Rows keep different numbers of latents: take the largest count per row;
                # the padding entries have value 0 and so no gradient through the ReLU.
                n_active = mask.sum(-1)
                top, idx = (acts * mask).topk(max(int(n_active.max()), 1), dim=-1, sorted=False)
            vals = self._selected(xc, idx, top)
            x_hat = sparse_decode(idx, vals, self.W_dec) + self.b_dec
            fired_rows = idx[top > 0]
            l0 = n_active.float().mean()
            aux = self._auxk(x, xc, x_hat, pre)
            loss = batch_fvu(x, x_hat) + self.auxk_alpha * aux
        elif self.kind == "jumprelu":
            pre = self.pre_acts(x)
            theta = self.log_threshold.exp()
            acts = _JumpReLU.apply(pre, theta, self.bandwidth)
            x_hat = acts @ self.W_dec + self.b_dec
            l0_st = _Step.apply(pre, theta, self.bandwidth).sum(-1).mean()
            fired = acts > 0
            fired_rows = fired.nonzero()[:, 1]
            l0 = fired.sum(-1).float().mean()
            aux = l0_st.detach()
            loss = batch_fvu(x, x_hat) + self.sparsity_scale * self.l0_coeff * l0_st
        else:  # standard
            acts = self.pre_acts(x).relu()
            x_hat = acts @ self.W_dec + self.b_dec
            l1 = acts.sum(-1).mean()  # decoder rows have unit norm
            fired = acts > 0
            fired_rows = fired.nonzero()[:, 1]
            l0 = fired.sum(-1).float().mean()
            aux = l1.detach()
            loss = batch_fvu(x, x_hat) + self.sparsity_scale * self.l1_coeff * l1
        fired_mask = torch.zeros(self.d_sae, dtype=torch.bool, device=x.device)
        fired_mask[fired_rows] = True
        if self.training:
            with torch.no_grad():
                self.tokens_since_fired += x.shape[0]
                self.tokens_since_fired[fired_mask] = 0
        return StepOutput(loss, batch_fvu(x, x_hat).detach(), l0.detach(), aux.detach(), fired_mask)

    @torch.no_grad()
    def _update_threshold(self, smallest_kept: Tensor) -> None:
        if self.batch_threshold < 0:
            self.batch_threshold.copy_(smallest_kept)
        else:
            self.batch_threshold.lerp_(smallest_kept, self.threshold_momentum)

    # ------------------------------------------------------------ export

    @property
    def saved_architecture(self) -> str:
        return {"topk": "topk", "batchtopk": "jumprelu", "jumprelu": "jumprelu",
                "standard": "standard"}[self.kind]

    @torch.no_grad()
    def to_tensors(self) -> dict[str, Tensor]:
        """The serving tensors (architecture ``saved_architecture``), float32 on CPU."""
        t = {name: getattr(self, name).detach().float().cpu().clone()
             for name in ("W_enc", "W_dec", "b_enc", "b_dec")}
        if self.kind == "batchtopk":
            theta = float(self.batch_threshold.clamp(min=0))
            t["threshold"] = torch.full((self.d_sae,), theta)
        elif self.kind == "jumprelu":
            t["threshold"] = self.log_threshold.detach().exp().float().cpu()
        return t


def train_step(trainer: SAETrainer, optimizer: torch.optim.Optimizer, x: torch.Tensor,
               *, bf16: bool = False) -> StepOutput:
    """One optimisation step: loss, backward, decoder-norm constraint, update."""
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
        out = trainer(x)
    optimizer.zero_grad(set_to_none=True)
    out.loss.backward()
    trainer.remove_parallel_grad()
    optimizer.step()
    trainer.normalize_decoder()
    return out
