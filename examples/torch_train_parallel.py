"""The example trainer of `torch_train.py`, class-parallel: the class weights sharded over the
ranks of torch.distributed (gloo on CPU), the backbone data-parallel (DDP), each rank taking
its share of every batch. ParallelMarginHead (ArcFace) against ParallelLeapHead (ArcFace +
LEAP), optionally with PartialFC's negative-class sampling.

    torchrun --nproc_per_node 2 examples/torch_train_parallel.py [--sample-rate 0.5]

Every rank builds the same data and the same initial network; rank 0 prints the table of
`torch_train.py` (many/medium/few-shot accuracy). Exits with an error if a model's training
loss does not decrease.
"""

import argparse
import sys

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from featcloud.parallel import ParallelLeapHead, ParallelMarginHead
from torch_train import accuracy, long_tailed_data


def train(head, x, y, epochs, seed, batch=128):
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(32, 128), torch.nn.ReLU(), torch.nn.Linear(128, 16))
    ddp = DistributedDataParallel(net)
    opt = torch.optim.Adam(list(ddp.parameters()) + list(head.parameters()), lr=2e-3)
    order = torch.Generator().manual_seed(seed)
    losses = []
    per_rank = batch // world
    for _ in range(epochs):
        perm = torch.randperm(len(y), generator=order)
        total, rows = 0.0, 0
        # Whole global batches only: every rank must pass the same number of rows.
        for i in range(0, len(y) - batch + 1, batch):
            idx = perm[i + rank * per_rank : i + (rank + 1) * per_rank]
            loss = head(ddp(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            # DDP averaged the backbone's gradients over the ranks: times R, they are the whole
            # batch's loss gradient, as in one process. (The head's dW is exact already.)
            for p in net.parameters():
                p.grad.mul_(world)
            opt.step()
            total += loss.item() * batch
            rows += batch
        losses.append(total / rows)
    return net, losses


class _FullWeight:
    """The whole W (`gather_weight`) as `accuracy` reads a head: `.weight` and `.options`."""

    def __init__(self, head):
        self.weight, self.options = head.gather_weight(), head.options


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--classes", type=int, default=60)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--sample-rate", type=float, default=1.0)
    args = ap.parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    x, y, xt, yt, counts = long_tailed_data(args.classes, args.seed)
    say = print if rank == 0 else (lambda *a, **k: None)
    say(f"{world} ranks (gloo), {args.classes} classes sharded, sample rate {args.sample_rate}; "
        f"{len(y)} training rows, {len(yt)} test rows")
    common = dict(s=16.0, m2=0.3, sample_rate=args.sample_rate, seed=args.seed)
    heads = {
        "ParallelMarginHead": ParallelMarginHead(args.classes, 16, **common),
        "ParallelLeapHead": ParallelLeapHead(
            args.classes, 16, threshold=100, warmup_steps=50, class_counts=counts.tolist(), **common
        ),
    }
    say(f"{'head':<28} {'loss first->last':>18} {'all':>7} {'many':>7} {'medium':>7} {'few':>7}")
    ok = True
    for name, head in heads.items():
        net, losses = train(head, x, y, args.epochs, args.seed)
        head.eval()
        acc = accuracy(net, _FullWeight(head), xt, yt, counts)
        say(f"{name:<28} {losses[0]:8.3f} -> {losses[-1]:7.3f} "
            + " ".join(f"{acc[g]:6.2f}%" for g in ("all", "many", "medium", "few")))
        ok &= losses[-1] < 0.8 * losses[0]
    dist.destroy_process_group()
    if not ok:
        sys.exit("a model's training loss did not decrease")


if __name__ == "__main__":
    main()
