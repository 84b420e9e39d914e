"""One rank of the class-parallel tests (`test_parallel.py` starts R of these with gloo).

Usage: ``python parallel_worker.py RANK WORLD PORT OUT_DIR``. Runs every case of
`parallel_cases.CASES` on this rank's shard and saves what the test compares with a
single-process head: the loss, this rank's x gradient, its weight shard and dW shard, and the
sampled classes; then the error cases (each must raise the same error on every rank).
"""

import sys

import torch
import torch.distributed as dist

import parallel_cases as pc
from featcloud.parallel import ParallelLeapHead, ParallelMarginHead


def run_case(case, rank, world):
    x_all, labels_all = pc.batch(case, world)
    b = x_all.shape[0] // world
    x = x_all[rank * b : (rank + 1) * b].clone().requires_grad_(True)
    labels = labels_all[rank * b : (rank + 1) * b]
    cls = ParallelLeapHead if case.get("leap") else ParallelMarginHead
    if case.get("insightface"):
        head = ParallelMarginHead.from_insightface(pc.C, pc.D, dtype=case["dtype"], init_seed=3, **case["insightface"])
    else:
        head = cls(pc.C, pc.D, dtype=case["dtype"], init_seed=3, **case["options"])
    out = {"weight": head.weight.detach().clone(), "losses": [], "dx": [], "dw": [], "kept": [], "rows": []}
    for step in range(case.get("steps", 1)):
        x.grad, head.weight.grad = None, None
        loss, rows = head(x, labels, return_rows=True)
        out["rows"].append(rows)
        (loss * pc.upstream(loss)).sum().backward()
        out["losses"].append(loss.detach().clone())
        out["dx"].append(x.grad.clone())
        out["dw"].append(head.weight.grad.clone())
        if case["options"].get("sample_rate", 1.0) < 1.0:
            out["kept"].append(head.last_sample.tolist())
        if case.get("leap"):
            with torch.no_grad():
                head.weight -= 1e-4 * head.weight.grad  # a step, so that the statistics move
    out["gathered"] = head.gather_weight()
    if case.get("leap"):
        out["stats"] = {k: v.clone() for k, v in head.stats.state_dict().items() if k.startswith("stats_")}
        out["sigma"] = head.cloud_sigma()
    return out


def error_cases(rank, world):
    """(name, callable) pairs; each must raise on every rank."""
    x = torch.randn(4 + (rank == 0), pc.D)

    def uneven_batches():
        ParallelMarginHead(pc.C, pc.D)(x, torch.zeros(x.shape[0], dtype=torch.int64))

    def differing_options():
        ParallelMarginHead(pc.C, pc.D, s=30.0 if rank == 0 else 64.0)

    def label_out_of_range():
        y = torch.zeros(4, dtype=torch.int64)
        y[0] = pc.C if rank == world - 1 else 0
        ParallelMarginHead(pc.C, pc.D)(torch.randn(4, pc.D), y)

    def wrong_dtype():
        ParallelMarginHead(pc.C, pc.D)(torch.randn(4, pc.D, dtype=torch.float64), torch.zeros(4, dtype=torch.int64))

    def x_on_another_device():
        ParallelMarginHead(pc.C, pc.D)(torch.randn(4, pc.D, device="meta"), torch.zeros(4, dtype=torch.int64))

    def too_few_classes():
        ParallelMarginHead(world - 1, pc.D)

    def nan_weight_on_the_last_rank():
        head = ParallelMarginHead(pc.C, pc.D)
        if rank == world - 1:
            with torch.no_grad():
                head.weight[0, 0] = float("nan")
        head(torch.randn(4, pc.D), torch.zeros(4, dtype=torch.int64))

    def bad_statistics_on_the_last_rank():
        head = ParallelLeapHead(pc.C, pc.D)
        if rank == world - 1:
            head.stats.stats_n[0] = -1
        head(torch.randn(4, pc.D), torch.zeros(4, dtype=torch.int64))

    def different_steps():
        head = ParallelMarginHead(pc.C, pc.D)
        head.step.fill_(rank)
        head(torch.randn(4, pc.D), torch.zeros(4, dtype=torch.int64))

    def nan_upstream_on_the_last_rank():
        head = ParallelMarginHead(pc.C, pc.D)
        x = torch.randn(4, pc.D, requires_grad=True)
        loss = head(x, torch.zeros(4, dtype=torch.int64))
        (loss * (float("nan") if rank == world - 1 else 1.0)).backward()

    return [
        ("uneven_batches", uneven_batches),
        ("differing_options", differing_options),
        ("label_out_of_range", label_out_of_range),
        ("wrong_dtype", wrong_dtype),
        ("too_few_classes", too_few_classes),
        ("x_on_another_device", x_on_another_device),
        ("nan_weight_on_the_last_rank", nan_weight_on_the_last_rank),
        ("bad_statistics_on_the_last_rank", bad_statistics_on_the_last_rank),
        ("different_steps", different_steps),
        ("nan_upstream_on_the_last_rank", nan_upstream_on_the_last_rank),
    ]


def state_round_trip(rank, world, out_dir):
    """ParallelLeapHead's state through a file: a fresh head loads every entry (the weight
    included), keeps its weight and statistics consistent, and DDP leaves the shards alone."""
    case = pc.CASES["leap"]
    x_all, labels_all = pc.batch(case, world)
    b = x_all.shape[0] // world
    x, labels = x_all[rank * b : (rank + 1) * b], labels_all[rank * b : (rank + 1) * b]
    a = ParallelLeapHead(pc.C, pc.D, dtype=torch.float64, **case["options"])
    for _ in range(2):
        a(x, labels)
    path = f"{out_dir}/state{rank}.pt"
    sd = a.state_dict()
    sd["weight"] = torch.full_like(sd["weight"], 0.5)
    torch.save(sd, path)
    fresh = ParallelLeapHead(pc.C, pc.D, dtype=torch.float64, **case["options"])
    fresh.load_state_dict(torch.load(path))
    report = {
        "keys": sorted(sd.keys()),
        "weight_loaded": bool((fresh.weight == 0.5).all()),
        "step": int(fresh.step),
        "stats_equal": all(torch.equal(getattr(fresh.stats, k), getattr(a.stats, k)) for k in ("stats_mu", "stats_v", "stats_n", "stats_centers")),
    }
    # Both continue identically from the same state.
    a.load_state_dict(torch.load(path))
    report["same_next_loss"] = bool(torch.equal(a(x, labels), fresh(x, labels)))
    # DDP around the head itself does not broadcast rank 0's shard over the others.
    from torch.nn.parallel import DistributedDataParallel

    with torch.no_grad():
        fresh.weight.fill_(rank)  # shards that differ, as they do
    before = fresh.weight.detach().clone()
    try:  # (refused: every parameter is on DDP's ignore list, so nothing is left to it)
        DistributedDataParallel(fresh)
    except RuntimeError:
        pass
    report["ddp_kept_shard"] = bool(torch.equal(fresh.weight.detach(), before))
    return report


def main():
    rank, world, port, out_dir = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    results = {name: run_case(case, rank, world) for name, case in pc.CASES.items()}
    # Rerun of one sampled case: the same classes.
    results["sampled_again"] = run_case(pc.CASES["sampled"], rank, world)
    errors = {}
    for name, fn in error_cases(rank, world):
        try:
            fn()
            errors[name] = None
        except Exception as e:  # noqa: BLE001 - the test checks the type and message
            errors[name] = (type(e).__name__, str(e))
    results["errors"] = errors
    results["state"] = state_round_trip(rank, world, out_dir)
    torch.save(results, f"{out_dir}/rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
