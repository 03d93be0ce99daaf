"""Tests of flashnet.train.lars against independent references.

timm's per-parameter `timm.optim.Lars` is the reference for LARS groups, torch.optim.SGD
for plain-SGD groups (`lars=False`). Both are run in lockstep with ours on the same
gradients and learning-rate schedule, and parameters and momentum buffers are compared
after every step.

Flag mapping to timm: our `lars=True` group is timm's `always_adapt=True` (timm skips
the trust ratio when weight_decay == 0 unless always_adapt); `trust_clip`, `nesterov`,
`eps` and `eta` (timm: `trust_coeff`) mean the same.
"""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
import torchvision
from timm.optim import Lars as TimmLars

import flashnet.train.lars as lars_module
from flashnet.train.lars import LARS, lars_param_groups, trust_ratio

STEPS = 50
ETA = 0.001

# name -> shape; every kind of tensor a network hands LARS.
SHAPES = {
    "conv": (8, 4, 3, 3),
    "linear": (16, 8),
    "vector": (16,),
    "scalar": (),
    "zero_init": (5, 5),  # ‖w‖ = 0 on the first step: τ = 1
    "zero_grad": (6,),  # ‖g‖ = 0 on every step: τ = 1, only weight decay moves it
    "tiny_grad": (7,),  # ‖g‖ ~ 1e-8, the size of ε: checks where ε enters τ
    "frozen": (3, 3),  # never gets a gradient: must be skipped
}

# Largest difference allowed, as a fraction of the tensor's largest |value|: elementwise
# relative error means nothing for entries that pass through zero. float32 runs free for
# 50 steps: a few ulps apart, because we add τ·g and τλ·w to the buffer separately where
# timm first forms τ·(g + λw). bfloat16 is teacher-forced (see `run_lockstep`): timm
# forms τ from bfloat16 norms, we from float32 ones, so one step differs by ~2 bf16 ulps.
TOLERANCES = {torch.float32: 1e-5, torch.bfloat16: 2**-6}


def assert_close_to_scale(
    actual: torch.Tensor, expected: torch.Tensor, tolerance: float, what: str, before: torch.Tensor | None = None
) -> None:
    """max |actual − expected| <= tolerance · scale, scale = max |expected| (and max |before|,
    the value the step started from: a buffer m·buf + u can cancel to far below the
    magnitude of the terms whose rounding errors it carries)."""
    actual, expected = actual.detach().double(), expected.detach().double()
    error = (actual - expected).abs().max().item()
    scale = expected.abs().max().item()
    if before is not None:
        scale = max(scale, before.detach().double().abs().max().item())
    assert error <= tolerance * scale, f"{what}: error {error:.3g} > {tolerance:.3g} x scale {scale:.3g}"


def lr_schedule(step: int, peak: float = 4.0) -> float:
    """Linear warm-up over 10 steps then polynomial (power 2) decay, as LARS recipes use;
    a different lr at every step exercises lr staying outside the momentum buffer."""
    warmup = min(1.0, (step + 1) / 10)
    return peak * warmup * (1 - step / STEPS) ** 2 + 1e-3


def make_params(dtype: torch.dtype, seed: int = 0) -> dict[str, torch.nn.Parameter]:
    """Parameters of SHAPES, random except the zero-initialised one."""
    g = torch.Generator().manual_seed(seed)
    params = {}
    for name, shape in SHAPES.items():
        value = torch.zeros(shape) if name == "zero_init" else torch.randn(shape, generator=g)
        params[name] = torch.nn.Parameter(value.to(dtype))
    return params


def make_grads(params: dict[str, torch.Tensor], step: int) -> dict[str, torch.Tensor | None]:
    """Deterministic gradients of step `step`: random, scaled per tensor so that the
    trust ratios differ by orders of magnitude across tensors."""
    g = torch.Generator().manual_seed(1000 + step)
    grads: dict[str, torch.Tensor | None] = {}
    for i, (name, p) in enumerate(params.items()):
        grad = torch.randn(p.shape, generator=g) * 10.0 ** (i - 3)
        grads[name] = grad.to(p.dtype)
    grads["zero_grad"] = torch.zeros_like(params["zero_grad"])
    grads["tiny_grad"] = (torch.randn(params["tiny_grad"].shape, generator=g) * 1e-8).to(params["tiny_grad"].dtype)
    grads["frozen"] = None
    return grads


