"""Class-parallel margin heads over ``torch.distributed`` (featcloud SPEC section 5c).

The class weights W are split by class over the ranks of a process group: rank r holds the
contiguous classes ``[first_r, first_r + C_r)`` (``C // R`` each, the first ``C % R`` ranks one
more). Each rank embeds its own batch; the head gathers every rank's rows and labels, each
rank computes per-row partials over its own classes (max, sum of exp, the target logit where
it holds the label), two all-reduces combine them into the loss of the whole batch, and the
backward runs per rank given the combined log-sum-exp: each rank's dW stays local, and dx is
summed over the ranks (an all-reduce), each rank keeping its own rows' part. Nothing of size
B x C is exchanged. This is insightface's PartialFC, with featcloud's head on every shard.

- :class:`ParallelMarginHead`: the margin head (the options of
  :class:`featcloud.torch.MarginHead`), plus PartialFC's negative-class sampling
  (``sample_rate`` < 1: each step, every rank keeps the classes of its shard that label a
  row of the global batch and a random share of the others, ``rate * C_r`` rounded up in all; a
  deterministic function of ``seed``, the step and the labels, the same on every rank).
- :class:`ParallelLeapHead`: the same with LEAP's class statistics, sharded with W (each
  rank's buffers hold its own classes; the head variance is summed over the ranks).

Semantics: ``forward(x, labels)`` takes this rank's rows (every rank the same number) and,
for reductions ``mean`` and ``sum``, returns the loss of the whole (gathered) batch, the same
value on every rank; for ``none``, this rank's rows' losses. Its gradient to ``x`` is the
exact gradient of that loss with respect to this rank's rows. Every rank must call forward
and backward together (they communicate), with the same upstream gradient of the loss (as
``loss.backward()`` on every rank does). A bad input on one rank (a non-finite weight in its
shard, a bad batch or state) raises on every rank: the failing rank its own error, the
others a ``RuntimeError`` naming it, never a hang.

With ``DistributedDataParallel``: keep the head out of it (the head's parameters are
sharded, not replicated; the head also lists them in ``_ddp_params_and_buffers_to_ignore``,
so that ``DistributedDataParallel(head)`` leaves them alone). DDP averages the backbone's
gradients over the R ranks, which gives 1/R of the whole batch's loss gradient: multiply the
backbone's gradients (not the loss: the head's dW is already exact) by R after
``backward()`` to train at the single-process scale (``examples/torch_train_parallel.py``).

Works with the ``gloo`` backend on CPU tensors (float32: the CPU backend; float64: the
oracle). CUDA tensors (``nccl``) need the crate's CUDA kernels on torch's tensors, not wired
in this build: they raise ``NotImplementedError``.
"""

from __future__ import annotations

import hashlib
import json
from typing import Optional

import torch
import torch.distributed as dist

from . import _native
from .torch import _CPU_DTYPES, _config_json, _labels_i32, HeadRows, insightface_options, LeapHead, MarginHead

__all__ = ["ParallelMarginHead", "ParallelLeapHead", "shard_range"]


def shard_range(num_classes: int, world_size: int, rank: int) -> tuple:
    """The classes ``(first, count)`` of ``rank``: ``num_classes // world_size`` each, the first
    ``num_classes % world_size`` ranks one more."""
    base, extra = divmod(num_classes, world_size)
    return rank * base + min(rank, extra), base + (1 if rank < extra else 0)


class _GatherRows(torch.autograd.Function):
    """All-gather of every rank's rows along dim 0; the backward sums the gradient over the
    ranks (each rank's head saw only its own classes) and keeps this rank's rows."""

    @staticmethod
    def forward(ctx, x, group):
        world = dist.get_world_size(group)
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous(), group=group)
        ctx.group, ctx.rank, ctx.b = group, dist.get_rank(group), x.shape[0]
        return torch.cat(parts)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        g = g.contiguous().clone()
        dist.all_reduce(g, op=dist.ReduceOp.SUM, group=ctx.group)
        return g[ctx.rank * ctx.b : (ctx.rank + 1) * ctx.b], None


