"""Class-parallel heads (`featcloud.parallel`, SPEC 5c) against the single-process head.

R = 2 and 3 gloo processes on this machine (`parallel_worker.py`) run every case of
`parallel_cases.py`; this test computes the same steps in one process with the whole W (the
shards concatenated) and compares the loss, each rank's dx rows and each rank's dW shard.
Sampling: the head equals the single-process head over the kept classes, the sample is the
one `sample_classes` gives for every rank (any process computes the same), and a rerun
gives the same sample and the same bits. LEAP: losses, gradients, statistics and sigma
after four steps. Errors: each bad input raises the same exception on every rank.
"""

import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

import parallel_cases as pc
from featcloud import _native
from featcloud.parallel import shard_range
from featcloud.torch import LeapHead, margin_loss

HERE = Path(__file__).parent


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module", params=[2, 3], ids=lambda r: f"R{r}")
def ranks(request):
    """Runs the workers of one world size; returns (R, [each rank's results])."""
    world = request.param
    with tempfile.TemporaryDirectory() as out:
        port = str(_free_port())
        env = dict(os.environ, PYTHONPATH=str(HERE) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        procs = [
            subprocess.Popen(
                [sys.executable, str(HERE / "parallel_worker.py"), str(r), str(world), port, out],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
            )
            for r in range(world)
        ]
        logs = [p.communicate(timeout=600)[0].decode() for p in procs]
        for r, p in enumerate(procs):
            assert p.returncode == 0, f"rank {r} of {world} failed:\n{logs[r]}"
        yield world, [torch.load(f"{out}/rank{r}.pt", weights_only=False) for r in range(world)]


def _tol(dtype):
    """(loss, gradients) tolerances relative to the largest value: f64 is the oracle against
    itself in another order; f32 is two CPU-backend results each within SPEC 8 of the oracle."""
    return (1e-10, 1e-9) if dtype == torch.float64 else (2e-5, 2e-4)


def _close(got, want, tol, what):
    scale = max(float(want.abs().max()), 1e-30)
    err = float((got.to(torch.float64) - want.to(torch.float64)).abs().max())
    assert err <= tol * scale, f"{what}: max error {err:.3e} against max {scale:.3e}"


def _global_upstream(world, loss_like):
    """The upstream of every gathered row, as the workers apply it rank by rank."""
    if loss_like.dim() == 0:
        return pc.upstream(loss_like)
    return torch.cat([pc.upstream(torch.zeros(pc.ROWS_PER_RANK, dtype=loss_like.dtype))] * world)


def _head_options(case):
    return {k: v for k, v in case["options"].items() if k not in ("sample_rate", "seed")}


def _reference(case, world, weight, x_all, labels_all, rows=False):
    x = x_all.clone().requires_grad_(True)
    w = weight.clone().requires_grad_(True)
    loss, head_rows = margin_loss(x, w, labels_all, return_rows=True, **_head_options(case))
    (loss * _global_upstream(world, loss)).sum().backward()
    out = (loss.detach(), x.grad, w.grad)
    return out + (head_rows,) if rows else out


def _rows(world, r):
    return slice(r * pc.ROWS_PER_RANK, (r + 1) * pc.ROWS_PER_RANK)


@pytest.mark.parametrize(
    "name", [n for n, c in pc.CASES.items() if not c.get("leap") and c["options"].get("sample_rate", 1.0) == 1.0]
)
def test_shards_equal_the_single_process_head(ranks, name):
    world, res = ranks
    case = pc.CASES[name]
    tol, gtol = _tol(case["dtype"])
    k = case["options"].get("subcenters", 1)
    weight = torch.cat([res[r][name]["weight"] for r in range(world)])
    assert weight.shape == (pc.C * k, pc.D)
    x_all, labels_all = pc.batch(case, world)
    loss, dx, dw, rows = _reference(case, world, weight, x_all, labels_all, rows=True)
    for r in range(world):
        got = res[r][name]
        first, n = shard_range(pc.C, world, r)
        want_loss = loss if loss.dim() == 0 else loss[_rows(world, r)]
        _close(got["losses"][0], want_loss, tol, f"R={world} {name} rank {r} loss")
        # The rows this rank's forward returns (return_rows): lse, c_iy, t, alpha, k_iy.
        for field in ("lse", "c_iy", "t", "alpha"):
            want_field = getattr(rows, field)[_rows(world, r)]
            _close(getattr(got["rows"][0], field), want_field, tol, f"R={world} {name} rank {r} {field}")
        assert torch.equal(got["rows"][0].k_iy, rows.k_iy[_rows(world, r)])
        _close(got["dx"][0], dx[_rows(world, r)], gtol, f"R={world} {name} rank {r} dx")
        _close(got["dw"][0], dw[first * k : (first + n) * k], gtol, f"R={world} {name} rank {r} dW")
    # Every rank gathers the whole W (after the step: the weight did not change).
    for r in range(world):
        assert torch.equal(res[r][name]["gathered"], weight)
    # Ignored rows get exactly zero.
    for r in range(world):
        lab = labels_all[_rows(world, r)]
        assert (res[r][name]["dx"][0][lab < 0] == 0).all()


def test_rate_one_is_no_sampling(ranks):
    world, res = ranks
    for r in range(world):
        a, b = res[r]["rate_one"], res[r]["arcface_f32"]
        assert torch.equal(a["losses"][0], b["losses"][0])
        assert torch.equal(a["dx"][0], b["dx"][0]) and torch.equal(a["dw"][0], b["dw"][0])


@pytest.mark.parametrize("name", ["sampled", "sampled_k2_smoothing_none"])
def test_sampling_is_the_head_over_the_kept_classes(ranks, name):
    world, res = ranks
    case = pc.CASES[name]
    opts = case["options"]
    k = opts.get("subcenters", 1)
    x_all, labels_all = pc.batch(case, world)
    weight = torch.cat([res[r][name]["weight"] for r in range(world)])
    positives = set(labels_all[labels_all >= 0].tolist())
    for step in range(case["steps"]):
        kept = [res[r][name]["kept"][step] for r in range(world)]
        # What each rank's head used is the sample any process computes for that rank
        # (SPEC 5c), and a rerun draws it again.
        for r in range(world):
            first, n = shard_range(pc.C, world, r)
            assert kept[r] == _native.sample_classes(labels_all.tolist(), first, n, opts["sample_rate"], opts["seed"], step)
            if name == "sampled":
                assert kept[r] == res[r]["sampled_again"]["kept"][step]
            assert positives & set(range(first, first + n)) <= set(kept[r])
        every = [j for ks in kept for j in ks]
        assert len(every) < pc.C, "the sample keeps every class: it tests nothing"
        # The single-process head over the kept classes (their K rows each), labels mapped to
        # their positions.
        pos = {j: i for i, j in enumerate(every)}
        mapped = torch.tensor([pos[int(y)] if y >= 0 else -1 for y in labels_all])
        rows = [j * k + kk for j in every for kk in range(k)]
        loss, dx, dw_sub = _reference(case, world, weight[rows], x_all, mapped)
        dw = torch.zeros_like(weight)
        dw[rows] = dw_sub
        for r in range(world):
            got = res[r][name]
            first, n = shard_range(pc.C, world, r)
            want_loss = loss if loss.dim() == 0 else loss[_rows(world, r)]
            _close(got["losses"][step], want_loss, 1e-10, f"R={world} {name} step {step} rank {r} loss")
            _close(got["dx"][step], dx[_rows(world, r)], 1e-9, f"R={world} {name} rank {r} dx")
            _close(got["dw"][step], dw[first * k : (first + n) * k], 1e-9, f"R={world} {name} rank {r} dW")
            if name == "sampled":
                # Run after run, the same bits (SPEC 4).
                again = res[r]["sampled_again"]
                for key in ("losses", "dx", "dw"):
                    assert torch.equal(got[key][step], again[key][step]), f"rank {r} step {step}: {key} differs on a rerun"
    # Another step draws another sample.
    assert any(res[r][name]["kept"][0] != res[r][name]["kept"][1] for r in range(world))


def test_leap_statistics_shard_with_the_weight(ranks):
    world, res = ranks
    case = pc.CASES["leap"]
    opts = dict(case["options"])
    x_all, labels_all = pc.batch(case, world)
    head = LeapHead(pc.C, pc.D, dtype=torch.float64, **opts)
    with torch.no_grad():
        head.weight.copy_(torch.cat([res[r]["leap"]["weight"] for r in range(world)]))
    x = x_all.clone().requires_grad_(True)
    saw_cloud = False
    for step in range(case["steps"]):
        saw_cloud |= bool((head.cloud_sigma() > 0).any())
        x.grad, head.weight.grad = None, None
        loss = head(x, labels_all)
        (loss * 1.5).backward()
        for r in range(world):
            first, n = shard_range(pc.C, world, r)
            got = res[r]["leap"]
            _close(got["losses"][step], loss.detach(), 1e-10, f"R={world} leap step {step} loss")
            _close(got["dx"][step], x.grad[_rows(world, r)], 1e-9, f"R={world} leap step {step} dx")
            _close(got["dw"][step], head.weight.grad[first : first + n], 1e-9, f"R={world} leap step {step} dW")
        with torch.no_grad():
            head.weight -= 1e-4 * head.weight.grad
    assert saw_cloud, "no class got a cloud: the case tests nothing"
    for key in ("stats_centers", "stats_mu", "stats_v", "stats_n"):
        got = torch.cat([res[r]["leap"]["stats"][key] for r in range(world)])
        _close(got, getattr(head, key), 1e-10, f"R={world} {key}")
    _close(torch.cat([res[r]["leap"]["sigma"] for r in range(world)]), head.cloud_sigma(), 1e-6, "sigma")


@pytest.mark.parametrize(
    "name,kind,words",
    [
        ("uneven_batches", "ValueError", "same number of rows"),
        ("differing_options", "ValueError", "differs between the ranks"),
        ("label_out_of_range", "ValueError", "out of range"),
        ("wrong_dtype", "TypeError", "dtype"),
        ("too_few_classes", "ValueError", "cannot be sharded"),
        ("different_steps", "ValueError", "different steps"),
        ("x_on_another_device", "ValueError", "one device"),
        # Only the last rank's input is bad: it raises why, every other rank names it.
        ("nan_weight_on_the_last_rank", "ValueError", "W"),
        ("bad_statistics_on_the_last_rank", "ValueError", "stats_n"),
        ("nan_upstream_on_the_last_rank", "ValueError", "not finite"),
    ],
)
def test_bad_inputs_raise_on_every_rank(ranks, name, kind, words):
    world, res = ranks
    only_last = name.endswith("on_the_last_rank")
    for r in range(world):
        err = res[r]["errors"][name]
        assert err is not None, f"rank {r}: {name} did not raise"
        if only_last and r < world - 1:
            assert err[0] == "RuntimeError" and "rank" in err[1], f"rank {r}: {name} raised {err}"
            if "statistics" not in err[1]:
                assert f"rank {world - 1}" in err[1], f"rank {r}: {name} raised {err}"
        else:
            assert err[0] == kind and words in err[1], f"rank {r}: {name} raised {err}"


def test_leap_state_round_trips_and_ddp_leaves_the_shards(ranks):
    world, res = ranks
    for r in range(world):
        st = res[r]["state"]
        assert st["weight_loaded"], f"rank {r}: the weight entry was not loaded"
        assert "stats.weight" not in st["keys"] and "stats.step" not in st["keys"], st["keys"]
        assert st["step"] == 2 and st["stats_equal"] and st["same_next_loss"], st
        assert st["ddp_kept_shard"], f"rank {r}: DDP replaced the shard"


def test_needs_an_initialized_process_group():
    from featcloud.parallel import ParallelMarginHead

    with pytest.raises(RuntimeError, match="init_process_group"):
        ParallelMarginHead(10, 4)
