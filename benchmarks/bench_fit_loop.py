"""Lightning fit loop vs a plain PyTorch loop: same net, data, epochs, batch size, threads.

Both sides train and validate every epoch on synthetic Texas-shaped data (binary features,
Nasr FC net); the ratio is Lightning time / plain time, measured in one run.

    python benchmarks/bench_fit_loop.py [--samples 6000] [--epochs 3] [--features 6169]
"""

from __future__ import annotations

import argparse
import tempfile
import time

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from nvmpriv.methods import StandardTraining
from nvmpriv.nets import NasrFC


def loaders(n: int, d: int, c: int, batch: int) -> tuple[DataLoader, DataLoader]:
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 2, (n, d), generator=gen).float()
    y = torch.randint(0, c, (n,), generator=gen)
    split = int(0.8 * n)
    train = DataLoader(TensorDataset(x[:split], y[:split]), batch_size=batch, shuffle=True)
    val = DataLoader(TensorDataset(x[split:], y[split:]), batch_size=512)
    return train, val


def plain(train: DataLoader, val: DataLoader, d: int, c: int, epochs: int) -> float:
    torch.manual_seed(0)
    net = NasrFC(d, c)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    start = time.perf_counter()
    for _ in range(epochs):
        net.train()
        for x, y in train:
            opt.zero_grad()
            loss = F.cross_entropy(net(x), y)
            loss.backward()
            opt.step()
        net.eval()
        with torch.no_grad():
            correct = sum(int((net(x).argmax(1) == y).sum()) for x, y in val)
        _ = correct
    return time.perf_counter() - start


def lightning(
    train: DataLoader, val: DataLoader, d: int, c: int, epochs: int, full: bool, tmp: str
) -> float:
    torch.manual_seed(0)
    module = StandardTraining(NasrFC(d, c), num_classes=c)
    trainer = pl.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        devices=1,
        logger=pl.loggers.TensorBoardLogger(tmp) if full else False,
        enable_checkpointing=full,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=tmp,
    )
    start = time.perf_counter()
    trainer.fit(module, train, val)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--samples", type=int, default=6000)
    parser.add_argument("--features", type=int, default=6169)
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    train, val = loaders(args.samples, args.features, args.classes, args.batch)
    plain(train, val, args.features, args.classes, 1)  # warm-up
    # Interleave the three loops and keep each one's best of `--repeats`, so that load from other
    # processes on a shared machine hits all of them alike.
    t_plain, t_bare, t_full = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.repeats):
            t_plain.append(plain(train, val, args.features, args.classes, args.epochs))
            t_bare.append(
                lightning(train, val, args.features, args.classes, args.epochs, False, tmp)
            )
            t_full.append(
                lightning(train, val, args.features, args.classes, args.epochs, True, tmp)
            )
    base = min(t_plain)
    print(
        f"data {args.samples}x{args.features}, NasrFC, batch {args.batch}, {args.epochs} epochs, "
        f"{args.threads} threads"
    )
    print(f"{'loop (best of ' + str(args.repeats) + ')':42s} {'seconds':>8s} {'ratio':>6s}")
    for label, times in (
        ("plain PyTorch", t_plain),
        ("Lightning (no logger/checkpoint)", t_bare),
        ("Lightning (TensorBoard + checkpoint)", t_full),
    ):
        print(f"{label:42s} {min(times):8.2f} {min(times) / base:6.2f}")


if __name__ == "__main__":
    main()