class _ShardHead(torch.autograd.Function):
    """The head on this rank's shard of W for the gathered batch (SPEC 5c): the native
    partials, their combine over the group (all-reduce max, then sum), and the backward of
    this shard given the combined lse."""

    @staticmethod
    def forward(ctx, x, w, labels, sigma, call, group):
        cfg_json, ls, reduction, first, total, seed, step = call
        b, d = x.shape
        k = json.loads(cfg_json)["subcenters"]
        n_local = w.shape[0] // k
        parts = torch.zeros(8, b, dtype=torch.float64)
        sig = (0, 0) if sigma is None else (sigma.data_ptr(), sigma.numel())
        error = None
        try:
            _native.head_shard_cpu(
                cfg_json, _CPU_DTYPES[x.dtype], b, n_local, d, first, total,
                x.data_ptr(), w.data_ptr(), labels.data_ptr(), *sig, seed, step, parts.data_ptr(),
            )  # fmt: skip
        except ValueError as e:  # e.g. a non-finite weight in this shard: every rank raises
            error = e
            parts.zero_()
        valid = labels >= 0
        # The row maxima, with this rank's failure flag as one more entry of the same all-reduce.
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        flag = torch.tensor([0.0 if error is None else float(world - rank)], dtype=torch.float64)
        m = torch.cat([parts[0], flag])
        dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
        if error is not None:
            raise error
        if m[-1] > 0:
            raise RuntimeError(f"the head failed on rank {world - int(m[-1])} of the process group (that rank raised why)")
        m = m[:-1]
        # Each rank's sum of exp rescaled to the common max, then one sum for everything else
        # (the target fields are the owner's and 0 elsewhere: their sum is the owner's value).
        packed = torch.cat([(parts[1] * torch.exp(parts[0] - m)).unsqueeze(0), parts[2:]])
        dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=group)
        lse = torch.where(valid, m + torch.log(torch.where(valid, packed[0], 1.0)), 0.0)
        z_y = packed[2]
        row_loss = lse - z_y if ls == 0.0 else lse - (1.0 - ls) * z_y - (ls / total) * packed[1]
        row_loss = torch.where(valid, row_loss, 0.0)
        n_valid = int(valid.sum())
        if reduction == "mean":
            loss = row_loss.sum() / n_valid if n_valid else row_loss.sum() * 0.0
        elif reduction == "sum":
            loss = row_loss.sum()
        else:
            loss = row_loss
        ctx.save_for_backward(x, w, labels, sigma if sigma is not None else torch.empty(0), lse)
        ctx.call, ctx.group, ctx.has_sigma, ctx.n_valid = call, group, sigma is not None, n_valid
        # lse, c_iy, t, alpha, k_iy of every gathered row (the owner's values).
        rows = torch.stack([lse, packed[3], packed[4], packed[5], packed[6]])
        ctx.mark_non_differentiable(rows)
        return loss.to(x.dtype), rows

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g, _g_rows):
        x, w, labels, sigma, lse = ctx.saved_tensors
        cfg_json, ls, reduction, first, total, seed, step = ctx.call
        if g is None:
            return (None,) * 6
        b, d = x.shape
        k = json.loads(cfg_json)["subcenters"]
        if reduction == "none":
            # Each rank's upstream covers its own rows (zeros elsewhere): the sum is every row's.
            weight = g.to(torch.float64).contiguous().clone()
            dist.all_reduce(weight, op=dist.ReduceOp.SUM, group=ctx.group)
        else:
            scale = float(g) / (ctx.n_valid if reduction == "mean" and ctx.n_valid else 1)
            weight = torch.full((b,), scale, dtype=torch.float64)
        dx, dw = torch.empty_like(x), torch.empty_like(w)
        sig = (sigma.data_ptr(), sigma.numel()) if ctx.has_sigma else (0, 0)
        error = None
        try:
            if not torch.isfinite(weight).all():
                raise ValueError("the upstream gradient of the loss is not finite")
            _native.head_shard_backward_cpu(
                cfg_json, _CPU_DTYPES[x.dtype], b, w.shape[0] // k, d, first, total,
                x.data_ptr(), w.data_ptr(), labels.data_ptr(), *sig, seed, step,
                lse.data_ptr(), weight.data_ptr(), dx.data_ptr(), dw.data_ptr(),
            )  # fmt: skip
        except ValueError as e:
            error = e
        # Before the dx all-reduce that the other ranks' backward enters next.
        _raise_together(ctx.group, error, "the head's backward")
        return dx, dw, None, None, None, None


