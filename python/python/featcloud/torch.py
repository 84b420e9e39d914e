"""featcloud's margin head as a PyTorch module and function.

The head is SPEC sections 3 and 4 of featcloud (``docs/SPEC.md``): normalized (cosine)
logits ``c_ij = x_i . w_j / (|x_i| |w_j|)``, the margin on the target,
``t_i = cos(m1 * theta_i + m2 + alpha_i) - m3``, logits ``s * c`` (``s * t`` on the target)
and softmax cross-entropy; the B x C logits are never returned to Python.

- :class:`MarginHead`: an ``nn.Module`` owning the class weights W (``[C * K, D]``, a
  ``Parameter``); ``forward(x, labels)`` returns the loss, and autograd takes it back to x
  and W.
- :class:`LeapHead`: the same plus LEAP's class statistics (buffers, updated in the
  training forward) and the feature cloud they set.
- :func:`margin_loss`: the same as a function of (x, W, labels), with the feature cloud
  (``cloud``, ``sigma``, ``seed``, ``step``) for callers that keep their own statistics.

Devices and dtypes in this build: CPU tensors. ``float32`` runs featcloud's CPU backend
(threaded, f64 accumulation where the SPEC asks for it); ``float64`` runs its oracle (f64
throughout, for ``torch.autograd.gradcheck`` and for checking). CUDA tensors raise
``NotImplementedError`` for now (the CUDA kernels exist in the crate; running them on torch's
tensors and stream is not wired yet).

Conventions (exactly what each option computes is in SPEC section 3):

- ``fallback``: what happens when ``m1 * theta + m2 + alpha`` leaves ``[0, pi]``:
  ``"linear"`` (classic ArcFace: ``c - m3 - m2 sin m2`` past pi, gradient 1), ``"clamp"``
  (the angle clamped, zero gradient outside) or ``"none"`` (``cos(phi) - m3`` everywhere, as
  current insightface and pytorch-metric-learning compute it).
- ``margin_grad``: ``"exact"`` (the derivative of t) or ``"straight_through"`` (gradient as
  if ``t = c``; current insightface).
- ``reduction``: ``"mean"`` over the rows with a label >= 0, ``"sum"``, or ``"none"`` (a
  ``[B]`` tensor). A negative label marks an ignored row (no loss, no gradient).
- ``subcenters`` K (Sub-center ArcFace): W has ``C * K`` rows, class j's sub-center k in row
  ``j * K + k``; a class's cosine is its closest sub-center's.

Peers: :meth:`MarginHead.from_insightface` and :meth:`MarginHead.from_pml` set these options
so that the loss and gradients equal those libraries' formulas (see their docstrings for the
exact correspondence and its limits). s, m1, m2, m3 and label_smoothing are held as float32
(the crate's configuration), so against a peer computing with the float64 values the losses
agree to the rounding of those numbers (a few 1e-9 relative).

Calls hold the GIL: the head reads the tensors in place, so no other Python thread may free
or resize them meanwhile. A module is not meant to be called from two threads at once.
"""

from __future__ import annotations

import json
import math
from typing import NamedTuple, Optional

import torch

from . import _native

FALLBACKS = ("linear", "clamp", "none")
MARGIN_GRADS = ("exact", "straight_through")
REDUCTIONS = ("mean", "sum", "none")
CLOUDS = ("off", "symmetric", "one_sided")

# The CPU implementations by dtype (see the module doc).
_CPU_DTYPES = {torch.float32: "float32", torch.float64: "float64"}


class HeadRows(NamedTuple):
    """Per-row outputs of the head, each ``[B]`` (0 for ignored rows).

    ``lse`` (log-sum-exp of the row's logits), ``c_iy`` (target cosine), ``t`` (target after
    the margin), ``alpha`` (the cloud's angle actually applied), ``k_iy`` (the target's
    closest sub-center, int64).
    """

    lse: torch.Tensor
    c_iy: torch.Tensor
    t: torch.Tensor
    alpha: torch.Tensor
    k_iy: torch.Tensor


def _choice(name: str, value: str, allowed: tuple) -> str:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}, got {value!r}")
    return value


