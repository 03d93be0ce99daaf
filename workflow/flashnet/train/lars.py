"""LARS: layer-wise adaptive rate scaling for large-batch SGD.

Reference: Y. You, I. Gitman, B. Ginsburg, "Large Batch Training of Convolutional
Networks", arXiv:1708.03888 (2017). Each parameter tensor ("layer") gets its own
learning-rate multiplier, the *trust ratio*

    τ = η‖w‖ / (‖g‖ + λ‖w‖ + ε),      τ = 1 where ‖w‖ = 0 or ‖g‖ = 0,

so that one global learning rate suits layers whose gradient-to-weight ratios differ
by orders of magnitude; this is what lets ResNet-50 train at batch 32k-80k.
LARC (NVIDIA apex) optionally clips it so the local rate never exceeds the global
one: τ ← min(τ / lr, 1).

The update of one tensor w with gradient g, weight decay λ, momentum m:

    d   = g + λ·w
    u   = τ·d
    buf = m·buf + u                    (the first step starts from buf = 0, i.e. buf = u)
    w  ← w − lr·(u + m·buf)            if nesterov
    w  ← w − lr·buf                    otherwise

This is PyTorch-SGD-style momentum: the learning rate stays outside the buffer, so a
schedule changing lr takes effect at once (as in torch.optim.SGD and timm's `Lars`).

Following MLPerf's ResNet-50 reference (and the Goyal/You large-batch recipes),
BatchNorm parameters and biases get neither the trust ratio nor weight decay:
`lars_param_groups` builds those two groups.

Implementation: the tensors of a group are updated with `torch._foreach_*` ops, and
the per-tensor trust ratios stay on the device as one vector, so `step()` never waits
for the device (no `.item()`, no Python branch on a tensor value).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

# A per-tensor coefficient c_i: one Python number for the whole list (plain SGD groups)
# or a device vector with one entry per tensor (LARS groups, where it depends on τ).
Coefficient = float | Tensor

# (params, grads, momentum buffers) of one device and dtype; buffers empty without momentum.
Batch = tuple[list[Tensor], list[Tensor], list[Tensor]]


def trust_ratio(
    weight_norms: Tensor,
    grad_norms: Tensor,
    *,
    eta: float,
    weight_decay: float,
    eps: float,
    lr: float,
    trust_clip: bool,
) -> Tensor:
    """Trust ratios of a batch of tensors from their norms (You et al. 2017, eq. in §3).

        τ = η‖w‖ / (‖g‖ + λ‖w‖ + ε)
        τ = 1                         where ‖w‖ = 0 or ‖g‖ = 0
        τ = min(τ / lr, 1)            with LARC trust clipping

    τ = 1 for zero norms because a freshly zero-initialised tensor (‖w‖ = 0) must still
    move, and a tensor without gradient signal (‖g‖ = 0) has nothing to rescale.
    `torch.where` keeps this on the device: no host synchronisation.
    """
    ratio = eta * weight_norms / (grad_norms + weight_decay * weight_norms + eps)
    ratio = torch.where((weight_norms > 0) & (grad_norms > 0), ratio, 1.0)
    if trust_clip:
        ratio = torch.clamp(ratio / lr, max=1.0)
    return ratio


def _foreach_add_scaled_(targets: list[Tensor], coeff: Coefficient, tensors: list[Tensor]) -> None:
    """targets[i] += c_i · tensors[i], in place: one pass, no temporary.

    A vector c is split into one 0-dim tensor per target and passed as addcmul's
    *first* factor: CUDA's multi-tensor addcmul has a fused path for a list of 0-dim
    first factors (`PointwiseOpScalar0dTensorFunctor`, pytorch#172731, in the 2.14
    build), while a 0-dim second factor falls back to one kernel per tensor (same
    result, more launches). The cast to the targets' dtype keeps the lists uniform, as
    the fused path needs; addcmul would round the factor to that dtype anyway.
    `tensors` may be `targets` itself (w += c·w): elementwise, so safe in place.
    """
    if isinstance(coeff, Tensor):
        factors = list(coeff.to(targets[0].dtype).unbind(0))
        torch._foreach_addcmul_(targets, factors, tensors)
    else:
        torch._foreach_add_(targets, tensors, alpha=coeff)


def _update_coefficients(
    params: list[Tensor], grads: list[Tensor], group: dict[str, Any]
) -> tuple[Coefficient, Coefficient]:
    """(a, b) with u = a·g + b·w: a = τ, b = τλ under LARS, a = 1, b = λ otherwise.

    Splitting u = τ·(g + λw) into a·g + b·w lets every pass read g and w straight
    from memory instead of materialising d = g + λw (on CPU the fresh 100 MB
    allocation for ResNet-50 costs more than the arithmetic; see docs/benchmarks/lars.md).
    """
    weight_decay = group["weight_decay"]
    if not group["lars"]:
        return 1.0, weight_decay
    # Norms in at least float32, so τ is not a bfloat16 quotient (all tensors of a batch
    # share one dtype, see LARS._tensors_by_device_and_dtype).
    norm_dtype = torch.promote_types(params[0].dtype, torch.float32)
    weight_norms = torch.stack(torch._foreach_norm(params, 2, dtype=norm_dtype))
    grad_norms = torch.stack(torch._foreach_norm(grads, 2, dtype=norm_dtype))
    # Fujitsu's MLPerf v0.6 kernel divides by an unscheduled wd of its own (trust_weight_decay);
    # None: the group's weight decay, as You et al. and MLPerf's reference.
    trust_wd = group.get("trust_weight_decay")
    ratios = trust_ratio(
        weight_norms,
        grad_norms,
        eta=group["eta"],
        weight_decay=weight_decay if trust_wd is None else trust_wd,
        eps=group["eps"],
        lr=group["lr"],
        trust_clip=group["trust_clip"],
    )
    return ratios, ratios * weight_decay


def _lars_update_(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffers: list[Tensor],
    group: dict[str, Any],
) -> None:
    """One LARS (or plain SGD, for `lars=False`) step over tensors of one device and dtype.

    With u = a·g + b·w (see `_update_coefficients`):

        buf ← m·buf + a·g + b·w                         (momentum > 0)
        w   ← w − lr·buf                                 (heavy ball)
        w   ← w − lr·b·w − lr·a·g − lr·m·buf             (nesterov: w − lr·(u + m·buf))
        w   ← w − lr·b·w − lr·a·g                        (no momentum: w − lr·u)

    The buffer update reads the old w, so it runs before w changes.
    """
    lr, momentum, weight_decay = group["lr"], group["momentum"], group["weight_decay"]
    grad_coeff, weight_coeff = _update_coefficients(params, grads, group)

    if momentum != 0:
        torch._foreach_mul_(momentum_buffers, momentum)
        _foreach_add_scaled_(momentum_buffers, grad_coeff, grads)
        if weight_decay != 0:
            _foreach_add_scaled_(momentum_buffers, weight_coeff, params)
        if not group["nesterov"]:
            torch._foreach_add_(params, momentum_buffers, alpha=-lr)
            return

    # Decay first: it must scale the w the step started from, not w − lr·a·g.
    if weight_decay != 0:
        _foreach_add_scaled_(params, -lr * weight_coeff, params)
    _foreach_add_scaled_(params, -lr * grad_coeff, grads)
    if momentum != 0:  # nesterov look-ahead
        torch._foreach_add_(params, momentum_buffers, alpha=-lr * momentum)


# Parameter bytes per CPU bucket: with gradients and momentum buffers its working set is
# 3x this, which a server CPU's last-level cache holds.
CPU_BUCKET_BYTES = 8 << 20


def _cache_sized_buckets(batch: Batch) -> list[Batch]:
    """Split a CPU batch into consecutive buckets of at most CPU_BUCKET_BYTES of
    parameters (or one tensor, if larger); CUDA batches stay whole.

    On CPU a foreach op walks all of its tensors before the next op starts, so with
    ResNet-50's 100 MB per list every pass of `_lars_update_` streams from DRAM. Bucket
    by bucket, the passes after the norms find the bucket in cache (docs/benchmarks/lars.md
    has the measurement). τ is per tensor, so the result is bit-identical. On CUDA kernel
    launches are what counts, and multi_tensor_apply already streams: one batch is best.
    """
    params, grads, buffers = batch
    if params[0].device.type != "cpu":
        return [batch]
    bounds, size = [0], 0
    for i, p in enumerate(params):
        nbytes = p.numel() * p.element_size()
        if size and size + nbytes > CPU_BUCKET_BYTES:
            bounds.append(i)
            size = 0
        size += nbytes
    bounds.append(len(params))
    return [(params[a:b], grads[a:b], buffers[a:b]) for a, b in zip(bounds, bounds[1:])]


class LARS(torch.optim.Optimizer):
    """Layer-wise adaptive rate scaling with SGD momentum (You et al. 2017, arXiv:1708.03888).

    Per parameter tensor w with gradient g (module docstring has the full derivation):

        τ   = η‖w‖ / (‖g‖ + λ‖w‖ + ε)   (1 where ‖w‖ = 0 or ‖g‖ = 0; min(τ/lr, 1) if trust_clip)
        u   = τ·(g + λ·w)
        buf = m·buf + u
        w  ← w − lr·(u + m·buf if nesterov else buf)

    Groups with `lars=False` skip τ (τ = 1): plain SGD momentum with their own weight
    decay, as MLPerf does for BatchNorm parameters and biases (see `lars_param_groups`).

    Args:
        params: parameters or param-group dicts.
        lr: global learning rate (a Python number; schedulers change `group["lr"]`).
        momentum: m; 0.9 is MLPerf's ResNet-50 value. 0 keeps no buffers.
        weight_decay: λ, L2 penalty added to the gradient before the trust ratio.
        eta: trust coefficient η (0.001 in You et al. and MLPerf).
        eps: ε in the denominator of τ (1e-8, timm's default).
        nesterov: Nesterov momentum.
        trust_clip: LARC clipping τ ← min(τ / lr, 1).
        lars: apply the trust ratio to this group.

    Parameters without a gradient are skipped. State: `momentum_buffer` per parameter,
    so `state_dict()`/`load_state_dict()` resume a run exactly.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        eta: float = 0.001,
        eps: float = 1e-8,
        nesterov: bool = False,
        trust_clip: bool = False,
        lars: bool = True,
        trust_weight_decay: float | None = None,
    ) -> None:
        defaults = dict(
            lr=lr,
            momentum=momentum,
            weight_decay=weight_decay,
            eta=eta,
            eps=eps,
            nesterov=nesterov,
            trust_clip=trust_clip,
            lars=lars,
            trust_weight_decay=trust_weight_decay,
        )
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group, filling defaults, and reject hyperparameters LARS cannot use."""
        super().add_param_group(param_group)
        _check_hyperparameters(self.param_groups[-1])

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """One optimisation step; `closure` re-evaluates the model and returns the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for batch in self._tensors_by_device_and_dtype(group):
                for params, grads, buffers in _cache_sized_buckets(batch):
                    _lars_update_(params, grads, buffers, group)
        return loss

    def _tensors_by_device_and_dtype(self, group: dict[str, Any]) -> list[Batch]:
        """(params, grads, momentum buffers) of the group's params that have a gradient,
        one triple per (device, dtype): foreach kernels and `torch.stack` of the norms
        need one device, and the fused CUDA path one dtype."""
        batches: dict[tuple[torch.device, torch.dtype], tuple[list, list, list]] = {}
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError("LARS does not support sparse gradients")
            params, grads, buffers = batches.setdefault((p.device, p.dtype), ([], [], []))
            params.append(p)
            grads.append(p.grad)
            if group["momentum"] != 0:
                buffers.append(self._momentum_buffer(p))
        return list(batches.values())

    def _momentum_buffer(self, p: Tensor) -> Tensor:
        """The parameter's buffer, created as zeros on its first step: m·0 + u = u, which is
        SGD's initialisation buf = u without a second code path."""
        state = self.state[p]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state["momentum_buffer"]


