"""Train a small embedding network with featcloud's heads in PyTorch: MarginHead (ArcFace)
against LeapHead (ArcFace + LEAP's feature cloud) on long-tailed data, from the same seed.

    pip install ./python torch      # once (README's test command does it into ./.venv)
    python examples/torch_train.py  # CPU; a few seconds

The data is generated here: C classes of Gaussian clusters in R^32 whose training counts fall
off as a power law (the largest class 300 samples, the smallest a handful), and a balanced
test set. It prints closed-set accuracy (nearest class weight by cosine) on the test set over
all classes and over many-shot (> 100 training samples), medium (20..100) and few-shot
(< 20) classes. The script exits with an error if either model's loss does not decrease.
"""

import argparse
import sys

import torch

import featcloud.torch as ft


def long_tailed_data(num_classes, seed):
    """(x_train, y_train, x_test, y_test, train counts): clusters with a shared within-class
    spread, so that a tail class's few samples under-represent its true spread."""
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(num_classes, 32, generator=g) * 1.2
    counts = [max(3, int(300 * (k + 1) ** -1.3)) for k in range(num_classes)]
    def draw(n_per_class):
        xs, ys = [], []
        for k, n in enumerate(n_per_class):
            xs.append(means[k] + torch.randn(n, 32, generator=g))
            ys.append(torch.full((n,), k))
        return torch.cat(xs), torch.cat(ys)
    x_train, y_train = draw(counts)
    x_test, y_test = draw([30] * num_classes)
    return x_train, y_train, x_test, y_test, torch.tensor(counts)


def train(head, x, y, epochs, seed):
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(32, 128), torch.nn.ReLU(), torch.nn.Linear(128, 16))
    opt = torch.optim.Adam(list(net.parameters()) + list(head.parameters()), lr=2e-3)
    order = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(epochs):
        perm = torch.randperm(len(y), generator=order)
        total = 0.0
        for i in range(0, len(y), 128):
            idx = perm[i : i + 128]
            loss = head(net(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        losses.append(total / len(y))
    return net, losses


def accuracy(net, head, x, y, counts):
    with torch.no_grad():
        e = torch.nn.functional.normalize(net(x))
        w = torch.nn.functional.normalize(head.weight)
        k = head.options["subcenters"]
        pred = (e @ w.t()).view(len(y), -1, k).amax(2).argmax(1)
    correct = pred == y
    n = counts[y]
    groups = {"all": n >= 0, "many": n > 100, "medium": (n >= 20) & (n <= 100), "few": n < 20}
    return {g: 100.0 * correct[m].float().mean().item() for g, m in groups.items()}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--classes", type=int, default=60)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    x, y, xt, yt, counts = long_tailed_data(args.classes, args.seed)
    print(f"data: {len(y)} training rows over {args.classes} classes (counts {counts.max()}..{counts.min()}), "
          f"{len(yt)} test rows")
    heads = {
        "MarginHead (ArcFace)": ft.MarginHead(args.classes, 16, s=16.0, m2=0.3),
        "LeapHead (ArcFace + LEAP)": ft.LeapHead(
            args.classes, 16, s=16.0, m2=0.3, threshold=100, warmup_steps=50, class_counts=counts.tolist()
        ),
    }
    print(f"{'head':<28} {'loss first->last':>18} {'all':>7} {'many':>7} {'medium':>7} {'few':>7}")
    ok = True
    for name, head in heads.items():
        torch.manual_seed(args.seed)
        torch.nn.init.normal_(head.weight, std=0.01)
        net, losses = train(head, x, y, args.epochs, args.seed)
        head.eval()
        acc = accuracy(net, head, xt, yt, counts)
        print(f"{name:<28} {losses[0]:8.3f} -> {losses[-1]:7.3f} "
              + " ".join(f"{acc[g]:6.2f}%" for g in ("all", "many", "medium", "few")))
        ok &= losses[-1] < 0.8 * losses[0]
    if not ok:
        sys.exit("a model's training loss did not decrease")


if __name__ == "__main__":
    main()