def _config_json(
    s, m1, m2, m3, fallback, margin_grad, label_smoothing, reduction, subcenters, cloud
) -> str:
    """The crate's ``HeadConfig`` as JSON (the crate validates the numbers again)."""
    for name, v in (("s", s), ("m1", m1), ("m2", m2), ("m3", m3), ("label_smoothing", label_smoothing)):
        if not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ValueError(f"{name} must be a finite number, got {v!r}")
    if not isinstance(subcenters, int) or isinstance(subcenters, bool) or subcenters < 1:
        raise ValueError(f"subcenters must be an integer >= 1, got {subcenters!r}")
    return json.dumps(
        {
            "s": float(s),
            "m1": float(m1),
            "m2": float(m2),
            "m3": float(m3),
            "cloud": _choice("cloud", cloud, CLOUDS),
            "reduction": _choice("reduction", reduction, REDUCTIONS),
            "label_smoothing": float(label_smoothing),
            "margin_grad": _choice("margin_grad", margin_grad, MARGIN_GRADS),
            "fallback": _choice("fallback", fallback, FALLBACKS),
            "subcenters": subcenters,
        }
    )


def _labels_i32(labels: torch.Tensor) -> torch.Tensor:
    """Labels as the crate takes them: contiguous int32, every negative label -1 ("ignored",
    also below int32's range). Labels >= C are refused before this (`_check_inputs`)."""
    return labels.to(torch.int64).clamp(min=-1).to(torch.int32).contiguous()