def set_grads(params: dict[str, torch.Tensor], grads: dict[str, torch.Tensor | None]) -> None:
    for name, p in params.items():
        p.grad = None if grads[name] is None else grads[name].clone()


def run_lockstep(ours, ours_params, reference, reference_params, dtype, steps=STEPS):
    """Step both optimisers on the same gradients and lr; compare params and buffers after
    every step.

    bfloat16 runs are teacher-forced: before each step ours is set to the reference's
    parameters and buffers, so each comparison measures one step's difference instead of
    50 steps of two rounding sequences drifting apart.
    """
    tolerance = TOLERANCES[dtype]
    for step in range(steps):
        if dtype == torch.bfloat16:
            copy_state(reference, reference_params, ours, ours_params)
        grads = make_grads(ours_params, step)
        set_grads(ours_params, grads)
        set_grads(reference_params, grads)
        for opt in (ours, reference):
            for group in opt.param_groups:
                group["lr"] = lr_schedule(step)
        buffers_before = {
            name: reference.state[p]["momentum_buffer"].clone()
            for name, p in reference_params.items()
            if "momentum_buffer" in reference.state.get(p, {})
        }
        ours.step()
        reference.step()
        for name in SHAPES:
            what = f"{name} at step {step}"
            assert_close_to_scale(ours_params[name], reference_params[name], tolerance, what)
            ours_state = ours.state.get(ours_params[name], {})
            reference_state = reference.state.get(reference_params[name], {})
            assert ours_state.keys() == reference_state.keys(), what
            if "momentum_buffer" in ours_state:
                assert_close_to_scale(
                    ours_state["momentum_buffer"],
                    reference_state["momentum_buffer"],
                    tolerance,
                    f"buffer of {what}",
                    before=buffers_before.get(name),
                )


