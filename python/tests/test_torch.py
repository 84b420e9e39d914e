"""featcloud.torch against autograd, the SPEC written out in torch, and the peers' formulas.

Run by scripts/test.sh (README's test command) after `pip install ./python`.
"""

import math

import pytest
import torch

import featcloud
import featcloud.torch as ft

torch.set_num_threads(2)


# --------------------------------------------------------------------------- helpers


def problem(b=9, c=7, d=6, k=1, seed=0, dtype=torch.float64, opposite=True, ignored=True):
    """Random x, W, labels; row 0 opposite its class (theta ~ pi: theta + m2 > pi), row 1
    aligned with it (theta ~ 0), row b-1 ignored."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, d, generator=g, dtype=dtype)
    w = torch.randn(c * k, d, generator=g, dtype=dtype)
    y = torch.randint(0, c, (b,), generator=g)
    y[0], y[1] = 0, 1
    if opposite:
        # Opposite every sub-center of class 0 (their sum points away from x_0).
        x[0] = -w[0:k].sum(0) * 1.5 + 0.05 * torch.randn(d, generator=g, dtype=dtype)
        x[1] = w[k] * 0.7 + 0.05 * torch.randn(d, generator=g, dtype=dtype)
    if ignored:
        y[b - 1] = -1
    return x, w, y


def spec_loss(x, w, y, s, m1, m2, m3, fallback, ls=0.0, reduction="mean", k=1, alpha=None):
    """SPEC sections 3 and 5b written out in torch (exact gradient), f64."""
    s, m1, m2, m3, ls = f32(s), f32(m1), f32(m2), f32(m3), f32(ls)
    eps = 1e-12
    xh = x / x.norm(dim=1, keepdim=True).clamp_min(eps)
    wh = w / w.norm(dim=1, keepdim=True).clamp_min(eps)
    cos = (xh @ wh.t()).clamp(-1, 1)
    b, c = x.shape[0], w.shape[0] // k
    cos = cos.view(b, c, k).max(dim=2).values
    valid = y >= 0
    yv = y.clamp_min(0)
    cy = cos.gather(1, yv[:, None])[:, 0]
    cc = cy.clamp(-1 + 1e-7, 1 - 1e-7)
    theta = torch.acos(cc)
    delta = m2 + (alpha if alpha is not None else torch.zeros_like(cy))
    phi = m1 * theta + delta
    regular = torch.cos(phi) - m3
    if fallback == "none":
        t = regular
    elif fallback == "clamp":
        t = torch.cos(phi.clamp(0, math.pi)) - m3
    else:
        t = torch.where(phi > math.pi, cy - m3 - delta * torch.sin(delta), torch.where(phi < 0, 1 - m3 + 0 * cy, regular))
    onehot = torch.nn.functional.one_hot(yv, c).to(x.dtype)
    z = s * (cos * (1 - onehot) + t[:, None] * onehot)
    lse = torch.logsumexp(z, dim=1)
    loss = lse - (1 - ls) * (z * onehot).sum(1) - (ls / c) * z.sum(1)
    loss = torch.where(valid, loss, torch.zeros_like(loss))
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / valid.sum().clamp_min(1)


def f32(v):
    """v rounded to float32: the crate's HeadConfig holds s, m1, m2, m3 and ls as f32, so the
    formulas it is compared with get the same rounded values."""
    return torch.tensor(v, dtype=torch.float32).item()


def grads(fn, x, w):
    x = x.detach().clone().requires_grad_(True)
    w = w.detach().clone().requires_grad_(True)
    loss = fn(x, w)
    (loss.sum() if loss.dim() else loss).backward()
    return loss.detach(), x.grad, w.grad


def close(a, b, rtol, what):
    err = (a - b).abs().max().item()
    scale = b.abs().max().item()
    assert err <= rtol * max(scale, 1e-300), f"{what}: max err {err:.3e} vs max {scale:.3e}"


MARGINS = {"arcface": (1.0, 0.5, 0.0), "cosface": (1.0, 0.0, 0.35), "combined": (1.0, 0.3, 0.2), "sphere": (1.35, 0.1, 0.05)}


# --------------------------------------------------------------------------- the package


def test_version_and_info():
    assert featcloud.__version__ == "0.1.0"
    info = featcloud.info()
    assert set(info) == {"version", "kernels", "archs", "device"}
    assert info["version"] == featcloud.__version__
    assert isinstance(info["kernels"], bool)
    if info["kernels"]:
        assert "sm_90" in info["archs"]
    assert isinstance(info["device"], str) and info["device"]


# --------------------------------------------------------------------------- gradients


@pytest.mark.parametrize(
    "opts",
    [
        dict(m1=1.0, m2=0.5, m3=0.0),
        dict(m1=1.0, m2=0.0, m3=0.35, reduction="sum"),
        dict(m1=1.0, m2=0.3, m3=0.2, label_smoothing=0.1),
        dict(m1=1.0, m2=0.5, m3=0.0, fallback="none", reduction="none"),
        dict(m1=1.2, m2=0.2, m3=0.1, fallback="clamp"),
        dict(m1=1.0, m2=-0.3, m3=0.0, fallback="none"),
        dict(m1=1.0, m2=0.5, m3=0.0, cloud="symmetric"),
        dict(m1=1.0, m2=0.4, m3=0.1, cloud="one_sided", reduction="none", label_smoothing=0.2),
        dict(m1=1.0, m2=0.5, m3=0.0, subcenters=3),
        dict(m1=1.0, m2=0.5, m3=0.0, subcenters=2, fallback="none", reduction="sum"),
    ],
)
def test_gradcheck_float64(opts):
    k = opts.get("subcenters", 1)
    x, w, y = problem(k=k, seed=3)
    sigma = torch.linspace(0.05, 0.4, 7, dtype=torch.float32) if "cloud" in opts else None

    def f(a, b):
        return ft.margin_loss(a, b, y, s=8.0, sigma=sigma, seed=5, step=2, **opts)

    assert torch.autograd.gradcheck(f, (x.requires_grad_(), w.requires_grad_()), eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("name", list(MARGINS))
@pytest.mark.parametrize("fallback", ft.FALLBACKS)
@pytest.mark.parametrize("reduction", ft.REDUCTIONS)
@pytest.mark.parametrize("k", [1, 3])
def test_float64_equals_the_spec_in_torch(name, fallback, reduction, k):
    """The oracle (float64) against SPEC 3/5b written out in torch with autograd: loss and
    both gradients to 1e-10, in every region (row 0 past pi, ignored rows)."""
    m1, m2, m3 = MARGINS[name]
    x, w, y = problem(b=11, c=13, d=5, k=k, seed=11)
    opts = dict(s=30.0, m1=m1, m2=m2, m3=m3, fallback=fallback, reduction=reduction, label_smoothing=0.05, subcenters=k)
    got = grads(lambda a, b: ft.margin_loss(a, b, y, **opts), x, w)
    want = grads(
        lambda a, b: spec_loss(a, b, y, 30.0, m1, m2, m3, fallback, ls=0.05, reduction=reduction, k=k), x, w
    )
    for g, e, what in zip(got, want, ("loss", "dx", "dW")):
        close(g, e, 1e-10, f"{name} {fallback} {reduction} K={k} {what}")


@pytest.mark.parametrize("fallback", ft.FALLBACKS)
@pytest.mark.parametrize("k", [1, 2])
def test_float32_cpu_backend_within_spec_tolerances(fallback, k):
    """float32 (the CPU backend) against float64 (the oracle) on the same rounded inputs:
    SPEC 8's 1e-5 on the loss and 1e-4 of max |gradient| on each gradient."""
    x, w, y = problem(b=40, c=300, d=24, k=k, seed=4)
    x32, w32 = x.float(), w.float()
    sigma = torch.linspace(0.0, 0.3, 300)
    opts = dict(fallback=fallback, cloud="symmetric", sigma=sigma, seed=9, step=4, label_smoothing=0.1, subcenters=k)
    l32, dx32, dw32 = grads(lambda a, b: ft.margin_loss(a, b, y, **opts), x32, w32)
    l64, dx64, dw64 = grads(lambda a, b: ft.margin_loss(a, b, y, **opts), x32.double(), w32.double())
    assert abs(l32.item() - l64.item()) <= 1e-5 * abs(l64.item())
    close(dx32.double(), dx64, 1e-4, "dx")
    close(dw32.double(), dw64, 1e-4, "dW")