def _check_inputs(x, weight, labels, sigma, subcenters):
    """Checks the tensors; returns (x, W, labels as int32, sigma or None), contiguous."""
    for name, t in (("x", x), ("weight", weight), ("labels", labels)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if x.dim() != 2 or weight.dim() != 2:
        raise ValueError(f"x must be [B, D] and weight [C*K, D], got {tuple(x.shape)} and {tuple(weight.shape)}")
    b, d = x.shape
    if weight.shape[1] != d:
        raise ValueError(f"x is [B, D] = {tuple(x.shape)} but weight has D = {weight.shape[1]}")
    if b == 0 or d == 0 or weight.shape[0] == 0:
        raise ValueError(f"empty input: x {tuple(x.shape)}, weight {tuple(weight.shape)}")
    if weight.shape[0] % subcenters != 0:
        raise ValueError(f"weight has {weight.shape[0]} rows, not a multiple of subcenters = {subcenters}")
    c = weight.shape[0] // subcenters
    if labels.dim() != 1 or labels.shape[0] != b:
        raise ValueError(f"labels must be [B] = [{b}], got {tuple(labels.shape)}")
    if labels.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
        raise TypeError(f"labels must be an integer tensor, got {labels.dtype}")
    devices = {x.device, weight.device, labels.device} | ({sigma.device} if sigma is not None else set())
    if len(devices) != 1:
        raise ValueError(f"x, weight, labels (and sigma) must be on one device, got {sorted(map(str, devices))}")
    if x.device.type != "cpu":
        raise NotImplementedError(
            f"featcloud.torch runs CPU tensors in this build; got {x.device} "
            "(the crate's CUDA kernels are not wired to torch tensors yet)"
        )
    if x.dtype != weight.dtype:
        raise TypeError(f"x and weight must have one dtype, got {x.dtype} and {weight.dtype}")
    if x.dtype not in _CPU_DTYPES:
        raise TypeError(
            f"on the CPU, x and weight must be float32 (the CPU backend) or float64 (the oracle), got {x.dtype}"
        )
    if labels.numel() and int(labels.max()) >= c:
        raise ValueError(f"label {int(labels.max())} out of range: there are {c} classes (negative = ignored row)")
    labels = _labels_i32(labels)
    if sigma is not None:
        if not isinstance(sigma, torch.Tensor) or sigma.shape != (c,):
            raise ValueError(f"sigma must be a [C] = [{c}] tensor, got {getattr(sigma, 'shape', sigma)}")
        sigma = sigma.detach().to(torch.float32).contiguous()
    return x.contiguous(), weight.contiguous(), labels, sigma


def _run(cfg_json, x, w, labels, sigma, seed, step, rows, upstream=1.0, upstream_rows=None, dx=None, dw=None):
    """One call of the native head on checked, contiguous CPU tensors (see `_native`)."""
    b, d = x.shape
    c_times_k = w.shape[0]
    k = json.loads(cfg_json)["subcenters"]
    assert rows.shape == (6, b) and rows.dtype == torch.float64 and rows.is_contiguous()
    for t in (dx, dw, upstream_rows):
        assert t is None or (t.dtype == x.dtype and t.is_contiguous())
    return _native.head_cpu(
        cfg_json,
        _CPU_DTYPES[x.dtype],
        b,
        c_times_k // k,
        d,
        x.data_ptr(),
        w.data_ptr(),
        labels.data_ptr(),
        0 if sigma is None else sigma.data_ptr(),
        0 if sigma is None else sigma.numel(),
        int(seed),
        int(step),
        float(upstream),
        0 if upstream_rows is None else upstream_rows.data_ptr(),
        rows.data_ptr(),
        0 if dx is None else dx.data_ptr(),
        0 if dw is None else dw.data_ptr(),
    )


class _HeadFunction(torch.autograd.Function):
    """Autograd of the head. With reduction mean or sum the gradients for a unit upstream are
    computed in the forward (one pass over the classes does both) and scaled in the backward;
    with reduction none the backward runs the head again with the per-row upstream. The
    gradients are not themselves differentiable (`once_differentiable`: a double backward is
    an error, not a silent zero)."""

    @staticmethod
    def forward(ctx, x, w, labels, sigma, cfg_json, reduction, seed, step, need_grad):
        b = x.shape[0]
        rows = torch.empty(6, b, dtype=torch.float64)
        ctx.reduction = reduction
        if need_grad and reduction != "none":
            dx, dw = torch.empty_like(x), torch.empty_like(w)
            loss = _run(cfg_json, x, w, labels, sigma, seed, step, rows, dx=dx, dw=dw)
            ctx.save_for_backward(dx, dw)
        else:
            loss = _run(cfg_json, x, w, labels, sigma, seed, step, rows)
            ctx.save_for_backward(x, w, labels, sigma if sigma is not None else torch.empty(0))
            ctx.call = (cfg_json, sigma is not None, seed, step)
        out = rows[0].to(x.dtype, copy=True) if reduction == "none" else torch.tensor(loss, dtype=x.dtype)
        ctx.mark_non_differentiable(rows)
        return out, rows

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g, _g_rows):
        if ctx.reduction != "none":
            dx, dw = ctx.saved_tensors
            if g is None:
                return (None,) * 9
            gx = g.to(dx.dtype)
            return dx * gx, dw * gx, None, None, None, None, None, None, None
        x, w, labels, sigma = ctx.saved_tensors
        cfg_json, has_sigma, seed, step = ctx.call
        up = g.to(x.dtype).contiguous()
        if not torch.isfinite(up).all():
            raise ValueError("the upstream gradient of the per-row losses is not finite")
        dx, dw = torch.empty_like(x), torch.empty_like(w)
        rows = torch.empty(6, x.shape[0], dtype=torch.float64)
        _run(
            cfg_json, x, w, labels, sigma if has_sigma else None, seed, step, rows, upstream_rows=up, dx=dx, dw=dw
        )
        return dx, dw, None, None, None, None, None, None, None