def copy_state(source, source_params, target, target_params) -> None:
    """Overwrite target's parameters and momentum buffers with source's."""
    with torch.no_grad():
        for name, p in source_params.items():
            target_params[name].copy_(p)
            if "momentum_buffer" in source.state.get(p, {}):
                target.state[target_params[name]]["momentum_buffer"].copy_(source.state[p]["momentum_buffer"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("weight_decay", [0.0, 5e-4])
@pytest.mark.parametrize("trust_clip", [False, True], ids=["noclip", "clip"])
@pytest.mark.parametrize(
    "momentum, nesterov", [(0.0, False), (0.9, False), (0.9, True)], ids=["sgd", "heavyball", "nesterov"]
)
def test_lars_group_matches_timm(dtype, weight_decay, trust_clip, momentum, nesterov):
    ours_params, timm_params = make_params(dtype), make_params(dtype)
    hyper = dict(momentum=momentum, weight_decay=weight_decay, nesterov=nesterov, trust_clip=trust_clip)
    ours = LARS(ours_params.values(), lr=1.0, eta=ETA, **hyper)
    reference = TimmLars(timm_params.values(), lr=1.0, trust_coeff=ETA, always_adapt=True, **hyper)

    run_lockstep(ours, ours_params, reference, timm_params, dtype)

    # The frozen tensor never moved and has no state; the others did move.
    assert torch.equal(ours_params["frozen"], make_params(dtype)["frozen"])
    assert ours_params["frozen"] not in ours.state
    assert not torch.equal(ours_params["conv"], make_params(dtype)["conv"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("nesterov", [False, True])
def test_mlperf_groups_match_timm(dtype, nesterov):
    """The MLPerf split: LARS + decay on ≥2-D tensors, plain SGD without decay on the rest
    (timm reproduces the latter with weight_decay=0 and always_adapt=False)."""
    ours_params, timm_params = make_params(dtype), make_params(dtype)

    def split(params):
        return (
            [p for p in params.values() if p.ndim > 1],
            [p for p in params.values() if p.ndim <= 1],
        )

    ours_adapted, ours_excluded = split(ours_params)
    timm_adapted, timm_excluded = split(timm_params)
    ours = LARS(
        [
            {"params": ours_adapted, "weight_decay": 5e-4, "lars": True},
            {"params": ours_excluded, "weight_decay": 0.0, "lars": False},
        ],
        lr=1.0,
        momentum=0.9,
        nesterov=nesterov,
    )
    reference = TimmLars(
        [
            {"params": timm_adapted, "weight_decay": 5e-4},
            {"params": timm_excluded, "weight_decay": 0.0},
        ],
        lr=1.0,
        momentum=0.9,
        nesterov=nesterov,
    )
    run_lockstep(ours, ours_params, reference, timm_params, dtype)


@pytest.mark.parametrize(
    "momentum, nesterov", [(0.0, False), (0.9, False), (0.9, True)], ids=["sgd", "heavyball", "nesterov"]
)
def test_plain_group_with_weight_decay_matches_torch_sgd(momentum, nesterov):
    """`lars=False` is exactly SGD, weight decay included (timm would adapt when λ ≠ 0)."""
    ours_params, sgd_params = make_params(torch.float32), make_params(torch.float32)
    hyper = dict(momentum=momentum, weight_decay=1e-2, nesterov=nesterov)
    ours = LARS(ours_params.values(), lr=1.0, lars=False, **hyper)
    reference = torch.optim.SGD(sgd_params.values(), lr=1.0, foreach=False, **hyper)
    run_lockstep(ours, ours_params, reference, sgd_params, torch.float32)


def test_trust_ratio_values():
    """τ = η‖w‖/(‖g‖ + λ‖w‖ + ε), and 1 where either norm is zero."""
    weight_norms = torch.tensor([0.0, 2.0, 0.0, 3.0])
    grad_norms = torch.tensor([1.0, 0.0, 0.0, 0.5])
    ratios = trust_ratio(weight_norms, grad_norms, eta=0.01, weight_decay=0.1, eps=0.0, lr=0.5, trust_clip=False)
    expected = torch.tensor([1.0, 1.0, 1.0, 0.01 * 3.0 / (0.5 + 0.1 * 3.0)])
    torch.testing.assert_close(ratios, expected, rtol=1e-6, atol=0)

    # LARC clipping: min(τ/lr, 1).
    clipped = trust_ratio(weight_norms, grad_norms, eta=0.01, weight_decay=0.1, eps=0.0, lr=0.5, trust_clip=True)
    torch.testing.assert_close(clipped, torch.tensor([1.0, 1.0, 1.0, 0.0375 / 0.5]), rtol=1e-6, atol=0)
    clipped_small_lr = trust_ratio(
        weight_norms, grad_norms, eta=0.01, weight_decay=0.1, eps=0.0, lr=0.01, trust_clip=True
    )
    torch.testing.assert_close(clipped_small_lr, torch.tensor([1.0, 1.0, 1.0, 1.0]), rtol=0, atol=0)


def test_zero_initialised_tensor_takes_a_plain_sgd_step():
    """‖w‖ = 0 ⇒ τ = 1, so the first step is w = −lr·g exactly (λw = 0)."""
    w = torch.nn.Parameter(torch.zeros(4, 3))
    w.grad = torch.arange(12.0).reshape(4, 3)
    LARS([w], lr=0.5, momentum=0.9, weight_decay=1e-4).step()
    torch.testing.assert_close(w.detach(), -0.5 * torch.arange(12.0).reshape(4, 3), rtol=0, atol=0)


def test_lars_step_size_is_eta_times_weight_norm():
    """Without momentum or decay, ‖Δw‖ = lr·τ‖g‖ = lr·η‖w‖ whatever the gradient's scale —
    the point of LARS (You et al. 2017, §3)."""
    w = torch.nn.Parameter(torch.full((10,), 2.0, dtype=torch.float64))  # ‖w‖ = 2·√10
    before = w.detach().clone()
    w.grad = torch.full((10,), 1e3, dtype=torch.float64)
    LARS([w], lr=0.1, momentum=0.0, eta=0.01, eps=0.0).step()
    step_norm = (w.detach() - before).norm().item()
    assert step_norm == pytest.approx(0.1 * 0.01 * 2.0 * math.sqrt(10), rel=1e-9)


def test_trust_weight_decay_replaces_lambda_in_the_trust_ratio_only():
    """Fujitsu's MLPerf v0.6 kernel: τ = η‖w‖ / (‖g‖ + λ'‖w‖ + ε) with its own unscheduled λ' = 6.5e-4,
    while the decay term stays τ·λ·w. With a vanishing gradient τ = η/λ', Fujitsu's ceiling 3.85."""
    w = torch.nn.Parameter(torch.full((10,), 2.0, dtype=torch.float64))
    w.grad = torch.full((10,), 1e-12, dtype=torch.float64)
    before = w.detach().clone()
    LARS([w], lr=1.0, momentum=0.0, weight_decay=5e-5, eta=0.0025, eps=0.0, trust_weight_decay=6.5e-4).step()
    tau = 0.0025 / 6.5e-4  # ‖g‖ ≈ 0
    expected = before - tau * (w.grad + 5e-5 * before)
    torch.testing.assert_close(w.detach(), expected, rtol=1e-9, atol=0)
    assert tau == pytest.approx(3.846, abs=1e-3)


def test_decayed_classifier_bias_gets_weight_decay_without_the_trust_ratio():
    """NVIDIA's MLPerf fit.py (set_wd_mult): weights and the fc bias are decayed, the bias without LARS."""
    model = torchvision.models.resnet18()
    groups = lars_param_groups(model, weight_decay=5e-5, decayed=[model.fc.bias])
    assert [(g["weight_decay"], g["lars"], len(g["params"])) for g in groups] == [
        (5e-5, True, 21), (0.0, False, 40), (5e-5, False, 1)]
    assert groups[2]["params"][0] is model.fc.bias


@pytest.mark.parametrize("arch, adapted, excluded", [("resnet18", 21, 41), ("resnet50", 54, 107)])
def test_param_groups_on_resnet(arch, adapted, excluded):
    """Conv and fc weights get LARS and decay; every BatchNorm γ/β and bias is excluded;
    each parameter appears exactly once."""
    model = getattr(torchvision.models, arch)()
    groups = lars_param_groups(model, weight_decay=5e-5)

    assert [(g["weight_decay"], g["lars"], len(g["params"])) for g in groups] == [
        (5e-5, True, adapted),
        (0.0, False, excluded),
    ]
    grouped_ids = [id(p) for g in groups for p in g["params"]]
    assert sorted(grouped_ids) == sorted(id(p) for p in model.parameters())
    assert len(set(grouped_ids)) == len(grouped_ids)

    excluded_ids = {id(p) for p in groups[1]["params"]}
    bn_and_bias = {
        id(p)
        for module in model.modules()
        for name, p in module.named_parameters(recurse=False)
        if isinstance(module, torch.nn.BatchNorm2d) or name == "bias"
    }
    assert excluded_ids == bn_and_bias
    assert id(model.fc.weight) not in excluded_ids and id(model.fc.bias) in excluded_ids

    (everything,) = lars_param_groups(model, weight_decay=5e-5, exclude_bn_and_bias=False)
    assert everything["lars"] is True and everything["weight_decay"] == 5e-5
    assert [id(p) for p in everything["params"]] == [id(p) for p in model.parameters()]


def test_resnet18_steps_match_timm():
    """A real network's parameter set with the MLPerf groups. Both optimisers get the
    gradients of `model`: feeding each its own network's gradients would let the
    ulp-level differences grow chaotically through batch-4 BatchNorm."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    twin = torchvision.models.resnet18(num_classes=10)
    twin.load_state_dict(model.state_dict())
    ours = LARS(lars_param_groups(model, 5e-5), lr=2.0, momentum=0.9)
    reference = TimmLars(
        [{k: v for k, v in g.items() if k != "lars"} for g in lars_param_groups(twin, 5e-5)],
        lr=2.0,
        momentum=0.9,
    )
    images = torch.randn(4, 3, 32, 32)
    labels = torch.tensor([0, 1, 2, 3])
    for _ in range(3):
        ours.zero_grad()
        torch.nn.functional.cross_entropy(model(images), labels).backward()
        for p, q in zip(model.parameters(), twin.parameters()):
            q.grad = p.grad.clone()
        ours.step()
        reference.step()
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        assert_close_to_scale(p, q, TOLERANCES[torch.float32], name)


@pytest.mark.parametrize("nesterov", [False, True])
def test_state_dict_resume_is_exact(nesterov):
    """Save at step 10, load into a fresh optimiser, continue: bit-identical to a run
    that never stopped."""
    params = make_params(torch.float32)
    opt = LARS(params.values(), lr=1.0, momentum=0.9, weight_decay=5e-4, nesterov=nesterov)
    checkpoint = None
    for step in range(20):
        if step == 10:
            buffer = io.BytesIO()
            torch.save({"params": {k: v.detach() for k, v in params.items()}, "opt": opt.state_dict()}, buffer)
            checkpoint = buffer.getvalue()
        set_grads(params, make_grads(params, step))
        opt.param_groups[0]["lr"] = lr_schedule(step)
        opt.step()

    saved = torch.load(io.BytesIO(checkpoint))
    resumed_params = {k: torch.nn.Parameter(v.clone()) for k, v in saved["params"].items()}
    resumed = LARS(resumed_params.values(), lr=123.0, momentum=0.0)  # hyperparameters come from the checkpoint
    resumed.load_state_dict(saved["opt"])
    assert resumed.param_groups[0]["momentum"] == 0.9
    for step in range(10, 20):
        set_grads(resumed_params, make_grads(resumed_params, step))
        resumed.param_groups[0]["lr"] = lr_schedule(step)
        resumed.step()

    for name in SHAPES:
        assert torch.equal(resumed_params[name], params[name]), name
        if name != "frozen":
            assert torch.equal(
                resumed.state[resumed_params[name]]["momentum_buffer"],
                opt.state[params[name]]["momentum_buffer"],
            ), name


@pytest.mark.parametrize("nesterov", [False, True])
def test_cpu_buckets_do_not_change_the_result(monkeypatch, nesterov):
    """One tensor per bucket and one bucket for all give bit-identical steps: τ is per
    tensor, bucketing only reorders the passes for the CPU cache."""
    runs = {}
    for bucket_bytes in (1, 1 << 30):
        monkeypatch.setattr(lars_module, "CPU_BUCKET_BYTES", bucket_bytes)
        params = make_params(torch.float32)
        opt = LARS(params.values(), lr=1.0, momentum=0.9, weight_decay=5e-4, nesterov=nesterov)
        for step in range(10):
            set_grads(params, make_grads(params, step))
            opt.param_groups[0]["lr"] = lr_schedule(step)
            opt.step()
        runs[bucket_bytes] = params
    for name in SHAPES:
        assert torch.equal(runs[1][name], runs[1 << 30][name]), name


def test_cpu_buckets_respect_the_size_limit(monkeypatch):
    """Consecutive tensors fill a bucket up to CPU_BUCKET_BYTES; a larger tensor gets its own."""
    monkeypatch.setattr(lars_module, "CPU_BUCKET_BYTES", 100 * 4)
    sizes = [30, 50, 20, 150, 10, 10]  # float32 elements
    params = [torch.zeros(n) for n in sizes]
    buckets = lars_module._cache_sized_buckets((params, params, []))
    assert [[p.numel() for p in bucket_params] for bucket_params, _, _ in buckets] == [[30, 50, 20], [150], [10, 10]]


def test_closure_is_evaluated_with_grad_and_its_loss_returned():
    w = torch.nn.Parameter(torch.tensor([3.0, 4.0]))
    opt = LARS([w], lr=0.1, momentum=0.0, eta=1.0, eps=0.0)

    def closure():
        opt.zero_grad()
        loss = (w**2).sum()
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert loss.item() == 25.0
    # g = 2w, τ = η‖w‖/‖g‖ = 1/2, Δw = −lr·τ·g = −0.1·w.
    torch.testing.assert_close(w.detach(), torch.tensor([2.7, 3.6]))


def test_invalid_hyperparameters_are_rejected():
    w = torch.nn.Parameter(torch.ones(2))
    with pytest.raises(ValueError, match="nesterov"):
        LARS([w], lr=0.1, momentum=0.0, nesterov=True)
    with pytest.raises(ValueError, match="lr"):
        LARS([w], lr=-0.1)
    with pytest.raises(ValueError, match="weight_decay"):
        LARS([{"params": [w], "weight_decay": -1.0}], lr=0.1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize(
    "momentum, nesterov, trust_clip", [(0.9, False, False), (0.9, True, True), (0.0, False, False)]
)
def test_cuda_step_never_synchronises(momentum, nesterov, trust_clip):
    """With sync debug mode "error", any host-device synchronisation inside step() raises."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18().cuda()
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt = LARS(lars_param_groups(model, 5e-5), lr=1.0, momentum=momentum, nesterov=nesterov, trust_clip=trust_clip)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):  # the first step also creates the momentum buffers
            opt.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    assert all(torch.isfinite(p).all() for p in model.parameters())


# --------------------------------------------------------------------------- the LR on the device


def _count_host_reads():
    """A dispatch mode counting host reads of tensor values (`aten._local_scalar_dense`: what
    `.item()`, `float(t)`, `bool(t)` and `if t:` run). On CUDA each is a device sync; counting
    them here needs no GPU."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class HostReads(TorchDispatchMode):
        count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten._local_scalar_dense.default:
                HostReads.count += 1
            return func(*args, **(kwargs or {}))

    return HostReads()


def test_scheduled_lr_lives_on_the_device_and_matches_a_host_lr():
    """With lr_schedule, the step reads its LR from the device (group["lr"] is a tensor the
    step updates in place), counts steps there, reads nothing back to the host, and takes the
    same steps as the host-number LR a scheduler would assign."""
    table = lars_module.lr_table(lr_schedule, 12)
    params = make_params(torch.float32)
    opt = LARS(params.values(), lr=0.0, momentum=0.9, weight_decay=5e-4, lr_schedule=table)
    twin_params = make_params(torch.float32)
    twin = LARS(twin_params.values(), lr=0.0, momentum=0.9, weight_decay=5e-4)
    lr_tensor = opt.param_groups[0]["lr"]
    for step in range(15):  # past the table's end: its last LR holds
        assert opt.param_groups[0]["lr"] is lr_tensor
        assert float(lr_tensor) == float(table[min(step, 11)])
        set_grads(params, make_grads(params, step))
        set_grads(twin_params, make_grads(twin_params, step))
        twin.param_groups[0]["lr"] = float(table[min(step, 11)])
        with _count_host_reads() as reads:
            opt.step()
        assert reads.count == 0, f"step {step} read {reads.count} values on the host"
        twin.step()
        for name in SHAPES:
            assert_close_to_scale(params[name], twin_params[name], 1e-6, f"{name} at step {step}")
    assert int(opt.param_groups[0]["schedule_step"]) == 15


def test_parameter_lists_are_gathered_once():
    """The (params, buffers) buckets are reused from step to step and gathered again only when
    another set of parameters has gradients."""
    params = make_params(torch.float32)
    opt = LARS(params.values(), lr=0.1, momentum=0.9)
    set_grads(params, make_grads(params, 0))
    opt.step()
    plan = opt._plans[0][1]
    opt.step()
    assert opt._plans[0][1] is plan
    params["frozen"].grad = torch.ones_like(params["frozen"])  # now it trains too
    opt.step()
    assert opt._plans[0][1] is not plan and "momentum_buffer" in opt.state[params["frozen"]]


# --------------------------------------------------------------------------- fp16: GradScaler's skip


def _scaled_step(model, opt, scaler, images, blow_up: bool) -> None:
    """One fp16 step as Lightning's MixedPrecision plugin takes it for an optimizer that
    handles unscaling itself: autocast forward, scaled backward, scaler.step, scaler.update."""
    opt.zero_grad()
    with torch.autocast("cpu", dtype=torch.float16):
        out = model(images)
    loss = out.float().square().mean() * (1e30 if blow_up else 1.0)  # 1e30 × scale overflows fp16
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()


def test_fp16_step_with_inf_gradient_is_skipped_on_the_device():
    """CPU fp16 autocast (torch 2.14 has it for linear layers): the scaler hands LARS its
    grad_scale and found_inf, LARS unscales and skips on the device, and nothing is read back
    to the host in scaler.step/update. A skipped step leaves weights, buffers, the LR and the
    schedule's position as they were; the next step is the one an unscaled run takes."""
    from lightning_fabric.plugins.precision.amp import _optimizer_handles_unscaling

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    twin = copy.deepcopy(model)
    table = lars_module.lr_table(lr_schedule, 10)
    opt = LARS(lars_param_groups(model, 5e-4), lr=0.0, momentum=0.9, lr_schedule=table)
    reference = LARS(lars_param_groups(twin, 5e-4), lr=0.0, momentum=0.9, lr_schedule=table)
    assert _optimizer_handles_unscaling(opt)  # so Lightning leaves unscale_ to LARS
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    images = torch.randn(5, 6)

    _scaled_step(model, opt, scaler, images, blow_up=False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    buffers = [opt.state[p]["momentum_buffer"].clone() for p in model.parameters()]
    lr_before = [float(g["lr"]) for g in opt.param_groups]
    with _count_host_reads() as reads:
        _scaled_step(model, opt, scaler, images, blow_up=True)
    assert reads.count == 0
    assert scaler.get_scale() == 2.0**11  # the scaler saw the inf and backed off
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name
    for p, buffer in zip(model.parameters(), buffers):
        assert torch.equal(opt.state[p]["momentum_buffer"], buffer)
    assert [float(g["lr"]) for g in opt.param_groups] == lr_before
    assert [int(g["schedule_step"]) for g in opt.param_groups] == [1, 1]

    _scaled_step(model, opt, scaler, images, blow_up=False)
    for _ in range(2):  # the reference never overflowed: two plain fp32-gradient steps
        reference.zero_grad()
        with torch.autocast("cpu", dtype=torch.float16):
            out = twin(images)
        out.float().square().mean().backward()
        reference.step()
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        assert_close_to_scale(p, q, 1e-3, name)  # fp16 rounding of the scaled gradients
    assert [int(g["schedule_step"]) for g in opt.param_groups] == [2, 2]


# --------------------------------------------------------------------------- the TF2 reference's momentum


def tf_reference_step(var, grad, mom, lr, *, skipped, momentum, weight_decay, eeta, epsilon, nesterov):
    """One step of the MLPerf TF2 reference's LARS, written out from its equations
    (mlcommons/training, image_classification/tensorflow2/lars_optimizer.py,
    LARSOptimizer.compute_lr and LARSOptimizer._resource_apply_dense), in float64:

        compute_lr (variables not in skip_list):
            trust_ratio = where(‖w‖ > 0, where(‖g‖ > 0, eeta‖w‖ / (‖g‖ + wd‖w‖ + ε), 1), 1)
            scaled_lr = lr · trust_ratio;   grad = grad + wd · var
        (skip_list variables, BN and biases: scaled_lr = lr, grad unchanged)
        _resource_apply_dense:
            mom_t = mom · momentum − grad · scaled_lr
            var_t = var + mom_t · momentum − grad · scaled_lr   if use_nesterov
            var_t = var + mom_t                                 otherwise
    """
    scaled_lr = lr
    if not skipped:
        w_norm, g_norm = var.norm(), grad.norm()
        trust = eeta * w_norm / (g_norm + weight_decay * w_norm + epsilon)
        trust = torch.where(w_norm > 0, torch.where(g_norm > 0, trust, 1.0), 1.0)
        scaled_lr = lr * trust
        grad = grad + weight_decay * var
    mom = mom * momentum - grad * scaled_lr
    var = var + mom * momentum - grad * scaled_lr if nesterov else var + mom
    return var, mom


@pytest.mark.parametrize("nesterov", [False, True])
def test_tf_reference_momentum_matches_the_tf2_reference(nesterov):
    """Eight steps through a warmup (the LR changes every step) on a weight (LARS, decay) and a
    bias (the reference's skip list: neither τ nor decay), ours with momentum_form="tf_reference"
    against `tf_reference_step`; the torch form, also run, differs from it while the LR changes."""
    momentum, weight_decay, eeta, epsilon = 0.9, 1e-4, 0.001, 1e-7
    lrs = [0.5 * (step + 1) for step in range(8)]  # a linear warmup
    torch.manual_seed(0)
    start = {"weight": torch.randn(6, 5, dtype=torch.float64), "bias": torch.randn(6, dtype=torch.float64)}
    grads = [{k: torch.randn_like(v) for k, v in start.items()} for _ in lrs]

    runs = {}
    for form in ("tf_reference", "torch"):
        weight, bias = (torch.nn.Parameter(start[k].clone()) for k in ("weight", "bias"))
        opt = LARS([{"params": [weight], "weight_decay": weight_decay, "lars": True},
                    {"params": [bias], "weight_decay": 0.0, "lars": False}],
                   lr=0.0, momentum=momentum, eta=eeta, eps=epsilon, nesterov=nesterov, momentum_form=form,
                   lr_schedule=torch.tensor(lrs, dtype=torch.float64))
        for step_grads in grads:
            weight.grad, bias.grad = step_grads["weight"].clone(), step_grads["bias"].clone()
            opt.step()
        runs[form] = {"weight": weight.detach(), "bias": bias.detach(),
                      "buffer": opt.state[weight]["momentum_buffer"]}

    expected = {k: v.clone() for k, v in start.items()}
    moms = {k: torch.zeros_like(v) for k, v in start.items()}
    for lr, step_grads in zip(lrs, grads):
        for name in expected:
            expected[name], moms[name] = tf_reference_step(
                expected[name], step_grads[name], moms[name], lr, skipped=name == "bias", momentum=momentum,
                weight_decay=weight_decay, eeta=eeta, epsilon=epsilon, nesterov=nesterov)
    for name in ("weight", "bias"):
        torch.testing.assert_close(runs["tf_reference"][name], expected[name], rtol=1e-12, atol=1e-12)
        assert not torch.allclose(runs["torch"][name], expected[name], rtol=1e-3, atol=0)
    torch.testing.assert_close(runs["tf_reference"]["buffer"], -moms["weight"], rtol=1e-12, atol=1e-12)


def test_momentum_forms_agree_while_the_lr_is_constant():
    """buf_tf = lr · buf_torch at a constant LR, so the weights are the same."""
    runs = {}
    for form in ("torch", "tf_reference"):
        params = make_params(torch.float64)
        opt = LARS(params.values(), lr=0.7, momentum=0.9, weight_decay=5e-4, momentum_form=form)
        for step in range(10):
            set_grads(params, make_grads(params, step))
            opt.step()
        runs[form] = params
    for name in SHAPES:
        torch.testing.assert_close(runs["torch"][name], runs["tf_reference"][name], rtol=1e-10, atol=1e-12)


def test_unknown_momentum_form_is_rejected():
    with pytest.raises(ValueError, match="momentum_form"):
        LARS([torch.nn.Parameter(torch.ones(2))], lr=0.1, momentum_form="keras")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_scaled_step_with_a_schedule_never_synchronises():
    """GradScaler's step and update around LARS with a device-side schedule, one of the steps
    with an inf gradient: no host-device synchronisation (sync debug mode "error" raises)."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18().cuda()
    opt = LARS(lars_param_groups(model, 5e-5), lr=0.0, momentum=0.9,
               lr_schedule=lars_module.lr_table(lr_schedule, 20).cuda())
    scaler = torch.amp.GradScaler("cuda", init_scale=2.0**10)
    grads = [torch.randn_like(p) for p in model.parameters()]
    scaler.scale(torch.ones((), device="cuda"))  # creates the scale tensor
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for step in range(4):
            for p, g in zip(model.parameters(), grads):
                p.grad = g * scaler._scale  # what a scaled backward leaves
            if step == 2:
                next(model.parameters()).grad[0] = float("inf")
            scaler.step(opt)
            scaler.update()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert [int(g["schedule_step"]) for g in opt.param_groups] == [3, 3]
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_resume_with_a_schedule_continues_at_the_saved_position():
    """The schedule's position (`schedule_step`) and LR travel in state_dict: a resumed optimiser
    built with the same table continues bit-identically, not from the warmup's first LR."""
    table = lars_module.lr_table(lr_schedule, 20)
    params = make_params(torch.float32)
    opt = LARS(params.values(), lr=0.0, momentum=0.9, weight_decay=5e-4, lr_schedule=table)
    checkpoint = None
    for step in range(14):
        if step == 7:
            buffer = io.BytesIO()
            torch.save({"params": {k: v.detach() for k, v in params.items()}, "opt": opt.state_dict()}, buffer)
            checkpoint = buffer.getvalue()
        set_grads(params, make_grads(params, step))
        opt.step()

    saved = torch.load(io.BytesIO(checkpoint), weights_only=True)
    resumed_params = {k: torch.nn.Parameter(v.clone()) for k, v in saved["params"].items()}
    resumed = LARS(resumed_params.values(), lr=0.0, momentum=0.9, weight_decay=5e-4, lr_schedule=table)
    resumed.load_state_dict(saved["opt"])
    assert int(resumed.param_groups[0]["schedule_step"]) == 7
    assert float(resumed.param_groups[0]["lr"]) == float(table[7])
    for step in range(7, 14):
        set_grads(resumed_params, make_grads(resumed_params, step))
        resumed.step()
    for name in SHAPES:
        assert torch.equal(resumed_params[name], params[name]), name