def test_upstream_scales_the_gradients_and_per_row_weights():
    x, w, y = problem(seed=7)
    _, gx1, gw1 = grads(lambda a, b: ft.margin_loss(a, b, y), x, w)
    _, gx3, gw3 = grads(lambda a, b: 3.0 * ft.margin_loss(a, b, y), x, w)
    close(gx3, 3 * gx1, 1e-12, "dx x3")
    close(gw3, 3 * gw1, 1e-12, "dW x3")
    # reduction none with per-row weights = the weighted sum of the rows' losses.
    g = torch.linspace(0.5, 2.0, x.shape[0], dtype=torch.float64)
    _, gxn, gwn = grads(lambda a, b: (g * ft.margin_loss(a, b, y, reduction="none")).sum(), x, w)
    _, gxs, gws = grads(lambda a, b: (g * spec_loss(a, b, y, 64.0, 1.0, 0.5, 0.0, "linear", reduction="none")).sum(), x, w)
    close(gxn, gxs, 1e-10, "dx none")
    close(gwn, gws, 1e-10, "dW none")


def test_rows_and_cloud_reproducibility():
    x, w, y = problem(b=30, c=7, d=8, seed=2, dtype=torch.float32)
    sigma = torch.full((7,), 0.2)
    run = lambda step: ft.margin_loss(x, w, y, cloud="symmetric", sigma=sigma, seed=1, step=step, return_rows=True)
    (l1, r1), (l2, r2), (l3, r3) = run(5), run(5), run(6)
    assert torch.equal(l1, l2) and all(torch.equal(a, b) for a, b in zip(r1, r2)), "same seed and step, same bits"
    assert not torch.equal(r1.alpha, r3.alpha), "another step draws another cloud"
    valid = y >= 0
    assert (r1.alpha[valid] != 0).all() and (r1.alpha[~valid] == 0).all()
    # The cloud off: alpha 0, and t follows the margin of c_iy.
    l0, r0 = ft.margin_loss(x, w, y, return_rows=True)
    assert (r0.alpha == 0).all()
    theta = torch.acos(r0.c_iy[1:-1].double().clamp(-1 + 1e-7, 1 - 1e-7))
    t = torch.where(theta + 0.5 <= math.pi, torch.cos(theta + 0.5), r0.c_iy[1:-1].double() - 0.5 * math.sin(0.5))
    close(r0.t[1:-1].double(), t, 1e-6, "t")


