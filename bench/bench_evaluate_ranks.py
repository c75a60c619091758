"""evaluate_ranks (every rank in ONE batched forward) against the loop set_rank + forward per rank.

    python bench/bench_evaluate_ranks.py            # CPU (or CUDA when present), medians of 20 runs
Models: a tiny BERT (transformers, random weights, nothing downloaded) with adapters on query/value,
and the demo's MLP; ranks 1..8; random lora_B (a zero B would make every rank the same).
"""
import statistics
import time

import torch
from torch import nn

from dylora_kernels import evaluate_ranks, inject, set_rank


def median_ms(fn, repeats=20, warmup=3):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def cases(device):
    import transformers

    config = transformers.BertConfig(hidden_size=128, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=256, vocab_size=1000)
    for batch in (4, 32):
        bert = transformers.BertModel(config).eval().to(device)
        inject(bert, ["query", "value"], r_max=8, alpha=16)
        inputs = {"input_ids": torch.randint(0, 1000, (batch, 64), device=device)}
        yield f"BERT h128 L2, batch {batch} x seq 64", bert, inputs
    mlp = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    inject(mlp.to(device), ["0"], r_max=8, alpha=8)
    yield "demo MLP, 719 samples", mlp, torch.randn(719, 64, device=device)


def main():
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    ranks = range(1, 9)
    print(f"device {device}, torch threads {torch.get_num_threads()}, ranks 1..8")
    print(f"{'model':<34} | {'loop (ms)':>9} | {'evaluate_ranks (ms)':>19} | speed-up")
    for name, model, inputs in cases(device):
        for m in model.modules():
            if hasattr(m, "lora_B"):
                nn.init.normal_(m.lora_B, std=0.1)

        def loop():
            with torch.no_grad():
                for b in ranks:
                    set_rank(model, b)
                    model(**inputs) if isinstance(inputs, dict) else model(inputs)

        t_loop = median_ms(loop)
        t_one = median_ms(lambda: evaluate_ranks(model, inputs, ranks))
        print(f"{name:<34} | {t_loop:>9.2f} | {t_one:>19.2f} | {t_loop / t_one:.2f}x")


if __name__ == "__main__":
    main()
