"""Many SAEs of one architecture and shape, trained as one batched module.

Why not SAELens's trainers: ``SAETrainer`` trains one SAE per data pass and ``MultiSAETrainer``
loops over per-SAE trainers, so each SAE pays SAELens's per-step overhead separately (hook points,
schedulers, sparsity bookkeeping, a per-tensor Adam), and autograd forms the ``[B, D]`` gradient
of the input that nothing needs. Here the parameters of ``n`` SAEs are stacked on a leading member
axis (``W_enc_nDS``, ``W_dec_nSD``, ...); one ``bmm`` forward and backward, one fused Adam update
and one set of schedule computations serve all of them, and a custom encoder backward skips the
input gradient (five large matmuls per step instead of six). Adam acts element-wise and every
loss term is a per-member sum, so each member follows exactly the trajectory it would alone (the
tests check this against single training).

The loss of every architecture is the one SAELens's ``training_forward_pass`` computes
(summed-over-dimensions MSE, SAELens's sparsity and auxiliary terms); the tests compare losses
and gradients with SAELens's at the same weights. Members may differ in λ, k and input source;
per-member k is handled by one top-k at the largest k and a rank mask.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from sae_lens import TrainingSAE
from torch import nn

from saekit import distributed
from saekit.sae.architectures import ARCH_ALIASES, ARCHITECTURES, build_on_meta


@dataclass
class StepOutput:
    """What one batched forward pass returns."""

    loss_n: torch.Tensor
    """Total loss per member, [n]."""
    mse_n: torch.Tensor
    """Summed-over-dimensions reconstruction error per member, mean over the batch, [n]."""
    codes_nBS: torch.Tensor
    """Latent activations, [n, B, S]."""


class StackedSAEs(nn.Module):
    """``n`` SAELens training SAEs of one architecture and shape, parameters stacked."""

    # Registered in __init__ from the members' names; declared here for the type checker.
    W_enc: torch.Tensor
    W_dec: torch.Tensor
    b_dec: torch.Tensor
    threshold: torch.Tensor
    topk_threshold: torch.Tensor
    coef_n: torch.Tensor

    data_parallel: distributed.Ranks | None = None
    """Set by a data-parallel trainer: this rank's place, when each rank holds a slice of the
    global batch. BatchTopK then picks its k·B codes over the global batch (what one process
    picks), not over the slice."""
    global_rows: int = 0
    """Set by a data-parallel trainer before each step: the rows of the global batch (B)."""

    def __init__(self, members: list[TrainingSAE]):
        super().__init__()
        first = members[0]
        arch = first.cfg.architecture()
        self.arch = ARCH_ALIASES.get(arch, arch)
        for m in members:
            if type(m) is not type(first) or (m.cfg.d_in, m.cfg.d_sae) != (
                first.cfg.d_in,
                first.cfg.d_sae,
            ):
                raise ValueError("stacked SAEs must share architecture, d_in and d_sae")
            _check_supported(m)
        self.n = len(members)
        self.d_in, self.d_sae = first.cfg.d_in, first.cfg.d_sae
        self._classes = [type(m) for m in members]
        self._cfgs = [copy.deepcopy(m.cfg) for m in members]
        for name, _ in first.named_parameters():
            stacked = torch.stack([m.get_parameter(name).detach() for m in members])
            self.register_parameter(name, nn.Parameter(stacked))
        for name, _ in first.named_buffers():
            self.register_buffer(name, torch.stack([m.get_buffer(name).detach() for m in members]))
        cfg = first.cfg
        device = first.W_dec.device
        coef = [
            getattr(m.cfg, "l1_coefficient", getattr(m.cfg, "l0_coefficient", 0.0)) for m in members
        ]
        self.register_buffer("coef_n", torch.tensor(coef, dtype=torch.float32, device=device))
        self.k_n = [getattr(m.cfg, "k", 0) for m in members]
        self.rescale = bool(getattr(cfg, "rescale_acts_by_decoder_norm", False))
        self.aux_coef = float(getattr(cfg, "aux_loss_coefficient", 0.0))
        self.topk_threshold_lr = float(getattr(cfg, "topk_threshold_lr", 0.0))
        self.bandwidth = float(getattr(cfg, "jumprelu_bandwidth", 0.0))
        self.matryoshka_widths = list(getattr(cfg, "matryoshka_widths", []) or [])

    # --- conversion back to SAELens -----------------------------------------------------------

    def member_state_dict(self, i: int) -> dict[str, torch.Tensor]:
        """Member ``i``'s weights under SAELens's state-dict names."""
        state = {name: p.detach()[i].clone() for name, p in self.named_parameters()}
        for name, b in self.named_buffers():
            if name != "coef_n":
                state[name] = b[i].clone()
        return state

    def export(self, i: int) -> TrainingSAE:
        """Member ``i`` as a SAELens training SAE (its own copy of the weights)."""
        return build_on_meta(
            self._classes[i], copy.deepcopy(self._cfgs[i]), self.member_state_dict(i)
        )

    # --- the batched forward pass ---------------------------------------------------------------

    def forward_loss(
        self, x_nBD: torch.Tensor, sparsity_scale: float, dead_nS: torch.Tensor
    ) -> StepOutput:
        """Losses for inputs ``x_nBD`` (member i sees ``x_nBD[i]``).

        ``sparsity_scale`` is the λ warm-up multiplier; ``dead_nS`` marks latents silent for
        longer than the dead-feature window (TopK's auxiliary loss revives them).
        """
        return getattr(self, f"_forward_{self.arch}")(x_nBD, sparsity_scale, dead_nS)

    def _project(self, x_nBD: torch.Tensor, bias_nS: torch.Tensor | None) -> torch.Tensor:
        """``(x − b_dec) W_enc + bias`` (see :class:`_StackedEncode` for its cheap backward)."""
        return _StackedEncode.apply(x_nBD, self.W_enc, self.b_dec, bias_nS)

    def _dec_norm(self) -> torch.Tensor:
        """Decoder row norms ``[n, 1, S]`` (see :class:`_RowNorm`)."""
        return _RowNorm.apply(self.W_dec)[:, None, :]

    def _decode(self, codes_nBS: torch.Tensor) -> torch.Tensor:
        return torch.baddbmm(self.b_dec[:, None, :], codes_nBS, self.W_dec)

    @staticmethod
    def _mse(x_hat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return (x_hat - x).pow(2).sum(-1).mean(-1)

    def _forward_relu(self, x, sparsity_scale, dead_nS):
        hidden_pre = self._project(x, self.b_enc)
        codes = torch.relu(hidden_pre)
        mse = self._mse(self._decode(codes), x)
        dec_norm = self._dec_norm()
        l1 = (self.coef_n * sparsity_scale) * (codes * dec_norm).sum(-1).mean(-1)
        return StepOutput(mse + l1, mse, codes)

    def _forward_gated(self, x, sparsity_scale, dead_nS):
        proj = self._project(x, None)
        pi_gate = proj + self.b_gate[:, None, :]
        magnitude = torch.relu(proj * self.r_mag.exp()[:, None, :] + self.b_mag[:, None, :])
        codes = (pi_gate > 0).to(magnitude.dtype) * magnitude
        mse = self._mse(self._decode(codes), x)
        gate_act = torch.relu(pi_gate)
        dec_norm = self._dec_norm()
        l1 = (self.coef_n * sparsity_scale) * (gate_act * dec_norm).sum(-1).mean(-1)
        aux = self._mse(self._decode(gate_act), x)
        return StepOutput(mse + l1 + aux, mse, codes)

    def _forward_jumprelu(self, x, sparsity_scale, dead_nS):
        with torch.no_grad():
            self.threshold.data.clamp_(min=0.0)
        hidden_pre = self._project(x, self.b_enc)
        threshold = self.threshold[:, None, :].to(hidden_pre.dtype)
        codes = _StackedJumpReLU.apply(hidden_pre, threshold, self.bandwidth)
        mse = self._mse(self._decode(codes), x)
        l0 = _StackedStep.apply(hidden_pre, threshold, self.bandwidth).sum(-1)
        l0_loss = (self.coef_n * sparsity_scale) * l0.mean(-1)
        return StepOutput(mse + l0_loss, mse, codes)

    def _forward_topk(self, x, sparsity_scale, dead_nS):
        hidden_pre, dec_norm = self._topk_pre(x)
        codes = _masked_topk_scatter(hidden_pre, self.k_n, relu=True)
        return self._topk_losses(x, hidden_pre, codes, dec_norm, dead_nS)

    def _forward_batchtopk(self, x, sparsity_scale, dead_nS):
        hidden_pre, dec_norm = self._topk_pre(x)
        n, B, S = hidden_pre.shape
        flat = torch.relu(hidden_pre).reshape(n, 1, B * S)
        ranks = self.data_parallel
        if ranks is None or ranks.world == 1:
            counts = [int(k * B) for k in self.k_n]
            codes = _masked_topk_scatter(flat, counts, relu=False).reshape(n, B, S)
        else:
            codes = _batch_topk_over_ranks(flat, self.k_n, self.global_rows).reshape(n, B, S)
        out = self._topk_losses(x, hidden_pre, codes, dec_norm, dead_nS)
        self._update_topk_threshold(codes.detach())
        return out

    def _forward_matryoshka(self, x, sparsity_scale, dead_nS):
        """BatchTopK, plus one reconstruction loss per nested prefix of the dictionary (every
        prefix but the whole, whose loss BatchTopK already counts), as SAELens's
        MatryoshkaBatchTopK computes them."""
        out = self._forward_batchtopk(x, sparsity_scale, dead_nS)
        codes = out.codes_nBS
        if self.rescale:
            codes = codes * (1 / self._dec_norm())
        decoded = self.b_dec[:, None, :].expand_as(x)
        previous, inner = 0, x.new_zeros(self.n)
        for width in self.matryoshka_widths[:-1]:
            decoded = decoded + torch.bmm(codes[..., previous:width], self.W_dec[:, previous:width])
            inner = inner + self._mse(decoded, x)
            previous = width
        return StepOutput(out.loss_n + inner, out.mse_n, out.codes_nBS)

    def _topk_pre(self, x):
        hidden_pre = self._project(x, self.b_enc)
        dec_norm = self._dec_norm()
        if self.rescale:
            hidden_pre = hidden_pre * dec_norm
        return hidden_pre, dec_norm

    def _times_W_dec(self, codes, dec_norm):
        if self.rescale:
            codes = codes * (1 / dec_norm)
        return torch.bmm(codes, self.W_dec)

    def _topk_losses(self, x, hidden_pre, codes, dec_norm, dead_nS):
        x_hat = self._times_W_dec(codes, dec_norm) + self.b_dec[:, None, :]
        mse = self._mse(x_hat, x)
        return StepOutput(mse + self._topk_aux(x, x_hat, hidden_pre, dec_norm, dead_nS), mse, codes)

    def _topk_aux(self, x, x_hat, hidden_pre, dec_norm, dead_nS):
        """SAELens's TopK auxiliary loss: the top dead latents reconstruct the residual.

        Each member keeps its ``min(d_in / 2, n_dead)`` strongest dead latents. The counts stay
        on the device (a rank mask over one top-k at ``d_in / 2``), so the step never waits for
        the host; with no dead latent the mask is empty and the term is exactly zero.
        """
        n_dead_n = dead_nS.sum(-1)
        k_aux_max = self.d_in // 2
        k_aux_n = n_dead_n.clamp(max=k_aux_max)
        scale_n = (n_dead_n.to(x.dtype) / k_aux_max).clamp(max=1.0)
        dead_only = torch.where(dead_nS[:, None, :], hidden_pre, -torch.inf)
        top = dead_only.topk(min(k_aux_max, dead_only.shape[-1]), dim=-1, sorted=True)
        ranks = torch.arange(top.values.shape[-1], device=x.device)
        keep = ranks < k_aux_n[:, None, None]
        kept = torch.where(keep, top.values, torch.zeros_like(top.values))
        aux_codes = torch.zeros_like(hidden_pre).scatter(-1, top.indices, kept)
        recon = self._times_W_dec(aux_codes, dec_norm)
        residual = (x - x_hat).detach()
        return self.aux_coef * scale_n * self._mse(recon, residual)

    @torch.no_grad()
    def _update_topk_threshold(self, codes_nBS: torch.Tensor) -> None:
        positive = codes_nBS > 0
        min_positive = torch.where(positive, codes_nBS, torch.inf).amin(dim=(1, 2))
        lr = self.topk_threshold_lr
        updated = (1 - lr) * self.topk_threshold + lr * min_positive.to(torch.float64)
        self.topk_threshold.copy_(
            torch.where(positive.any(dim=(1, 2)), updated, self.topk_threshold)
        )


def _batch_topk_over_ranks(
    flat_n1X: torch.Tensor, k_n: list[Any], global_rows: int
) -> torch.Tensor:
    """BatchTopK over a global batch of `global_rows` rows spread over the ranks (this rank's
    slice in `flat_n1X`): member i keeps its ``k_i · global_rows`` largest entries of all ranks
    together, as one process would.

    The global top-``c`` lies within the union of every rank's local top-``c``, so each rank
    sends only its local top ``c_max`` values (not its rows); the ``c_i``-th largest of the
    gathered values is member i's cut, and each rank keeps its own entries at or above it. Exact
    ties at the cut are all kept (one process breaks them arbitrarily, keeping exactly ``c_i``);
    they are rare in float32 and the step's loss is unchanged by a tie of zeros.
    """
    n, _, width = flat_n1X.shape
    counts_n = [int(k * global_rows) for k in k_n]
    c_max = max(counts_n)
    if c_max == 0:
        return torch.zeros_like(flat_n1X)
    with torch.no_grad():
        local = flat_n1X.detach().reshape(n, width).topk(min(c_max, width), dim=-1).values
        if local.shape[-1] < c_max:  # a small slice: pad with values no cut can reach
            local = torch.nn.functional.pad(local, (0, c_max - local.shape[-1]), value=-1.0)
        gathered = torch.cat(distributed.all_gather_tensor(local), dim=-1)
        top = gathered.topk(c_max, dim=-1).values
        # A member whose count is 0 keeps nothing: its cut lies above every value.
        index_n = torch.tensor([max(c - 1, 0) for c in counts_n], device=top.device)
        cut_n = top[torch.arange(n, device=top.device), index_n]
        cut_n = torch.where(torch.tensor(counts_n, device=top.device) > 0, cut_n, torch.inf)
    keep = flat_n1X >= cut_n.to(flat_n1X.dtype)[:, None, None]
    return torch.where(keep, flat_n1X, torch.zeros_like(flat_n1X))


def _masked_topk_scatter(values_nBS: torch.Tensor, k_n: list[Any], relu: bool) -> torch.Tensor:
    """Keep member i's ``k_n[i]`` largest entries along the last axis, zero the rest.

    One top-k at the largest k serves all members; ranks past a member's own k are masked. With
    a single k this is exactly SAELens's ``TopK``.
    """
    k_max = int(max(k_n))
    uniform = all(int(k) == k_max for k in k_n)
    top = values_nBS.topk(k_max, dim=-1, sorted=not uniform)
    kept = top.values
    if not uniform:
        ranks = torch.arange(k_max, device=values_nBS.device)
        limit = torch.tensor([int(k) for k in k_n], device=values_nBS.device)
        kept = torch.where(ranks < limit[:, None, None], kept, torch.zeros_like(kept))
    if relu:
        kept = torch.relu(kept)
    return torch.zeros_like(values_nBS).scatter(-1, top.indices, kept)


class _StackedEncode(torch.autograd.Function):
    """``(x − b_dec) @ W_enc + bias`` without computing the gradient of the input.

    Autograd would form the full ``[n, B, D]`` gradient of ``x − b_dec`` (a matmul as large as
    the forward) only to sum it over the batch for b_dec; summing first gives the same b_dec
    gradient, ``−(Σ_b ∂h) W_encᵀ``, from a ``[n, 1, S]`` product. The activations never need a
    gradient.
    """

    @staticmethod
    def forward(ctx, x, W_enc, b_dec, bias):
        sae_in = x - b_dec[:, None, :]
        ctx.save_for_backward(sae_in, W_enc)
        ctx.has_bias = bias is not None
        if bias is None:
            return torch.bmm(sae_in, W_enc)
        return torch.baddbmm(bias[:, None, :], sae_in, W_enc)

    @staticmethod
    def backward(ctx, grad):
        sae_in, W_enc = ctx.saved_tensors
        # Under autocast the forward ran in bf16/fp16 and so does this backward (autocast is off
        # here, so cast by hand); each gradient returns in its float32 parameter's dtype.
        low = grad.dtype
        grad_sum = grad.sum(-2, keepdim=True)  # [n, 1, S]
        grad_W_enc = torch.bmm(sae_in.transpose(1, 2).to(low), grad).to(W_enc.dtype)
        grad_b_dec = -torch.bmm(grad_sum, W_enc.transpose(1, 2).to(low))[:, 0, :]
        grad_bias = grad_sum[:, 0, :].to(W_enc.dtype) if ctx.has_bias else None
        return None, grad_W_enc, grad_b_dec.to(W_enc.dtype), grad_bias


class _RowNorm(torch.autograd.Function):
    """L2 norm of each decoder row, ``[n, S, D] -> [n, S]``, with a one-pass backward.

    PyTorch's generic norm backward spends several passes over the decoder (division, zero-norm
    masking); here it is ``W · (∂/‖W‖)``. Decoder rows never have zero norm (SAELens's init, or
    renormalisation), and the clamp keeps a degenerate row finite.
    """

    @staticmethod
    def forward(ctx, W):
        norm = torch.linalg.vector_norm(W, dim=-1)
        ctx.save_for_backward(W, norm)
        return norm

    @staticmethod
    def backward(ctx, grad):
        W, norm = ctx.saved_tensors
        return W * (grad.to(W.dtype) / norm.clamp_min(1e-12))[..., None]


def _rectangle(u: torch.Tensor) -> torch.Tensor:
    return ((u > -0.5) & (u < 0.5)).to(u)


class _StackedJumpReLU(torch.autograd.Function):
    """JumpReLU z·1[z > θ] with the straight-through threshold gradient of Rajamanoharan et al.

    SAELens's own ``JumpReLU`` sums the threshold gradient over dimension 0, which for stacked
    inputs ``[n, B, S]`` would mix members; this version sums over the batch axis (-2).
    """

    @staticmethod
    def forward(ctx, x, threshold, bandwidth):
        ctx.save_for_backward(x, threshold)
        ctx.bandwidth = bandwidth
        return x * (x > threshold)

    @staticmethod
    def backward(ctx, grad):
        x, threshold = ctx.saved_tensors
        bw = ctx.bandwidth
        ste = (threshold / bw) * _rectangle((x - threshold) / bw) * grad
        grad_x = ((x > threshold) * grad).to(x.dtype)
        return grad_x, (-ste).sum(-2, keepdim=True).to(threshold.dtype), None


class _StackedStep(torch.autograd.Function):
    """Heaviside 1[z > θ] whose pseudo-gradient reaches only θ (SAELens's ``Step``, stacked)."""

    @staticmethod
    def forward(ctx, x, threshold, bandwidth):
        ctx.save_for_backward(x, threshold)
        ctx.bandwidth = bandwidth
        return (x > threshold).to(x)

    @staticmethod
    def backward(ctx, grad):
        x, threshold = ctx.saved_tensors
        bw = ctx.bandwidth
        ste = (1.0 / bw) * _rectangle((x - threshold) / bw) * grad
        return None, (-ste).sum(-2, keepdim=True).to(threshold.dtype), None


def _check_supported(sae: TrainingSAE) -> None:
    """Refuse SAELens options whose loss the stacked engine does not reproduce."""
    cfg = sae.cfg
    arch = ARCH_ALIASES.get(cfg.architecture(), cfg.architecture())
    problems = []
    if arch not in ARCHITECTURES:
        problems.append(f"architecture {cfg.architecture()!r}")
    if not cfg.apply_b_dec_to_input:
        problems.append("apply_b_dec_to_input=False")
    if cfg.normalize_activations != "none":
        problems.append(f"normalize_activations={cfg.normalize_activations!r}")
    if getattr(cfg, "lp_norm", 1.0) != 1.0:
        problems.append("lp_norm != 1")
    if getattr(cfg, "use_sparse_activations", False):
        problems.append("use_sparse_activations")
    if arch == "jumprelu" and (
        cfg.jumprelu_sparsity_loss_mode != "step"
        or cfg.pre_act_loss_coefficient is not None
        or cfg.jumprelu_ste_to_input
    ):
        problems.append("jumprelu options other than the default step L0 loss")
    if problems:
        raise NotImplementedError(
            f"saekit's trainer does not support SAELens {', '.join(problems)}; "
            "train such SAEs with sae_lens.SAETrainer"
        )