def test_bitwise_determinism_float32():
    x, w, y = problem(b=64, c=500, d=32, seed=8, dtype=torch.float32)
    a = grads(lambda p, q: ft.margin_loss(p, q, y), x, w)
    b = grads(lambda p, q: ft.margin_loss(p, q, y), x, w)
    assert all(torch.equal(u, v) for u, v in zip(a, b))


def test_non_contiguous_inputs_are_handled():
    x, w, y = problem(seed=5)
    xt = x.t().contiguous().t()  # same values, column-major
    assert not xt.is_contiguous()
    got = grads(lambda a, b: ft.margin_loss(a, b, y), xt, w)
    want = grads(lambda a, b: ft.margin_loss(a, b, y), x, w)
    for g, e in zip(got, want):
        assert torch.equal(g, e)


def test_no_grad_and_detached_inputs():
    x, w, y = problem(seed=6)
    with torch.no_grad():
        l1 = ft.margin_loss(x, w, y)
    l2 = ft.margin_loss(x, w, y)
    assert torch.equal(l1, l2) and not l2.requires_grad


# --------------------------------------------------------------------------- the module


def test_margin_head_module_trains_and_round_trips():
    torch.manual_seed(0)
    head = ft.MarginHead(20, 8, s=16.0, subcenters=2)
    assert head.weight.shape == (40, 8)
    net = torch.nn.Linear(4, 8)
    opt = torch.optim.SGD(list(net.parameters()) + list(head.parameters()), lr=0.5)
    data = torch.randn(200, 4)
    labels = torch.randint(0, 20, (200,))
    first = None
    for step in range(60):
        loss = head(net(data), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = first if first is not None else loss.item()
    assert loss.item() < 0.7 * first, f"loss {first} -> {loss.item()}"
    again = ft.MarginHead(20, 8, s=16.0, subcenters=2)
    again.load_state_dict(head.state_dict())
    assert torch.equal(again(net(data), labels), head(net(data), labels))
    assert "subcenters=2" in repr(head)


# --------------------------------------------------------------------------- the peers


def insightface_combined_margin(x, w, y, s, m1, m2, m3):
    """insightface arcface_torch: normalized linear, clamp, CombinedMarginLoss, CE (mean)."""
    logits = torch.nn.functional.linear(torch.nn.functional.normalize(x), torch.nn.functional.normalize(w))
    logits = logits.clamp(-1, 1)
    index = torch.where(y != -1)[0]
    target_logit = logits[index, y[index].view(-1)]
    if m1 == 1.0 and m3 == 0.0:
        with torch.no_grad():
            target_logit.arccos_()
            logits.arccos_()
            final_target_logit = target_logit + m2
            logits[index, y[index].view(-1)] = final_target_logit
            logits.cos_()
        logits = logits * s
    elif m3 > 0:
        final_target_logit = target_logit - m3
        logits[index, y[index].view(-1)] = final_target_logit
        logits = logits * s
    else:
        raise ValueError
    return torch.nn.functional.cross_entropy(logits, y, ignore_index=-1)


def insightface_legacy_arcface(x, w, y, s, m):
    """insightface's older ArcFace (easy_margin=False): linear fallback past pi - m."""
    cosine = torch.nn.functional.linear(torch.nn.functional.normalize(x), torch.nn.functional.normalize(w))
    sine = torch.sqrt((1.0 - cosine.pow(2)).clamp(0, 1))
    cos_m, sin_m = math.cos(m), math.sin(m)
    th, mm = math.cos(math.pi - m), math.sin(math.pi - m) * m
    phi = cosine * cos_m - sine * sin_m
    phi = torch.where(cosine > th, phi, cosine - mm)
    one_hot = torch.nn.functional.one_hot(y, w.shape[0]).to(x.dtype)
    logits = s * (one_hot * phi + (1.0 - one_hot) * cosine)
    return torch.nn.functional.cross_entropy(logits, y)


def pml_large_margin(x, W_dc, y, scale, kind, margin):
    """pytorch-metric-learning's ArcFaceLoss / CosFaceLoss (W stored [D, C], margin in
    degrees for ArcFace): cosine via normalized matmul, target modified, CE, mean."""
    cosine = torch.nn.functional.normalize(x) @ torch.nn.functional.normalize(W_dc, dim=0)
    mask = torch.nn.functional.one_hot(y, W_dc.shape[1]).to(x.dtype)
    cos_t = cosine[mask == 1]
    if kind == "arcface":
        angles = torch.acos(torch.clamp(cos_t, -1, 1))  # current releases (older: +-(1 - 1e-7))
        modified = torch.cos(angles + f32(math.radians(margin)))
    else:
        modified = cos_t - f32(margin)
    diff = (modified - cos_t).unsqueeze(1)
    logits = (cosine + mask * diff) * scale
    return torch.nn.functional.cross_entropy(logits, y)


def test_from_insightface_equals_combined_margin_loss():
    x, w, y = problem(b=12, c=9, d=6, seed=21, ignored=False)
    for m1, m2, m3 in [(1.0, 0.5, 0.0), (1.0, 0.0, 0.35), (1.0, 0.3, 0.4)]:
        head = ft.MarginHead.from_insightface(9, 6, s=64.0, m1=m1, m2=m2, m3=m3, dtype=torch.float64)
        got = grads(lambda a, b: ft.margin_loss(a, b, y, **head.options), x, w)
        want = grads(lambda a, b: insightface_combined_margin(a, b, y, 64.0, f32(m1), f32(m2), f32(m3)), x, w)
        for g, e, what in zip(got, want, ("loss", "dx", "dW")):
            close(g, e, 1e-9, f"insightface ({m1}, {m2}, {m3}) {what}")
    # Row 0 is past pi under ArcFace: the formula with no fallback is what matches.
    assert ft.margin_loss(x, w, y, m2=0.5, fallback="linear") != ft.margin_loss(x, w, y, m2=0.5, fallback="none")
    with pytest.raises(ValueError, match="supports"):
        ft.MarginHead.from_insightface(9, 6, m1=1.0, m2=0.3, m3=0.0 - 0.1)


def test_from_insightface_legacy_equals_old_arcface():
    x, w, y = problem(b=12, c=9, d=6, seed=22, ignored=False)
    head = ft.MarginHead.from_insightface(9, 6, s=64.0, m2=0.5, legacy=True, dtype=torch.float64)
    got = grads(lambda a, b: ft.margin_loss(a, b, y, **head.options), x, w)
    want = grads(lambda a, b: insightface_legacy_arcface(a, b, y, 64.0, f32(0.5)), x, w)
    for g, e, what in zip(got, want, ("loss", "dx", "dW")):
        close(g, e, 1e-9, f"insightface legacy {what}")


@pytest.mark.parametrize("kind,margin", [("arcface", 28.6), ("arcface", 40.0), ("cosface", 0.35)])
def test_from_pml_equals_pml_losses(kind, margin):
    x, w, y = problem(b=12, c=9, d=6, seed=23, ignored=False)
    W_dc = w.t().contiguous()
    head = ft.MarginHead.from_pml(9, 6, margin=margin, scale=64.0, loss=kind, weight=W_dc, dtype=torch.float64)
    assert torch.equal(head.weight.detach(), w)
    got = grads(lambda a, b: ft.margin_loss(a, b, y, **head.options), x, w)
    lp, gx, gW = grads(lambda a, b: pml_large_margin(a, b.t(), y, 64.0, kind, margin), x, w)
    for g, e, what in zip(got, (lp, gx, gW), ("loss", "dx", "dW")):
        close(g, e, 1e-9, f"pml {kind} {margin} {what}")


# --------------------------------------------------------------------------- bad input


def test_bad_inputs_raise_clear_errors():
    x, w, y = problem(dtype=torch.float32)
    cases = [
        (TypeError, "torch.Tensor", lambda: ft.margin_loss(x.tolist(), w, y)),
        (TypeError, "float32", lambda: ft.margin_loss(x.half(), w.half(), y)),
        (TypeError, "one dtype", lambda: ft.margin_loss(x, w.double(), y)),
        (TypeError, "integer", lambda: ft.margin_loss(x, w, y.float())),
        (ValueError, "labels must be", lambda: ft.margin_loss(x, w, y[:-1])),
        (ValueError, "weight has D", lambda: ft.margin_loss(x, w[:, :-1], y)),
        (ValueError, "out of range", lambda: ft.margin_loss(x, w, y.clone().fill_(7))),
        (ValueError, "multiple of subcenters", lambda: ft.margin_loss(x, w, y, subcenters=2)),
        (ValueError, "fallback", lambda: ft.margin_loss(x, w, y, fallback="linaer")),
        (ValueError, "head.s", lambda: ft.margin_loss(x, w, y, s=-1.0)),
        (ValueError, "head.label_smoothing", lambda: ft.margin_loss(x, w, y, label_smoothing=1.5)),
        (ValueError, "finite", lambda: ft.margin_loss(x, w, y, m2=float("nan"))),
        (ValueError, "needs sigma", lambda: ft.margin_loss(x, w, y, cloud="symmetric")),
        (ValueError, "sigma must be", lambda: ft.margin_loss(x, w, y, cloud="symmetric", sigma=torch.ones(3))),
        (ValueError, "sigma", lambda: ft.margin_loss(x, w, y, cloud="symmetric", sigma=-torch.ones(7))),
        (ValueError, "non-finite", lambda: ft.margin_loss(x.clone().fill_(float("nan")), w, y)),
        (ValueError, "empty", lambda: ft.margin_loss(x[:0], w, y[:0])),
        (ValueError, "seed", lambda: ft.margin_loss(x, w, y, seed=-1)),
        (ValueError, "one device", lambda: ft.margin_loss(x, w.to("meta"), y)),
        (NotImplementedError, "CPU tensors", lambda: ft.margin_loss(x.to("meta"), w.to("meta"), y.to("meta"))),
        (ValueError, "num_classes", lambda: ft.MarginHead(0, 4)),
        (ValueError, "reduction", lambda: ft.MarginHead(3, 4, reduction="avg")),
        (ValueError, "W is", lambda: ft.MarginHead.from_pml(3, 4, weight=torch.zeros(3, 4))),
    ]
    for exc, match, call in cases:
        with pytest.raises(exc, match=match):
            call()
    # The head still works afterwards (nothing was left half-done).
    assert torch.isfinite(ft.margin_loss(x, w, y))


# --------------------------------------------------------------------------- LeapHead


def long_tailed_batch(seed, b=96, c=6, d=5):
    """Class 0 and 1 frequent and spread, the rest rare and tight (as a tail class's few
    samples look); features near a per-class direction."""
    dirs = torch.randn(c, d, generator=torch.Generator().manual_seed(1234))
    g = torch.Generator().manual_seed(seed)
    probs = torch.tensor([0.45, 0.35] + [0.2 / (c - 2)] * (c - 2))
    y = torch.multinomial(probs, b, replacement=True, generator=g)
    spread = torch.where(y < 2, 0.5, 0.1)
    x = dirs[y] + spread[:, None] * torch.randn(b, d, generator=g)
    y[-1] = -1
    return x, y


def spec5_update(state, x, y, beta):
    """SPEC 5's EMA-center update written out in torch (f64), on dict state."""
    xh = x.double() / x.double().norm(dim=1, keepdim=True).clamp_min(1e-12)
    for k in sorted(set(y[y >= 0].tolist())):
        rows = xh[y == k]
        mbar = rows.mean(0)
        new = state["n"][k] == 0
        c = mbar if new else beta * state["centers"][k] + (1 - beta) * mbar
        c = c / c.norm().clamp_min(1e-12)
        state["centers"][k] = c
        a = torch.acos((rows @ c).clamp(-1, 1))
        if new:
            state["mu"][k], state["v"][k] = a.mean(), (a * a).mean()
        else:
            state["mu"][k] = beta * state["mu"][k] + (1 - beta) * a.mean()
            state["v"][k] = beta * state["v"][k] + (1 - beta) * (a * a).mean()
        state["n"][k] += rows.shape[0]


def test_leap_statistics_follow_spec5_and_set_the_cloud():
    c, d, beta, t = 6, 5, 0.8, 30
    head = ft.LeapHead(c, d, beta=beta, threshold=t, warmup_steps=2, s=16.0)
    want = {"centers": torch.zeros(c, d, dtype=torch.float64), "mu": torch.zeros(c, dtype=torch.float64),
            "v": torch.zeros(c, dtype=torch.float64), "n": [0] * c}
    for step in range(4):
        x, y = long_tailed_batch(step)
        sigma = head.cloud_sigma()
        if step < 2:
            assert (sigma == 0).all(), "no cloud during the warm-up"
        # The loss uses sigma from the statistics before this batch, at this step's draws.
        expect = ft.margin_loss(x, head.weight, y, s=16.0, cloud="symmetric", sigma=sigma, seed=0, step=step)
        assert torch.equal(head(x, y), expect)
        spec5_update(want, x, y, beta)
    assert int(head.step) == 4 and int(head.stats_updates) == 4
    assert head.stats_n.tolist() == want["n"]
    close(head.stats_centers, want["centers"], 1e-6, "centers")
    close(head.stats_mu, want["mu"], 1e-6, "mu")
    close(head.stats_v, want["v"], 1e-6, "v")
    # Threshold split: head = classes with n >= T, var_h their mean variance.
    var = (head.stats_v - head.stats_mu**2).clamp_min(0)
    is_head = head.stats_n >= t
    assert is_head.any() and (~is_head).any()
    var_h = var[is_head].mean()
    sigma = torch.where(is_head, torch.zeros_like(var), (var_h - var).clamp_min(0).sqrt())
    close(head.cloud_sigma().double(), sigma, 1e-6, "sigma")
    assert (head.cloud_sigma()[~is_head] > 0).any()


def test_leap_class_weight_centers_use_the_target_angle():
    head = ft.LeapHead(6, 5, center="class_weight", warmup_steps=0, threshold=30, s=16.0)
    assert head.stats_centers.numel() == 0
    x, y = long_tailed_batch(1)
    sigma = head.cloud_sigma()
    _, rows = ft.margin_loss(x, head.weight, y, s=16.0, cloud="symmetric", sigma=sigma, return_rows=True)
    head(x, y)
    theta = torch.acos(rows.c_iy.double().clamp(-1 + 1e-7, 1 - 1e-7))
    for k in range(6):
        sel = y == k
        if sel.any():
            assert abs(head.stats_mu[k].item() - theta[sel].mean().item()) < 1e-6


def test_leap_state_dict_round_trips_and_eval_is_plain():
    torch.manual_seed(3)
    a = ft.LeapHead(6, 5, warmup_steps=1, threshold=30, s=16.0, subcenters=2, seed=11)
    for step in range(3):
        a(*long_tailed_batch(step))
    b = ft.LeapHead(6, 5, warmup_steps=1, threshold=30, s=16.0, subcenters=2, seed=11)
    b.load_state_dict(a.state_dict())
    x, y = long_tailed_batch(9)
    assert torch.equal(a(x, y), b(x, y)), "the same state continues identically"
    for (name, u), (_, v) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(u, v), name
    # eval: no cloud, no update.
    before = {k: v.clone() for k, v in a.state_dict().items()}
    a.eval()
    plain = ft.margin_loss(x, a.weight, y, **a.options)
    assert torch.equal(a(x, y), plain)
    assert all(torch.equal(before[k], v) for k, v in a.state_dict().items())


def test_leap_rejects_a_corrupted_state():
    head = ft.LeapHead(6, 5, warmup_steps=0)
    head(*long_tailed_batch(0))
    for name, bad in (("stats_n", -1), ("stats_mu", float("nan"))):
        h = ft.LeapHead(6, 5, warmup_steps=0)
        state = head.state_dict()
        state[name] = state[name].clone()
        state[name][0] = bad
        h.load_state_dict(state)
        with pytest.raises(ValueError):
            h(*long_tailed_batch(1))
    with pytest.raises(ValueError, match="cloud"):
        ft.LeapHead(6, 5, cloud="off")
    with pytest.raises(ValueError, match="beta"):
        ft.LeapHead(6, 5, beta=1.5)


def test_review_findings_are_errors_not_crashes():
    """A LeapHead cast to another dtype keeps float64 statistics; buffers swapped for other
    dtypes or shapes, x of another width, double backward and in-place changes of the
    outputs are clear errors (each was a crash or a silent wrong result once)."""
    x, y = long_tailed_batch(0)
    for cast in (lambda h: h.float(), lambda h: h.half().float(), lambda h: h.to(torch.bfloat16).float()):
        h = cast(ft.LeapHead(6, 5, warmup_steps=0, threshold=30, s=16.0))
        assert h.stats_mu.dtype == torch.float64 and h.stats_centers.dtype == torch.float64
        for _ in range(3):
            h(x, y).backward()
        assert torch.isfinite(h.stats_mu).all() and int(h.stats_n.sum()) == 3 * int((y >= 0).sum())
    h = ft.LeapHead(6, 5, warmup_steps=0)
    state = {k: (v.float() if k == "stats_mu" else v.int() if k == "stats_n" else v) for k, v in h.state_dict().items()}
    for name in ("stats_mu", "stats_n"):
        g = ft.LeapHead(6, 5, warmup_steps=0)
        g.load_state_dict({**h.state_dict(), name: state[name]}, assign=True)
        with pytest.raises(TypeError, match=name):
            g(x, y)
    with pytest.raises(ValueError, match=r"x must be \[B, 5\]"):
        h(torch.randn(4, 3), y[:4])
    h.weight.data = torch.randn(6, 3)
    with pytest.raises(ValueError, match="weight is"):
        h(torch.randn(4, 5), y[:4])
    with pytest.raises(ValueError, match="whole numbers"):
        ft.LeapHead(6, 5, class_counts=[1.5] * 6)
    # Double backward is refused (the gradients are not differentiable), not silently zero.
    xx, w, yy = problem(seed=1)
    xx.requires_grad_(True)
    loss = ft.margin_loss(xx, w, yy, s=4.0)
    (gx,) = torch.autograd.grad(loss, xx, create_graph=True)
    with pytest.raises(RuntimeError):
        (gx**2).sum().backward()
    # The outputs are not views of one another: in-place changes are allowed and local.
    per_row, rows = ft.margin_loss(xx, w, yy, reduction="none", return_rows=True)
    rows.c_iy.mul_(0)
    per_row = per_row * 1.0
    per_row.sum().backward()


def test_one_sided_cloud_only_pushes_targets_away():
    x, w, y = problem(b=40, seed=12, dtype=torch.float32)
    sigma = torch.full((7,), 0.3)
    _, sym = ft.margin_loss(x, w, y, cloud="symmetric", sigma=sigma, seed=3, return_rows=True)
    _, one = ft.margin_loss(x, w, y, cloud="one_sided", sigma=sigma, seed=3, return_rows=True)
    valid = y >= 0
    assert (sym.alpha[valid] < 0).any() and (sym.alpha[valid] > 0).any()
    assert torch.equal(one.alpha, sym.alpha.abs()), "one-sided is |alpha| of the same draws"


def test_adaptive_split_follows_spec5():
    """Adaptive: var_h = sum_k N_k var_k / sum_k N_k over seen classes, sigma_k =
    sqrt(max(var_h - var_k, 0)) for every class (the given class_counts as N_k)."""
    counts = [500, 300, 40, 10, 5, 2]
    h = ft.LeapHead(6, 5, split="adaptive", warmup_steps=0, class_counts=counts, s=16.0)
    for step in range(3):
        h(*long_tailed_batch(step))
    var = (h.stats_v - h.stats_mu**2).clamp_min(0)
    n = torch.tensor(counts, dtype=torch.float64)
    seen = h.stats_n > 0
    var_h = (n[seen] * var[seen]).sum() / n[seen].sum()
    close(h.cloud_sigma().double(), (var_h - var).clamp_min(0).sqrt(), 1e-6, "adaptive sigma")