def margin_loss(
    x: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    s: float = 64.0,
    m1: float = 1.0,
    m2: float = 0.5,
    m3: float = 0.0,
    fallback: str = "linear",
    margin_grad: str = "exact",
    label_smoothing: float = 0.0,
    reduction: str = "mean",
    subcenters: int = 1,
    cloud: str = "off",
    sigma: Optional[torch.Tensor] = None,
    seed: int = 0,
    step: int = 0,
    return_rows: bool = False,
):
    """The margin head's loss for features ``x`` ``[B, D]``, class weights ``weight``
    ``[C * K, D]`` and ``labels`` ``[B]`` (negative: ignored row).

    Differentiable in ``x`` and ``weight``. ``cloud`` (``"off"``, ``"symmetric"``,
    ``"one_sided"``) adds LEAP's feature cloud: the target angle moves by
    ``alpha_i = sigma[y_i] * eps_i`` (``|eps_i|`` one-sided), ``eps_i`` a standard normal drawn
    from (``seed``, ``step``, row) by featcloud's counter-based generator, so the same call
    gives the same result; ``sigma`` is ``[C]``, in radians, no gradient. With
    ``return_rows``, returns ``(loss, HeadRows)``.
    """
    if cloud != "off" and sigma is None:
        raise ValueError(f"cloud {cloud!r} needs sigma, the per-class cloud width [C]")
    cfg_json = _config_json(s, m1, m2, m3, fallback, margin_grad, label_smoothing, reduction, subcenters, cloud)
    if not (isinstance(seed, int) and 0 <= seed < 2**64 and isinstance(step, int) and 0 <= step < 2**64):
        raise ValueError(f"seed and step must be integers in [0, 2^64), got {seed!r} and {step!r}")
    xc, wc, lab, sig = _check_inputs(x, weight, labels, sigma if cloud != "off" else None, subcenters)
    need_grad = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
    # The contiguous copies (if any) stay in the graph, so gradients reach the caller's tensors.
    loss, rows = _HeadFunction.apply(xc, wc, lab, sig, cfg_json, reduction, seed, step, need_grad)
    if not return_rows:
        return loss
    dt = x.dtype
    # Copies: in-place changes to them must not reach the autograd output they came from.
    return loss, HeadRows(*(rows[i].to(dt, copy=True) for i in range(1, 5)), rows[5].to(torch.int64, copy=True))


def insightface_options(m1: float, m2: float, m3: float, legacy: bool = False) -> dict:
    """The margin options (m1, m2, m3, fallback, margin_grad) that reproduce insightface's
    ``CombinedMarginLoss(s, m1, m2, m3)`` (or, with ``legacy``, its older ``ArcFace``); see
    :meth:`MarginHead.from_insightface`."""
    if legacy:
        if m1 != 1.0 or m3 != 0.0:
            raise ValueError("insightface's legacy ArcFace has only m2 (m1 = 1, m3 = 0)")
        return dict(m1=1.0, m2=m2, m3=0.0, fallback="linear", margin_grad="exact")
    if m1 == 1.0 and m3 == 0.0:
        return dict(m1=1.0, m2=m2, m3=0.0, fallback="none", margin_grad="straight_through")
    if m3 > 0:
        return dict(m1=1.0, m2=0.0, m3=m3, fallback="none", margin_grad="exact")
    raise ValueError(f"insightface's CombinedMarginLoss supports (m1 = 1, m3 = 0) or m3 > 0, got ({m1}, {m2}, {m3})")


