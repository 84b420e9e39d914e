"""The cases of the class-parallel tests, shared by the workers and the test."""

import torch

C, D = 11, 6
ROWS_PER_RANK = 6


def batch(case, world):
    """The global batch of a case: ROWS_PER_RANK rows per rank, every 5th row ignored."""
    g = torch.Generator().manual_seed(case.get("data_seed", 0))
    b = ROWS_PER_RANK * world
    x = torch.randn(b, D, generator=g, dtype=torch.float64).to(case["dtype"])
    # `label_set`: labels cycle over a few classes, so that sampling leaves classes out (the
    # set spans every rank's shard) and the LEAP case sees several rows of each class.
    few = case.get("label_set")
    labels = torch.randint(0, C, (b,), generator=g) if few is None else torch.tensor([few[(5 * i) % len(few)] for i in range(b)])
    labels[4::5] = -1
    return x, labels


def upstream(loss):
    """The upstream gradient the cases use: 1.5 for a scalar loss, row-dependent for none."""
    if loss.dim() == 0:
        return torch.tensor(1.5, dtype=loss.dtype)
    return (0.5 + 0.25 * (torch.arange(loss.shape[0]) % 3)).to(loss.dtype)


_ARC = dict(s=30.0)
CASES = {
    "arcface_f64": dict(dtype=torch.float64, options=dict(_ARC)),
    "arcface_f32": dict(dtype=torch.float32, options=dict(_ARC)),
    "cosface_sum": dict(dtype=torch.float32, options=dict(s=30.0, m2=0.0, m3=0.35, reduction="sum")),
    "smoothing_none": dict(dtype=torch.float64, options=dict(s=30.0, label_smoothing=0.1, reduction="none")),
    # Built with ParallelMarginHead.from_insightface(**insightface); `options` are the
    # single-process head's (MarginHead.from_insightface's, written out).
    "insightface": dict(
        dtype=torch.float32,
        insightface=dict(s=30.0, m2=0.5),
        options=dict(s=30.0, m2=0.5, fallback="none", margin_grad="straight_through"),
    ),
    "insightface_cosface": dict(
        dtype=torch.float64,
        insightface=dict(s=30.0, m3=0.35),
        options=dict(s=30.0, m2=0.0, m3=0.35, fallback="none"),
    ),
    "subcenters": dict(dtype=torch.float64, options=dict(s=30.0, subcenters=3)),
    "rate_one": dict(dtype=torch.float32, options=dict(s=30.0, sample_rate=1.0)),
    "sampled": dict(dtype=torch.float64, label_set=[1, 4, 7, 9], options=dict(s=30.0, sample_rate=0.4, seed=9), steps=2),
    "sampled_k2_smoothing_none": dict(
        dtype=torch.float64,
        label_set=[2, 5, 8, 10],
        options=dict(s=30.0, sample_rate=0.6, seed=4, subcenters=2, label_smoothing=0.2, reduction="none"),
        steps=2,
    ),
    "leap": dict(
        dtype=torch.float64,
        leap=True,
        label_set=[0, 1, 2, 3, 4, 5],
        steps=4,
        options=dict(s=30.0, warmup_steps=1, threshold=2, seed=5, class_counts=[5, 1, 4, 2, 1, 6, 3, 1, 2, 8, 1]),
    ),
}
