"""Adapter dropout, fused against dropout + op: one DyLoRA linear layer with PEFT's lora_dropout.

    python bench/bench_dropout.py [--device cpu|cuda] [--dtype float32|bfloat16] [--p 0.1] [--rounds 7]
                                  [--shapes 1024x768x768,2048x2048x2048] [--r-max 8] [--rank 4]

Methods (same data, same rank, frozen base weight and bias, x requiring grad as inside a network):
    F.linear alone        the frozen GEMM (the floor)
    dylora                dylora_linear without dropout
    dylora + dropout      dylora_linear(..., dropout_p=p): the mask generated inside the kernels, regenerated in the
                          backward (never stored)
    dropout + op          what a wrapper does without the fused dropout: dylora_delta(F.dropout(x, p), ...,
                          base=F.linear(x, W, bias)) — one more pass over x, a stored mask
    naive + dropout       PEFT's own math at rank b: F.linear(x) + s·(F.dropout(x)·A[:b]ᵀ)·B[:, :b]ᵀ (naive slicing)
"forward" is a no-grad forward, "fwd+bwd" forward + backward with dx, dA, dB (frozen-prefix mode). CPU: every
method once per round, interleaved, after a warm-up round, medians (wall clock). CUDA: triton.testing.do_bench
medians. Ratios are over F.linear in the same run.
"""
import argparse
import platform

import torch
import torch.nn.functional as F

import dylora_kernels as dk
from baselines import medians


def methods(x, W, bias, A, B, b, alpha, p):
    s = alpha / b
    return {
        "F.linear alone": lambda: F.linear(x, W, bias),
        "dylora": lambda: dk.dylora_linear(x, W, bias, A, B, b, alpha, frozen_prefix=True),
        "dylora + dropout": lambda: dk.dylora_linear(x, W, bias, A, B, b, alpha, frozen_prefix=True, dropout_p=p),
        "dropout + op": lambda: dk.dylora_delta(F.dropout(x, p), A, B, b, alpha, frozen_prefix=True,
                                                base=F.linear(x, W, bias)),
        "naive + dropout": lambda: F.linear(x, W, bias) + s * (F.dropout(x, p) @ A[:b].t()) @ B[:, :b].t(),
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--p", type=float, default=0.1)
    ap.add_argument("--shapes", default="1024x768x768,2048x2048x2048", help="MxKxN,...")
    ap.add_argument("--r-max", type=int, default=8)
    ap.add_argument("--rank", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    where = (torch.cuda.get_device_name(device) if device.type == "cuda"
             else f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads")
    print(f"\n{where}, torch {torch.__version__}, {args.dtype}, p = {args.p}, r_max = {args.r_max}, b = {args.rank}, "
          f"frozen prefix; {'medians of ' + str(args.rounds) + ' interleaved rounds' if device.type == 'cpu' else 'do_bench medians'}\n")
    print("| M×K×N | method | forward ms | × F.linear | fwd+bwd ms | × F.linear |")
    print("|---|---|---|---|---|---|")
    for shape in args.shapes.split(","):
        M, K, N = (int(v) for v in shape.split("x"))
        torch.manual_seed(0)
        W = (torch.randn(N, K) / K ** 0.5).to(device, dtype)
        bias = torch.randn(N).to(device, dtype)
        A = (torch.randn(args.r_max, K) / K ** 0.5).to(device, dtype).requires_grad_()
        B = torch.randn(N, args.r_max).to(device, dtype).requires_grad_()
        x = torch.randn(M, K).to(device, dtype).requires_grad_()
        g = torch.randn(M, N).to(device, dtype)
        fns = methods(x, W, bias, A, B, args.rank, 16.0, args.p)
        med = {k: v * 1e3 for k, v in medians(fns, [x, A, B], g, args.rounds).items()}
        for name in fns:
            f, fb = med[(name, "forward")], med[(name, "fwd+bwd")]
            print(f"| {shape} | {name} | {f:.3f} | {f / med[('F.linear alone', 'forward')]:.3f} | {fb:.3f} | "
                  f"{fb / med[('F.linear alone', 'fwd+bwd')]:.3f} |")


if __name__ == "__main__":
    main()