def _check_hyperparameters(group: dict[str, Any]) -> None:
    """Raise ValueError for hyperparameters outside their domain."""
    for name in ("lr", "momentum", "weight_decay", "eta", "eps"):
        if group[name] < 0:
            raise ValueError(f"LARS: {name} must be >= 0, got {group[name]}")
    if group["nesterov"] and group["momentum"] <= 0:
        raise ValueError("LARS: nesterov needs momentum > 0")


def lars_param_groups(
    model: nn.Module, weight_decay: float, exclude_bn_and_bias: bool = True, decayed: Iterable[Tensor] = ()
) -> list[dict[str, Any]]:
    """Param groups for `LARS`, excluding BatchNorm parameters and biases as MLPerf does.

    MLPerf's ResNet-50 LARS reference applies neither the trust ratio nor weight decay to
    BatchNorm γ/β and biases: they are few, their norms carry no layer-scale meaning, and
    decaying γ towards 0 hurts accuracy. They are exactly the tensors with ndim <= 1
    (conv/linear weights are 4-D/2-D), so the split goes by ndim:

        [{"params": ndim >= 2, "weight_decay": weight_decay, "lars": True},
         {"params": ndim <= 1, "weight_decay": 0.0,          "lars": False}]

    ``decayed`` biases (NVIDIA's MLPerf runs: the classifier's bias, ``set_wd_mult`` in its
    fit.py) get weight decay without the trust ratio, in a third group.
    With `exclude_bn_and_bias=False`, one LARS group holds everything. Every parameter
    appears exactly once (frozen ones too: without a gradient LARS skips them); empty
    groups are left out.
    """
    params = list(model.parameters())
    if not exclude_bn_and_bias:
        return [{"params": params, "weight_decay": weight_decay, "lars": True}]
    decayed_ids = {id(p) for p in decayed}
    adapted = [p for p in params if p.ndim > 1]
    excluded = [p for p in params if p.ndim <= 1 and id(p) not in decayed_ids]
    groups = [
        {"params": adapted, "weight_decay": weight_decay, "lars": True},
        {"params": excluded, "weight_decay": 0.0, "lars": False},
        {"params": [p for p in params if p.ndim <= 1 and id(p) in decayed_ids], "weight_decay": weight_decay,
         "lars": False},
    ]
    return [g for g in groups if g["params"]]
