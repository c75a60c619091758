"""The DyLoRA demo on scikit-learn's bundled digits (8x8 images; nothing is downloaded).

1. Pretrain a small MLP to read upright digits (10 classes), then freeze it.
2. Task 2: the same digits rotated by 90 degrees. The frozen network reads them poorly, and the only
   thing trained is a LoRA-style adapter on its input layer, so the adapter's rank is the capacity
   to re-map the pixel space: low ranks cannot undo the rotation, high ranks can.
3. Adapt three ways, all with DyLoRALinear (one code path; standard LoRA = a fixed rank, full mode):
   DyLoRA: ONE run with r_max = 8, a rank drawn per step (RankSampler), every rank evaluated in one
   forward (evaluate_ranks); LoRA trained separately at each rank 1..8; and the rank-8 LoRA
   truncated to each rank (its first b rows/columns, scale alpha/b as every DyLoRA layer).
Prints a table of test accuracy per rank and the wall times, and saves a plot.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .models import RankSampler, evaluate_ranks, freeze_untrained_slots, inject, set_rank

TARGETS = ["0"]  # the input layer of the MLP below


def load_tasks(seed: int, device: torch.device) -> dict:
    """Standardised digits split 60/40 (stratified); task "upright" and task "rotated" (90 degrees)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x, y = torch.tensor(digits.data, dtype=torch.float32), torch.tensor(digits.target)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.4, random_state=seed, stratify=y)
    mean, std = x_train.mean(0), x_train.std(0) + 1.0  # + 1: constant border pixels stay finite
    rotate = lambda x: x.view(-1, 8, 8).rot90(1, (1, 2)).reshape(-1, 64)  # noqa: E731
    to = lambda x: ((x - mean) / std).to(device)  # noqa: E731
    return {"upright": ((to(x_train), y_train.to(device)), (to(x_test), y_test.to(device))),
            "rotated": ((to(rotate(x_train)), y_train.to(device)), (to(rotate(x_test)), y_test.to(device)))}


def train(model: nn.Module, data, epochs: int, lr: float, seed: int, bar, sampler=None) -> float:
    """AdamW, minibatches of 64, a new rank per step if ``sampler``; returns the wall time (s)."""
    x, y = data
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    if sampler is not None:
        freeze_untrained_slots(optimizer, model)  # slots the drawn rank does not train stay put
    order = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    for _ in range(epochs):
        for batch in torch.randperm(len(x), generator=order).split(64):
            if sampler is not None:
                sampler.step()
            loss = F.cross_entropy(model(x[batch]), y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        bar.update(1)
    if x.is_cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start


def accuracy(logits: torch.Tensor, y: torch.Tensor) -> float:
    return (logits.argmax(-1) == y).float().mean().item()


def adapter(base: nn.Module, r_max: int, alpha: float, frozen_prefix: bool, seed: int) -> nn.Module:
    torch.manual_seed(seed)  # the same lora_A initialisation for every run
    model = copy.deepcopy(base)
    inject(model, TARGETS, r_max=r_max, alpha=alpha, frozen_prefix=frozen_prefix)
    return model


@contextlib.contextmanager
def one_cpu_thread(device: torch.device):
    """On CPU, compute with one thread: 64-wide layers gain nothing from more, and share the CPU well."""
    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def run(epochs: int = 100, pretrain_epochs: int = 30, r_max: int = 8, alpha: float = 8.0,
        lr: float = 1e-2, mode: str = "full", seed: int = 0, out: str | Path = "demo_out",
        device: str = "auto", progress: bool = True) -> dict:
    """Run the demo; returns the results it prints and saves under ``out``."""
    from tqdm.auto import tqdm

    device = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                          "cpu" if device == "auto" else device)
    with one_cpu_thread(device):
        results = _adapt_three_ways(epochs, pretrain_epochs, r_max, alpha, lr, mode, seed, device,
                                    tqdm(total=pretrain_epochs + (r_max + 1) * epochs, unit="epoch",
                                         disable=not progress))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    plot(results, out / "accuracy_vs_rank.png")
    print(table(results))
    print(f"plot: {out / 'accuracy_vs_rank.png'}   numbers: {out / 'results.json'}")
    return results