def _raise_together(group, error: Optional[BaseException], what: str) -> None:
    """Raises on every rank if any rank failed (a collective: every rank calls it): the failing
    rank its own ``error``, the others a ``RuntimeError`` naming the lowest failing rank."""
    flag = torch.tensor([0 if error is None else dist.get_world_size(group) - dist.get_rank(group)])
    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
    if error is not None:
        raise error
    if int(flag):
        failed = dist.get_world_size(group) - int(flag)
        raise RuntimeError(f"{what} failed on rank {failed} of the process group (that rank raised why)")


def _fingerprint(*fields) -> int:
    """A 62-bit digest of the fields (for comparing the ranks' configurations)."""
    return int.from_bytes(hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).digest()[:8], "little") >> 2


class ParallelMarginHead(torch.nn.Module):
    """A margin head whose class weights are sharded over a process group (module doc).

    ``weight`` is this rank's ``[C_r * K, D]`` shard (global classes ``first .. first + C_r``,
    see :func:`shard_range`), initialized N(0, 0.01^2) from ``init_seed`` and the global
    class index, so that the shards of R ranks are the rows of one ``[C * K, D]`` matrix
    whatever R. ``sample_rate`` in (0, 1]: PartialFC's negative-class sampling in training
    mode (1: every class); ``seed`` keys the sample (and the cloud of
    :class:`ParallelLeapHead`); ``step`` (a buffer) counts training forwards. The other options
    are :class:`featcloud.torch.MarginHead`'s. Constructed on every rank of ``group`` (default
    the world) with the same arguments: the ranks compare them and all raise if they differ.
    """

    def __init__(
        self,
        num_classes: int,
        embedding_size: int,
        *,
        group=None,
        sample_rate: float = 1.0,
        seed: int = 0,
        init_seed: int = 0,
        dtype: Optional[torch.dtype] = None,
        **head_options,
    ):
        super().__init__()
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("ParallelMarginHead needs torch.distributed initialized (dist.init_process_group)")
        if not (isinstance(num_classes, int) and num_classes >= 1):
            raise ValueError(f"num_classes must be an integer >= 1, got {num_classes!r}")
        if not (isinstance(embedding_size, int) and embedding_size >= 1):
            raise ValueError(f"embedding_size must be an integer >= 1, got {embedding_size!r}")
        if not (isinstance(sample_rate, (int, float)) and 0.0 < sample_rate <= 1.0):
            raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate!r}")
        for name, v in (("seed", seed), ("init_seed", init_seed)):
            if not (isinstance(v, int) and 0 <= v < 2**63):
                raise ValueError(f"{name} must be an integer in [0, 2^63), got {v!r}")
        self.group = group
        self.rank, self.world_size = dist.get_rank(group), dist.get_world_size(group)
        if num_classes < self.world_size:
            raise ValueError(f"{num_classes} classes cannot be sharded over {self.world_size} ranks (one at least each)")
        # The same checks and defaults as MarginHead (a bad option fails here, on every rank).
        proto = MarginHead(1, 1, **head_options)
        self.options = proto.options
        self.num_classes, self.embedding_size = num_classes, embedding_size
        self.sample_rate, self.seed = float(sample_rate), seed
        self.first, self.num_local = shard_range(num_classes, self.world_size, self.rank)
        k = self.options["subcenters"]
        self._check_same_on_every_rank(
            "the head's configuration",
            (type(self).__name__, num_classes, embedding_size, self.options, self.sample_rate, seed, init_seed,
             str(dtype)) + self._extra_fingerprint(),
        )  # fmt: skip
        # Rows of one [C * K, D] matrix drawn class by class: the same W for any world size.
        w = torch.empty(self.num_local * k, embedding_size, dtype=dtype or torch.float32)
        gen = torch.Generator()
        for j in range(self.num_local):
            gen.manual_seed(init_seed * 1_000_003 + self.first + j)
            w[j * k : (j + 1) * k].normal_(0.0, 0.01, generator=gen)
        self.weight = torch.nn.Parameter(w)
        self.register_buffer("step", torch.zeros((), dtype=torch.int64))
        #: The global classes this rank kept in the last training forward (sampling on), else None.
        self.last_sample: Optional[torch.Tensor] = None
        self._ignore_in_ddp()

    def _ignore_in_ddp(self) -> None:
        # Sharded, not replicated: DistributedDataParallel must neither broadcast nor average
        # them (it reads this list from the module it wraps).
        self._ddp_params_and_buffers_to_ignore = [n for n, _ in self.named_parameters()] + [
            n for n, _ in self.named_buffers()
        ]

    @classmethod
    def from_insightface(
        cls,
        num_classes: int,
        embedding_size: int,
        s: float = 64.0,
        m1: float = 1.0,
        m2: float = 0.5,
        m3: float = 0.0,
        sample_rate: float = 1.0,
        **kwargs,
    ) -> "ParallelMarginHead":
        """In place of insightface's ``PartialFC_V2(CombinedMarginLoss(s, m1, m2, m3),
        embedding_size, num_classes, sample_rate)``: the loss of
        :meth:`featcloud.torch.MarginHead.from_insightface` (the same conventions), class-parallel,
        with PartialFC's sampling at ``sample_rate`` (featcloud's sample rule, SPEC 5c: the
        same positives-always rule, its own random choice of negatives)."""
        return cls(num_classes, embedding_size, s=s, sample_rate=sample_rate, **insightface_options(m1, m2, m3), **kwargs)

    def _extra_fingerprint(self) -> tuple:
        return ()

    def _all_gather(self, t: torch.Tensor) -> list:
        every = [torch.empty_like(t) for _ in range(self.world_size)]
        dist.all_gather(every, t, group=self.group)
        return every

    def _check_same_on_every_rank(self, what: str, fields) -> None:
        mine = torch.tensor([_fingerprint(fields)], dtype=torch.int64)
        if any(int(t) != int(mine) for t in self._all_gather(mine)):
            raise ValueError(f"{what} differs between the ranks of the process group")

    def extra_repr(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options.items())
        return (
            f"num_classes={self.num_classes} (rank {self.rank} of {self.world_size}: classes {self.first}.."
            f"{self.first + self.num_local - 1}), embedding_size={self.embedding_size}, "
            f"sample_rate={self.sample_rate}, {opts}"
        )

    def gather_weight(self) -> torch.Tensor:
        """The whole W ``[C * K, D]`` (every rank's shard in rank order), on every rank; a
        collective (every rank calls it), without gradient. For evaluation and export."""
        k = self.options["subcenters"]
        rows = max(shard_range(self.num_classes, self.world_size, r)[1] for r in range(self.world_size)) * k
        mine = torch.zeros(rows, self.embedding_size, dtype=self.weight.dtype)
        mine[: self.weight.shape[0]] = self.weight.detach()
        every = self._all_gather(mine)
        sizes = [shard_range(self.num_classes, self.world_size, r)[1] * k for r in range(self.world_size)]
        return torch.cat([t[:n] for t, n in zip(every, sizes)])

    # -- the parts a LEAP head changes -------------------------------------------------------

    def _cloud(self):
        """(cloud mode, this shard's sigma [C_r] or None) for this step."""
        return "off", None

    def _after_step(self, x_all, labels_all, rows) -> None:
        """Called after a training forward with the gathered batch and the head's rows."""

    # -- forward -----------------------------------------------------------------------------

    def _check_batch(self, x, labels):
        for name, t in (("x", x), ("labels", labels)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if x.dim() != 2 or x.shape[1] != self.embedding_size:
            raise ValueError(f"x must be [B, {self.embedding_size}], got {tuple(x.shape)}")
        if labels.dim() != 1 or labels.shape[0] != x.shape[0]:
            raise ValueError(f"labels must be [B] = [{x.shape[0]}], got {tuple(labels.shape)}")
        if labels.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
            raise TypeError(f"labels must be an integer tensor, got {labels.dtype}")
        if x.device != self.weight.device or labels.device != self.weight.device:
            raise ValueError(f"x ({x.device}), labels ({labels.device}) and the weight ({self.weight.device}) must be on one device")
        if x.device.type != "cpu":
            raise NotImplementedError(f"featcloud.parallel runs CPU tensors (gloo) in this build; got {x.device}")
        if x.dtype != self.weight.dtype or x.dtype not in _CPU_DTYPES:
            raise TypeError(f"x must have the weight's dtype ({self.weight.dtype}: float32 or float64), got {x.dtype}")

    def _gather_batch(self, x, labels):
        error = None
        try:
            self._check_batch(x, labels)
        except (TypeError, ValueError, NotImplementedError) as e:
            error = e
        # Every rank's row count, mode, step and check result in one gather, before the gathers
        # that need them: a mismatch or a bad input is an error on every rank, not a hang.
        rank_code = 0 if error is None else self.world_size - self.rank
        mine = torch.tensor([-1 if error else x.shape[0], int(self.training), int(self.step), rank_code])
        every = torch.stack(self._all_gather(mine))
        if error is not None:
            raise error
        if int(every[:, 3].max()):
            failed = self.world_size - int(every[:, 3].max())
            raise RuntimeError(f"the head's input check failed on rank {failed} of the process group (that rank raised why)")
        if (every[:, 0] != x.shape[0]).any():
            raise ValueError(f"every rank must pass the same number of rows; got {every[:, 0].tolist()}")
        if (every[:, 1] != int(self.training)).any():
            raise ValueError("every rank must be in the same mode (train() or eval())")
        if (every[:, 2] != int(self.step)).any():
            raise ValueError(f"the ranks' heads are at different steps {every[:, 2].tolist()} (restore every rank's state)")
        labels_all = torch.cat(self._all_gather(labels.to(torch.int64).contiguous()))
        if labels_all.numel() and int(labels_all.max()) >= self.num_classes:
            raise ValueError(
                f"label {int(labels_all.max())} out of range: there are {self.num_classes} classes (negative = ignored row)"
            )
        return _GatherRows.apply(x, self.group), labels_all

    def _sampled(self, labels_all):
        """(W rows' index or None, first, total, labels mapped, kept classes) of this step."""
        k = self.options["subcenters"]
        if not self.training or self.sample_rate == 1.0:
            return None, self.first, self.num_classes, labels_all, None
        kept = _native.sample_classes(
            labels_all.tolist(), self.first, self.num_local, self.sample_rate, self.seed, int(self.step)
        )
        counts = torch.cat(self._all_gather(torch.tensor([len(kept)], dtype=torch.int64)))
        offsets = torch.cumsum(counts, 0) - counts
        # Positives come first in each shard's kept list, in increasing order (SPEC 5c), so a
        # label's position is its shard's offset plus its rank among that shard's positives.
        valid = labels_all >= 0
        positives = torch.unique(labels_all[valid])
        firsts = torch.tensor([shard_range(self.num_classes, self.world_size, r)[0] for r in range(self.world_size)])
        shard_of = torch.searchsorted(firsts, positives, right=True) - 1
        first_pos = torch.searchsorted(positives, firsts[shard_of])
        new_of_positive = offsets[shard_of] + torch.arange(positives.numel()) - first_pos
        mapped = torch.full_like(labels_all, -1)
        mapped[valid] = new_of_positive[torch.searchsorted(positives, labels_all[valid])]
        kept_t = torch.tensor(kept, dtype=torch.int64)
        rows = ((kept_t - self.first) * k).repeat_interleave(k) + torch.arange(k).repeat(len(kept))
        return rows, int(offsets[self.rank]), int(counts.sum()), mapped, kept_t

    def forward(self, x: torch.Tensor, labels: torch.Tensor, return_rows: bool = False):
        """The loss of the whole batch (every rank's ``x`` ``[B, D]`` and ``labels`` ``[B]``);
        see the module doc. With ``return_rows``, ``(loss, HeadRows)``: this rank's rows' lse,
        c_iy, t, alpha and k_iy (``featcloud.torch.HeadRows``; lse over the classes of the step,
        the sampled ones when sampling)."""
        x_all, labels_all = self._gather_batch(x, labels)
        rows_idx, first, total, mapped, kept = self._sampled(labels_all)
        if self.training:
            self.last_sample = kept
        w = self.weight if rows_idx is None else self.weight.index_select(0, rows_idx)
        cloud, sigma = self._cloud() if self.training else ("off", None)
        if sigma is not None and kept is not None:
            sigma = sigma[kept - self.first].contiguous()
        o = self.options
        cfg_json = _config_json(
            o["s"], o["m1"], o["m2"], o["m3"], o["fallback"], o["margin_grad"], o["label_smoothing"],
            o["reduction"], o["subcenters"], cloud,
        )  # fmt: skip
        # The crate holds the label smoothing as float32; the combine uses that same value.
        ls = float(torch.tensor(o["label_smoothing"], dtype=torch.float32))
        call = (cfg_json, ls, o["reduction"], first, total, self.seed, int(self.step))
        loss, rows = _ShardHead.apply(
            x_all.contiguous(), w.contiguous(), _labels_i32(mapped), sigma, call, self.group
        )
        if self.training:
            with torch.no_grad():
                self._after_step(x_all.detach(), labels_all, rows)
                self.step += 1
        mine = slice(self.rank * x.shape[0], (self.rank + 1) * x.shape[0])
        if o["reduction"] == "none":
            loss = loss[mine]
        if not return_rows:
            return loss
        r = rows[:, mine]
        return loss, HeadRows(*(r[i].to(x.dtype, copy=True) for i in range(4)), r[4].to(torch.int64, copy=True))


class ParallelLeapHead(ParallelMarginHead):
    """:class:`ParallelMarginHead` with LEAP's class statistics (SPEC 5, sharded as SPEC 5c
    says): this rank's buffers hold its own classes' statistics (``stats_*`` as in
    :class:`featcloud.torch.LeapHead`, ``[C_r]`` rows), updated each training step from the
    whole batch's rows of those classes; sigma_cloud takes the head variance summed over the
    ranks. Options as :class:`featcloud.torch.LeapHead` (``class_counts`` global, ``[C]``).
    """

    #: The options that are LeapHead's (its defaults apply); the rest are the head's.
    _LEAP_OPTIONS = ("cloud", "beta", "center", "split", "threshold", "warmup_steps")

    def __init__(self, num_classes: int, embedding_size: int, *, class_counts=None, **options):
        leap = {k: options.pop(k) for k in self._LEAP_OPTIONS if k in options}
        self._leap_args = dict(leap, class_counts=None if class_counts is None else [int(n) for n in class_counts])
        super().__init__(num_classes, embedding_size, **options)
        if class_counts is not None and len(class_counts) != num_classes:
            raise ValueError(f"class_counts must be {num_classes} counts (the whole head's)")
        counts = None if class_counts is None else list(class_counts)[self.first : self.first + self.num_local]
        # The statistics of this rank's classes: the buffers of a LeapHead of C_r classes (their
        # checks and the crate's update) without its weight and step (this head's weight shard
        # and step are the ones; a second registration would make state_dict ambiguous).
        self.stats = LeapHead(
            self.num_local, embedding_size, class_counts=counts, seed=self.seed,
            subcenters=self.options["subcenters"], dtype=self.weight.dtype, **leap,
        )  # fmt: skip
        del self.stats.weight, self.stats.step
        self._ignore_in_ddp()

    def _extra_fingerprint(self) -> tuple:
        return (self._leap_args,)

    def cloud_sigma(self) -> torch.Tensor:
        """sigma_cloud of this rank's classes ``[C_r]`` (float32), the head variance's sums
        added over the ranks (SPEC 5c). Every rank must call it together."""
        error, parts = None, torch.zeros(3, dtype=torch.float64)
        try:
            args = self.stats._stats_args()
            parts[:2] = torch.tensor(_native.stats_head_variance_parts(*args), dtype=torch.float64)
        except (TypeError, ValueError, NotImplementedError) as e:  # e.g. a bad loaded state
            error = e
            parts[2] = self.world_size - self.rank
        # The sums of every shard, and the failure flags (their sum is > 0 if any rank failed).
        dist.all_reduce(parts, op=dist.ReduceOp.SUM, group=self.group)
        if error is not None:
            raise error
        if parts[2] > 0:
            raise RuntimeError("the LEAP statistics failed their check on another rank (that rank raised why)")
        sigma = torch.empty(self.num_local, dtype=torch.float32)
        _native.stats_sigma(*args, sigma.data_ptr(), (float(parts[0]), float(parts[1])))
        return sigma

    def _cloud(self):
        return self.stats.cloud, self.cloud_sigma()

    def _after_step(self, x_all, labels_all, rows):
        # This shard's classes' rows, as local labels; every other row is ignored here.
        local = labels_all - self.first
        local = torch.where((labels_all >= 0) & (local < self.num_local), local, -1)
        xs = x_all.to(torch.float32).contiguous()
        lab = _labels_i32(local)
        k_iy = rows[4].to(torch.int32).contiguous()
        c_iy = rows[1].to(torch.float64).contiguous()
        updates = _native.stats_update(
            *self.stats._stats_args(), xs.shape[0], xs.data_ptr(), lab.data_ptr(), k_iy.data_ptr(), c_iy.data_ptr()
        )
        self.stats.stats_updates.fill_(updates)