class MarginHead(torch.nn.Module):
    """A margin head (ArcFace / CosFace / combined) owning the class weights.

    ``weight`` is a ``[num_classes * subcenters, embedding_size]`` ``Parameter`` (class j's
    sub-center k in row ``j * subcenters + k``), initialized N(0, 0.01^2) as insightface does
    (any scale works: rows are normalized). ``forward(x, labels)`` returns the loss (see
    :func:`margin_loss` for the options; the module doc for the conventions).
    """

    def __init__(
        self,
        num_classes: int,
        embedding_size: int,
        s: float = 64.0,
        m1: float = 1.0,
        m2: float = 0.5,
        m3: float = 0.0,
        fallback: str = "linear",
        margin_grad: str = "exact",
        label_smoothing: float = 0.0,
        reduction: str = "mean",
        subcenters: int = 1,
        dtype: Optional[torch.dtype] = None,
        device=None,
    ):
        super().__init__()
        if not (isinstance(num_classes, int) and num_classes >= 1):
            raise ValueError(f"num_classes must be an integer >= 1, got {num_classes!r}")
        if not (isinstance(embedding_size, int) and embedding_size >= 1):
            raise ValueError(f"embedding_size must be an integer >= 1, got {embedding_size!r}")
        # Checked here so that a bad option fails at construction, not at the first step.
        _config_json(s, m1, m2, m3, fallback, margin_grad, label_smoothing, reduction, subcenters, "off")
        self.num_classes, self.embedding_size = num_classes, embedding_size
        self.options = dict(
            s=s,
            m1=m1,
            m2=m2,
            m3=m3,
            fallback=fallback,
            margin_grad=margin_grad,
            label_smoothing=label_smoothing,
            reduction=reduction,
            subcenters=subcenters,
        )
        self.weight = torch.nn.Parameter(
            torch.empty(num_classes * subcenters, embedding_size, dtype=dtype or torch.float32, device=device)
        )
        torch.nn.init.normal_(self.weight, std=0.01)

    def forward(self, x: torch.Tensor, labels: torch.Tensor, return_rows: bool = False):
        """The loss of features ``x`` ``[B, D]`` with ``labels`` ``[B]``."""
        return margin_loss(x, self.weight, labels, return_rows=return_rows, **self.options)

    def extra_repr(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options.items())
        return f"num_classes={self.num_classes}, embedding_size={self.embedding_size}, {opts}"

    @classmethod
    def from_insightface(
        cls,
        num_classes: int,
        embedding_size: int,
        s: float = 64.0,
        m1: float = 1.0,
        m2: float = 0.5,
        m3: float = 0.0,
        legacy: bool = False,
        **kwargs,
    ) -> "MarginHead":
        """The head that insightface's ``CombinedMarginLoss(s, m1, m2, m3)`` followed by
        cross-entropy computes (arcface_torch), or with ``legacy=True`` its older ``ArcFace``
        module (``easy_margin=False``).

        Current insightface (``legacy=False``) supports two cases and so does this:
        ``m1 == 1, m3 == 0`` (ArcFace): ``cos(theta + m2)`` with no fallback, computed under
        ``torch.no_grad`` so the gradient is straight-through (``fallback="none"``,
        ``margin_grad="straight_through"``); ``m3 > 0`` (CosFace): ``c - m3`` only, m1 and m2
        ignored as insightface ignores them. Legacy ArcFace: ``cos(theta + m2)`` with the
        linear fallback ``c - m2 sin(m2)`` once ``theta + m2 > pi`` and the exact gradient.
        Where they differ from these formulas: insightface takes ``acos`` of ``c`` clamped to
        ``[-1, 1]``, featcloud of ``c`` clamped to ``[-1 + 1e-7, 1 - 1e-7]`` (a difference only
        within 1e-7 of +-1). The weight is ``[C, D]`` in both (``num_classes`` rows).
        """
        return cls(num_classes, embedding_size, s=s, **insightface_options(m1, m2, m3, legacy), **kwargs)

    @classmethod
    def from_pml(
        cls,
        num_classes: int,
        embedding_size: int,
        margin: Optional[float] = None,
        scale: float = 64.0,
        loss: str = "arcface",
        weight: Optional[torch.Tensor] = None,
        **kwargs,
    ) -> "MarginHead":
        """The head of pytorch-metric-learning's ``ArcFaceLoss`` (``margin`` in degrees,
        default 28.6: ``cos(theta + radians(margin))``, no fallback, exact gradient) or
        ``CosFaceLoss`` (``loss="cosface"``, default margin 0.35: ``c - margin``), both with
        their ``scale`` and mean cross-entropy.

        pytorch-metric-learning stores W as ``[D, C]`` (``loss_fn.W``); pass it as ``weight``
        and it is copied transposed into this head's ``[C, D]`` weight. (Current releases clamp
        the cosine to ``[-1, 1]`` before ``acos``, older ones to ``[-1 + 1e-7, 1 - 1e-7]`` as
        featcloud does; the results differ only for cosines within 1e-7 of +-1.)
        """
        loss = _choice("loss", loss, ("arcface", "cosface"))
        if loss == "arcface":
            opts = dict(m1=1.0, m2=math.radians(28.6 if margin is None else margin), m3=0.0)
        else:
            opts = dict(m1=1.0, m2=0.0, m3=0.35 if margin is None else margin)
        head = cls(num_classes, embedding_size, s=scale, fallback="none", margin_grad="exact", **opts, **kwargs)
        if weight is not None:
            if tuple(weight.shape) != (embedding_size, num_classes):
                raise ValueError(
                    f"pytorch-metric-learning's W is [D, C] = [{embedding_size}, {num_classes}], "
                    f"got {tuple(weight.shape)}"
                )
            with torch.no_grad():
                head.weight.copy_(weight.t())
        return head