def _adapt_three_ways(epochs, pretrain_epochs, r_max, alpha, lr, mode, seed, device, bar) -> dict:
    tasks = load_tasks(seed, device)
    (pre_train, pre_test), (train_set, test_set) = tasks["upright"], tasks["rotated"]
    ranks = list(range(1, r_max + 1))

    torch.manual_seed(seed)
    base = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10)).to(device)
    bar.set_description("pretrain (upright)")
    train(base, pre_train, pretrain_epochs, 3e-3, seed, bar)
    base.eval()
    with torch.no_grad():
        before = {"upright": accuracy(base(pre_test[0]), pre_test[1]),
                  "rotated": accuracy(base(test_set[0]), test_set[1])}

    bar.set_description(f"DyLoRA r_max={r_max}")
    dylora = adapter(base, r_max, alpha, mode == "frozen", seed + 1)
    sampler = RankSampler(dylora, generator=seed)
    dylora_time = train(dylora, train_set, epochs, lr, seed, bar, sampler)
    with torch.no_grad():
        dylora_acc = {b: accuracy(o, test_set[1]) for b, o in evaluate_ranks(dylora, test_set[0], ranks).items()}

    lora_acc, lora_times = {}, {}
    for b in ranks:
        bar.set_description(f"LoRA r={b}")
        lora = adapter(base, r_max, alpha, False, seed + 1)
        set_rank(lora, b)
        lora_times[b] = train(lora, train_set, epochs, lr, seed, bar)
        with torch.no_grad():
            lora_acc[b] = accuracy(lora(test_set[0]), test_set[1])
    # the last one trained at rank r_max, now run at every lower rank
    truncated_acc = {b: accuracy(o, test_set[1]) for b, o in evaluate_ranks(lora, test_set[0], ranks).items()}
    bar.close()
    return {"device": str(device), "seed": seed, "epochs": epochs, "mode": mode, "r_max": r_max,
            "frozen_base": before, "dylora": dylora_acc, "lora": lora_acc, "lora_truncated": truncated_acc,
            "dylora_seconds": dylora_time, "lora_seconds": sum(lora_times.values())}


def table(r: dict) -> str:
    lines = [f"Digits rotated 90 deg, adapter on the input layer of a frozen MLP (device {r['device']}, "
             f"seed {r['seed']}, {r['epochs']} epochs per run, DyLoRA mode {r['mode']})",
             f"frozen base: {r['frozen_base']['upright']:.1%} on upright digits, "
             f"{r['frozen_base']['rotated']:.1%} on rotated digits",
             "",
             "rank | DyLoRA (1 run) | LoRA (1 run per rank) | LoRA r_max truncated",
             "-----+----------------+-----------------------+---------------------"]
    for b in r["lora"]:
        lines.append(f"{b:>4} | {r['dylora'][b]:>14.1%} | {r['lora'][b]:>21.1%} | {r['lora_truncated'][b]:>20.1%}")
    n = len(r["lora"])
    lines += ["", f"training wall time: DyLoRA {r['dylora_seconds']:.1f} s for all {n} ranks (one run); "
                  f"LoRA {r['lora_seconds']:.1f} s for {n} runs "
                  f"({r['lora_seconds'] / r['dylora_seconds']:.1f}x)"]
    return "\n".join(lines)


def plot(r: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ranks = list(r["lora"])
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    for key, label, style in (("dylora", "DyLoRA (one run, every rank)", "o-"),
                              ("lora", "LoRA trained at each rank", "s--"),
                              ("lora_truncated", f"LoRA r={ranks[-1]} truncated", "^:")):
        ax.plot(ranks, [100 * r[key][b] for b in ranks], style, label=label, linewidth=2, markersize=6)
    ax.axhline(100 * r["frozen_base"]["rotated"], color="grey", linewidth=1, linestyle="-.",
               label="frozen base, no adapter")
    ax.set(xlabel="adapter rank b", ylabel="test accuracy on rotated digits (%)", xticks=ranks,
           ylim=(0, 100), title="Adapting a frozen MLP to rotated digits")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--epochs", type=int, default=100, help="training epochs of each adapter run")
    parser.add_argument("--pretrain-epochs", type=int, default=30)
    parser.add_argument("--mode", choices=["full", "frozen"], default="full",
                        help="DyLoRA training mode: train all slots < b, or slot b only (frozen prefix)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="demo_out", help="directory for the plot and results.json")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda")
    parser.add_argument("--no-progress", dest="progress", action="store_false")
