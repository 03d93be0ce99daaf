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
for the device (no `.item()`, no Python branch on a tensor value). The learning rate is a
0-dim device tensor too, read from a device-side schedule indexed by a device-side step
counter, and the parameter lists are gathered once: no host value changes from step to
step, as CUDA graph capture and torch.compile need. GradScaler's inf/NaN skip (fp16)
happens on the device as well (`LARS.step`).
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

    c is a Python number (one kernel argument for the list), a 0-dim device tensor (the same
    factor for every target: the LR) or a vector with one entry per target (τ). Tensors are
    passed as addcmul's *first* factor, one 0-dim tensor per target: CUDA's multi-tensor
    addcmul has a fused path for a list of 0-dim first factors
    (`PointwiseOpScalar0dTensorFunctor`, pytorch#172731, in the 2.14 build), while a 0-dim
    second factor falls back to one kernel per tensor (same result, more launches). The cast
    to the targets' dtype keeps the lists uniform, as the fused path needs; addcmul would
    round the factor to that dtype anyway. `tensors` may be `targets` itself (w += c·w):
    elementwise, so safe in place.
    """
    if isinstance(coeff, Tensor):
        coeff = coeff.to(targets[0].dtype)
        factors = [coeff] * len(targets) if coeff.dim() == 0 else list(coeff.unbind(0))
        torch._foreach_addcmul_(targets, factors, tensors)
    else:
        torch._foreach_add_(targets, tensors, alpha=coeff)


def _update_coefficients(
    params: list[Tensor], grads: list[Tensor], group: dict[str, Any], lr: Coefficient
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
    # share one dtype, see LARS._batches).
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
        lr=lr,
        trust_clip=group["trust_clip"],
    )
    return ratios, ratios * weight_decay


def _lars_update_(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffers: list[Tensor],
    group: dict[str, Any],
    keep: Tensor | None = None,
) -> None:
    """One LARS (or plain SGD, for `lars=False`) step over tensors of one device and dtype.

    With u = a·g + b·w (see `_update_coefficients`) and the momentum form's scales
    (s_in, s_out) = (1, lr) for "torch", (lr, 1) for "tf_reference" (see `MOMENTUM_FORMS`):

        buf ← m·buf + s_in·(a·g + b·w)                  (momentum > 0)
        w   ← w − s_out·buf                              (heavy ball)
        w   ← w − lr·b·w − lr·a·g − s_out·m·buf          (nesterov)
        w   ← w − lr·b·w − lr·a·g                        (no momentum)

    `keep` (GradScaler's step, see `LARS.step`): a 0-dim 1.0 to apply the step, 0.0 to skip it
    on the device. The gradients are then all zero, so with b, lr and s_out multiplied by
    `keep` and m replaced by 1 − keep·(1 − m), every line above leaves w and buf as they were.

    The buffer update reads the old w, so it runs before w changes.
    """
    lr, momentum, weight_decay = group["lr"], group["momentum"], group["weight_decay"]
    grad_coeff, weight_coeff = _update_coefficients(params, grads, group, lr)
    tf_form = group["momentum_form"] == "tf_reference"
    into_buffer, out_of_buffer = (lr, 1.0) if tf_form else (1.0, lr)
    buffer_decay: Coefficient = momentum
    if keep is not None:
        lr, out_of_buffer = lr * keep, out_of_buffer * keep
        weight_coeff = weight_coeff * keep
        buffer_decay = 1.0 - keep * (1.0 - momentum)

    if momentum != 0:
        if isinstance(buffer_decay, Tensor):
            torch._foreach_mul_(momentum_buffers, buffer_decay.to(momentum_buffers[0].dtype))
        else:
            torch._foreach_mul_(momentum_buffers, buffer_decay)
        _foreach_add_scaled_(momentum_buffers, _times(into_buffer, grad_coeff), grads)
        if weight_decay != 0:
            _foreach_add_scaled_(momentum_buffers, _times(into_buffer, weight_coeff), params)
        if not group["nesterov"]:
            _foreach_add_scaled_(params, _times(-1.0, out_of_buffer), momentum_buffers)
            return

    # Decay first: it must scale the w the step started from, not w − lr·a·g.
    if weight_decay != 0:
        _foreach_add_scaled_(params, _times(-lr, weight_coeff), params)
    _foreach_add_scaled_(params, _times(-lr, grad_coeff), grads)
    if momentum != 0:  # nesterov look-ahead
        _foreach_add_scaled_(params, _times(-momentum, out_of_buffer), momentum_buffers)


def _times(x: Coefficient, y: Coefficient) -> Coefficient:
    """x·y without a kernel where one factor is the Python number 1."""
    if isinstance(x, float | int) and x == 1:
        return y
    if isinstance(y, float | int) and y == 1:
        return x
    return x * y


# Parameter bytes per CPU bucket: with gradients and momentum buffers its working set is
# 3x this, which a server CPU's last-level cache holds.
CPU_BUCKET_BYTES = 8 << 20

# The momentum buffer's form (LARS(momentum_form=...) and the run key lars_momentum_form).
MOMENTUM_FORMS = ("torch", "tf_reference")


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


def lr_table(schedule: Callable[[int], float], steps: int) -> Tensor:
    """`schedule(step)` for steps 0 … `steps` − 1 as a float32 vector, for `LARS(lr_schedule=...)`:
    the step then reads its LR from the device, and the last entry holds for every later step
    (pass the schedule's horizon + 1 steps for one that stays at its floor)."""
    return torch.tensor([schedule(step) for step in range(steps)], dtype=torch.float32)


class LARS(torch.optim.Optimizer):
    """Layer-wise adaptive rate scaling with SGD momentum (You et al. 2017, arXiv:1708.03888).

    Per parameter tensor w with gradient g (module docstring has the full derivation):

        τ   = η‖w‖ / (‖g‖ + λ‖w‖ + ε)   (1 where ‖w‖ = 0 or ‖g‖ = 0; min(τ/lr, 1) if trust_clip)
        u   = τ·(g + λ·w)
        buf = m·buf + u                  w ← w − lr·(u + m·buf if nesterov else buf)   ("torch")
        buf = m·buf + lr·u               w ← w − (lr·u + m·buf if nesterov else buf)   ("tf_reference")

    Groups with `lars=False` skip τ (τ = 1): plain SGD momentum with their own weight
    decay, as MLPerf does for BatchNorm parameters and biases (see `lars_param_groups`).

    Args:
        params: parameters or param-group dicts.
        lr: global learning rate: a number (kept as a 0-dim tensor on the parameters' device)
            or a 0-dim tensor. A scheduler may still assign Python numbers to `group["lr"]`;
            the step then bakes that number into its kernels, as torch.optim.SGD does.
        momentum: m; 0.9 is MLPerf's ResNet-50 value. 0 keeps no buffers.
        weight_decay: λ, L2 penalty added to the gradient before the trust ratio.
        eta: trust coefficient η (0.001 in You et al. and MLPerf).
        eps: ε in the denominator of τ (1e-8, timm's default).
        nesterov: Nesterov momentum.
        trust_clip: LARC clipping τ ← min(τ / lr, 1).
        lars: apply the trust ratio to this group.
        momentum_form: "torch" (PyTorch SGD's buffer, LR outside it; NVIDIA's MXNet LARS,
            which rescales its buffer when the LR changes, equals it) or "tf_reference" (the
            MLPerf TF2 reference's `LARSOptimizer._resource_apply_dense`, mlcommons/training
            image_classification/tensorflow2/lars_optimizer.py: mom = m·mom − lr·τ·d,
            w = w + mom, so the buffer keeps the LRs it was filled with). They agree while
            the LR is constant and differ during warmup and decay. The buffer is stored with
            flashnet's sign (−mom), so w ← w − buf in both.
        lr_schedule: the LR of every applied step (a vector, see `lr_table`; the last entry
            holds after it). The step reads `lr_schedule[step]` on the device into
            `group["lr"]` and advances each group's `schedule_step` counter, also on the
            device, only when the step was applied: a step GradScaler skips (inf/NaN
            gradients) does not advance the schedule. Without it the LR is `group["lr"]`.

    fp16 with `torch.amp.GradScaler`: `_step_supports_amp_scaling` tells the scaler to hand
    its `grad_scale` and `found_inf` tensors to `step()` instead of reading found_inf on the
    host (`.item()`, a device sync every step) to decide whether to call it; LARS unscales
    the gradients and skips a step with found_inf on the device. Lightning's MixedPrecision
    plugin then also leaves unscaling to the optimizer (`_optimizer_handles_unscaling`).

    The parameter lists (grouped by device and dtype, in CPU buckets) and the momentum
    buffers are gathered once and reused while the same parameters have gradients; only
    the gradients are looked up each step (`zero_grad(set_to_none=True)` replaces them).
    Parameters without a gradient are skipped. State: `momentum_buffer` per parameter and
    `lr`/`schedule_step` per group, so `state_dict()`/`load_state_dict()` resume exactly.
    """

    _step_supports_amp_scaling = True

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float | Tensor,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        eta: float = 0.001,
        eps: float = 1e-8,
        nesterov: bool = False,
        trust_clip: bool = False,
        lars: bool = True,
        trust_weight_decay: float | None = None,
        momentum_form: str = "torch",
        lr_schedule: Tensor | None = None,
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
            momentum_form=momentum_form,
        )
        if lr_schedule is not None and (lr_schedule.dim() != 1 or len(lr_schedule) == 0):
            raise ValueError(f"LARS: lr_schedule must be a non-empty vector, got shape {tuple(lr_schedule.shape)}")
        self.lr_schedule = lr_schedule
        self._plans: dict[int, tuple[tuple[bool, ...], list[Batch]]] = {}
        super().__init__(params, defaults)
        if lr_schedule is not None:  # beside the step counters, so no step copies it
            self.lr_schedule = lr_schedule.to(self.param_groups[0]["schedule_step"].device)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group, filling defaults, rejecting hyperparameters LARS cannot use, and
        keeping its LR (the schedule's first if there is one) and step counter on the device."""
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        _check_hyperparameters(group)
        first = group["params"][0] if group["params"] else torch.empty(())
        if self.lr_schedule is not None:
            group["lr"] = self.lr_schedule[0]
        # float32 at least, float64 for float64 parameters (an LR rounded to 24 bits is ~1e-8 off)
        group["lr"] = _on_device(group["lr"], first.device, torch.promote_types(first.dtype, torch.float32))
        device = first.device
        group["schedule_step"] = _on_device(group.get("schedule_step", 0), device, torch.int64)
        self._plans.clear()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load, then put each group's LR and counter on its parameters' device; the momentum
        buffers are new tensors, so the gathered lists are rebuilt."""
        super().load_state_dict(state_dict)
        for group in self.param_groups:
            device = group["params"][0].device
            if isinstance(group["lr"], Tensor):
                group["lr"] = group["lr"].to(device)
            group["schedule_step"] = _on_device(group.get("schedule_step", 0), device, torch.int64)
        self._plans.clear()

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """One optimisation step; `closure` re-evaluates the model and returns the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # Set by torch.amp.GradScaler.step for the duration of this call (absent otherwise).
        found_inf: Tensor | None = getattr(self, "found_inf", None)
        grad_scale: Tensor | None = getattr(self, "grad_scale", None)
        for index, group in enumerate(self.param_groups):
            plan = self._plan(index, group)
            keep = None
            if found_inf is not None:
                keep = self._unscale_or_zero_(plan, found_inf, grad_scale)
            for params, grads, buffers in plan:
                _lars_update_(params, [p.grad for p in params], buffers, group, keep)
            self._advance_schedule(group, keep)
        return loss

    def _plan(self, index: int, group: dict[str, Any]) -> list[Batch]:
        """The group's (params, grads, buffers) buckets, gathered again only when the set of
        parameters with a gradient changed (or after loading a state). The grads slot of a
        bucket is left empty: gradients are looked up each step."""
        with_grad = tuple(p.grad is not None for p in group["params"])
        cached = self._plans.get(index)
        if cached is None or cached[0] != with_grad:
            batches = [bucket for batch in self._batches(group) for bucket in _cache_sized_buckets(batch)]
            cached = (with_grad, [(params, [], buffers) for params, _, buffers in batches])
            self._plans[index] = cached
        return cached[1]

    def _unscale_or_zero_(self, plan: list[Batch], found_inf: Tensor, grad_scale: Tensor | None) -> Tensor:
        """GradScaler's step: the gradients divided by the loss scale, or all zero where the
        scaler found an inf/NaN (the zeros keep τ and every product finite; `_lars_update_`
        then leaves w and buf unchanged). Returns keep = 1 − found_inf, on the device.

        The multiply and `nan_to_num_` are two passes over the gradients, paid in fp16 runs
        only; GradScaler's own `unscale_` would be one, but it needs the host-side skip."""
        keep = 1.0 - found_inf.float()
        factor = keep if grad_scale is None else keep * grad_scale.double().reciprocal().float()
        for params, _, _ in plan:
            grads = [p.grad for p in params]
            torch._foreach_mul_(grads, factor.to(grads[0].device))
            for grad in grads:  # 0·inf is NaN: zero what the multiply could not
                torch.nan_to_num_(grad, nan=0.0, posinf=0.0, neginf=0.0)
        return keep

    def _advance_schedule(self, group: dict[str, Any], keep: Tensor | None) -> None:
        """Count the step (only if applied) and load the next step's LR, all on the device."""
        counter = group["schedule_step"]
        counter.add_(1 if keep is None else keep.to(counter.device, torch.int64))
        if self.lr_schedule is None:
            return
        if self.lr_schedule.device != counter.device:
            self.lr_schedule = self.lr_schedule.to(counter.device)
        # index_select, not lr_schedule[counter]: indexing may read a 0-dim index on the host.
        position = counter.clamp(max=len(self.lr_schedule) - 1).reshape(1)
        next_lr = torch.index_select(self.lr_schedule, 0, position).reshape(())
        if isinstance(group["lr"], Tensor):
            group["lr"].copy_(next_lr)
        else:
            group["lr"] = next_lr.clone()

    def _batches(self, group: dict[str, Any]) -> list[Batch]:
        """(params, [], momentum buffers) of the group's params that have a gradient, one
        triple per (device, dtype): foreach kernels and `torch.stack` of the norms need one
        device, and the fused CUDA path one dtype."""
        batches: dict[tuple[torch.device, torch.dtype], tuple[list, list, list]] = {}
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError("LARS does not support sparse gradients")
            params, _, buffers = batches.setdefault((p.device, p.dtype), ([], [], []))
            params.append(p)
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


def _on_device(value: float | Tensor, device: torch.device, dtype: torch.dtype) -> Tensor:
    """`value` as a 0-dim tensor of `dtype` on `device` (a copy, so groups never share one)."""
    if isinstance(value, Tensor):
        return value.detach().to(device=device, dtype=dtype).clone()
    return torch.tensor(value, device=device, dtype=dtype)


def _check_hyperparameters(group: dict[str, Any]) -> None:
    """Raise ValueError for hyperparameters outside their domain (a tensor LR is read once, here)."""
    for name in ("lr", "momentum", "weight_decay", "eta", "eps"):
        if float(group[name]) < 0:
            raise ValueError(f"LARS: {name} must be >= 0, got {float(group[name])}")
    if group["momentum_form"] not in MOMENTUM_FORMS:
        raise ValueError(f"LARS: momentum_form must be one of {MOMENTUM_FORMS}, got {group['momentum_form']!r}")
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