class LeapHead(MarginHead):
    """A margin head with LEAP's feature cloud (featcloud SPEC section 5): per-class angular
    statistics of the features, updated every training step, set each tail class's cloud
    width ``sigma_k = sqrt(max(var_head - var_k, 0))``, and the target angle of a row of
    class k moves by ``alpha_i = sigma_k * eps_i`` in the loss.

    Order inside ``forward`` in training mode (``module.train()``), as the SPEC says: sigma
    from the current statistics, then the loss with that cloud, then (without gradient) the
    statistics update with this batch; the step counter (the random draws' counter) then
    advances. In eval mode the cloud is off and nothing is updated. Every training-mode
    forward is a step, also one under ``torch.no_grad`` (call ``.eval()`` to validate) and each
    micro-batch of gradient accumulation.

    The statistics are buffers, so ``state_dict`` / ``load_state_dict`` carry them with the
    weight and the step: ``stats_centers`` (f64 ``[C * K, D]``, EMA unit centers; empty with
    ``center="class_weight"``), ``stats_mu`` and ``stats_v`` (f64 ``[C]``, EMA of the angle and
    its square), ``stats_n`` (int64 ``[C]``, samples seen), ``stats_updates`` and ``step``
    (int64). A loaded state is checked before use (finite, counts >= 0).

    Options: ``cloud`` (``"symmetric"`` or ``"one_sided"``), ``beta`` (EMA momentum),
    ``center`` (``"ema"`` or ``"class_weight"``), ``split`` (``"threshold"``: head = classes with
    at least ``threshold`` samples, only tail classes get a cloud; or ``"adaptive"``),
    ``warmup_steps`` (no cloud before), ``class_counts`` (the dataset's counts per class, when
    known; else the running counts), ``seed``; the rest as :class:`MarginHead`.
    """

    def __init__(
        self,
        num_classes: int,
        embedding_size: int,
        *,
        cloud: str = "symmetric",
        beta: float = 0.9,
        center: str = "ema",
        split: str = "threshold",
        threshold: int = 100,
        warmup_steps: int = 100,
        class_counts=None,
        seed: int = 0,
        **head_options,
    ):
        super().__init__(num_classes, embedding_size, **head_options)
        if cloud not in ("symmetric", "one_sided"):
            raise ValueError(f"cloud must be 'symmetric' or 'one_sided', got {cloud!r}")
        _choice("center", center, ("ema", "class_weight"))
        _choice("split", split, ("threshold", "adaptive"))
        if class_counts is not None:
            if any(int(n) != n for n in class_counts):
                raise ValueError("class_counts must be whole numbers")
            class_counts = [int(n) for n in class_counts]
            if len(class_counts) != num_classes or min(class_counts) < 0:
                raise ValueError(f"class_counts must be {num_classes} counts >= 0")
        if not (isinstance(seed, int) and 0 <= seed < 2**64):
            raise ValueError(f"seed must be an integer in [0, 2^64), got {seed!r}")
        self.cloud, self.seed = cloud, seed
        self.stats_json = json.dumps(
            {
                "beta": float(beta),
                "center": center,
                "split": {"threshold": int(threshold)} if split == "threshold" else "adaptive",
                "warmup_steps": int(warmup_steps),
                "class_counts": class_counts,
            }
        )
        k = self.options["subcenters"]
        centers = (num_classes * k, embedding_size) if center == "ema" else (0,)
        self.register_buffer("stats_centers", torch.zeros(centers, dtype=torch.float64))
        self.register_buffer("stats_mu", torch.zeros(num_classes, dtype=torch.float64))
        self.register_buffer("stats_v", torch.zeros(num_classes, dtype=torch.float64))
        self.register_buffer("stats_n", torch.zeros(num_classes, dtype=torch.int64))
        self.register_buffer("stats_updates", torch.zeros((), dtype=torch.int64))
        self.register_buffer("step", torch.zeros((), dtype=torch.int64))
        # The configuration is checked by the crate now, not at the first step.
        self.cloud_sigma()

    _F64_STATS = ("stats_centers", "stats_mu", "stats_v")

    def _apply(self, fn, *args, **kwargs):
        # module.float() / .half() / .to(dtype) convert floating buffers; the statistics stay
        # float64 (only moved with the module), as the crate keeps them.
        keep = {n: self._buffers[n] for n in self._F64_STATS}
        out = super()._apply(fn, *args, **kwargs)
        for n, old in keep.items():
            self._buffers[n] = old.to(device=self._buffers[n].device)
        return out

    def _stats_args(self):
        bufs = (self.stats_centers, self.stats_mu, self.stats_v, self.stats_n)
        for name, t in zip(("stats_centers", "stats_mu", "stats_v", "stats_n"), bufs):
            if t.device.type != "cpu":
                raise NotImplementedError(f"{name}: LeapHead keeps its statistics on the CPU in this build")
            if not t.is_contiguous():
                raise ValueError(f"{name} is not contiguous")
        c, d = self.num_classes, self.embedding_size
        k = self.options["subcenters"]
        want = {
            "stats_centers": (c * k, d) if json.loads(self.stats_json)["center"] == "ema" else (0,),
            "stats_mu": (c,),
            "stats_v": (c,),
            "stats_n": (c,),
        }
        for name, t in zip(want, bufs):
            if tuple(t.shape) != want[name]:
                raise ValueError(f"{name} is {tuple(t.shape)}, expected {want[name]}")
            dtype = torch.int64 if name == "stats_n" else torch.float64
            if t.dtype != dtype:
                raise TypeError(f"{name} is {t.dtype}; the statistics are {dtype} (SPEC 5)")
        return (self.stats_json, c, k, d) + tuple(t.data_ptr() for t in bufs) + (int(self.stats_updates),)

    def cloud_sigma(self) -> torch.Tensor:
        """sigma_cloud ``[C]`` (radians, float32) from the current statistics (SPEC 5)."""
        sigma = torch.empty(self.num_classes, dtype=torch.float32)
        _native.stats_sigma(*self._stats_args(), sigma.data_ptr())
        return sigma

    def forward(self, x: torch.Tensor, labels: torch.Tensor, return_rows: bool = False):
        """The loss of ``x`` ``[B, D]`` with ``labels`` ``[B]``; in training mode with the
        cloud, then a statistics update (see the class doc)."""
        if not self.training:
            return margin_loss(x, self.weight, labels, return_rows=return_rows, **self.options)
        if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.shape[1] != self.embedding_size:
            raise ValueError(f"x must be [B, {self.embedding_size}], got {getattr(x, 'shape', type(x).__name__)}")
        want = (self.num_classes * self.options["subcenters"], self.embedding_size)
        if tuple(self.weight.shape) != want:
            raise ValueError(f"weight is {tuple(self.weight.shape)}, expected {want}")
        sigma = self.cloud_sigma()
        loss, rows = margin_loss(
            x,
            self.weight,
            labels,
            cloud=self.cloud,
            sigma=sigma,
            seed=self.seed,
            step=int(self.step),
            return_rows=True,
            **self.options,
        )
        with torch.no_grad():
            xs = x.detach().to(torch.float32).contiguous()
            lab = _labels_i32(labels)
            k_iy = rows.k_iy.to(torch.int32).contiguous()
            c_iy = rows.c_iy.to(torch.float64).contiguous()
            args = self._stats_args()
            updates = _native.stats_update(
                *args, xs.shape[0], xs.data_ptr(), lab.data_ptr(), k_iy.data_ptr(), c_iy.data_ptr()
            )
            self.stats_updates.fill_(updates)
            self.step += 1
        return (loss, rows) if return_rows else loss

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, cloud={self.cloud!r}, stats={self.stats_json}"


__all__ = ["MarginHead", "LeapHead", "margin_loss", "insightface_options", "HeadRows", "FALLBACKS", "MARGIN_GRADS", "REDUCTIONS", "CLOUDS"]
