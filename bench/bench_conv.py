"""Benchmark of the DyLoRA conv op on an SD-UNet-like convolution, against the frozen conv alone, naive slicing
(reference.dylora_conv) and LyCORIS's DyLoraModule (lycoris-lora 4.1.3, block_size = 1).

    python bench/bench_conv.py [--batch 4] [--size 64] [--channels 320] [--r-max 32] [--rank 16] [--rounds 5]
                               [--channels-last] [--device cpu|cuda] [--dtype float32|bfloat16|float16]

CPU: every method runs once per round, interleaved (same data, same rank), after one warm-up round; medians of
the rounds. CUDA: triton.testing.do_bench medians. Frozen base weight and bias, x requiring grad (a layer inside a
network);
"forward" is a no-grad forward, "fwd+bwd" a forward and backward with dx, dA, dB (LyCORIS: its own
block_size = 1 training forward, i.e. frozen-prefix at rank b).
"""
import argparse
import platform
import random

import torch
import torch.nn.functional as F
from torch import nn

import dylora_kernels as dk
from baselines import medians
from dylora_kernels import reference


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--size", type=int, default=64, help="latent height = width")
    p.add_argument("--channels", type=int, default=320)
    p.add_argument("--r-max", type=int, default=32)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--channels-last", action="store_true", help="x (and so y) in channels-last memory")
    p.add_argument("--device", default="cpu", help="cpu (interleaved wall-clock rounds) or cuda (do_bench)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    args = p.parse_args()
    C, b, r_max, alpha = args.channels, args.rank, args.r_max, 16.0
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    torch.manual_seed(0)
    conv = nn.Conv2d(C, C, 3, padding=1).requires_grad_(False).to(device, dtype)
    A = (torch.randn(r_max, C, 3, 3) / (9 * C) ** 0.5).to(device, dtype).requires_grad_()
    B = (torch.randn(C, r_max) / r_max ** 0.5).to(device, dtype).requires_grad_()
    x = torch.randn(args.batch, C, args.size, args.size).to(device, dtype)
    x = x.contiguous(memory_format=torch.channels_last if args.channels_last else torch.contiguous_format)
    x.requires_grad_()
    g = torch.randn(args.batch, C, args.size, args.size).to(device, dtype)
    geo = dict(stride=conv.stride, padding=conv.padding, dilation=conv.dilation)

    lycoris = None
    try:
        from lycoris.modules.dylora import DyLoraModule
        lycoris = DyLoraModule("bench", conv, multiplier=1.0, lora_dim=r_max, alpha=alpha, block_size=1).to(device,
                                                                                                         dtype)
        with torch.no_grad():
            for i, (d, u) in enumerate(zip(lycoris.down_list, lycoris.up_list)):
                d.copy_(A[i].reshape(1, -1))
                u.copy_(B[:, i:i + 1])
        random.randint = lambda lo, hi: b - 1  # LyCORIS draws block b-1 (rank b) every call, as the others use
    except ImportError:
        print("lycoris-lora not installed: its column is skipped")

    def ours(frozen):
        return lambda: dk.dylora_conv2d(x, conv.weight, conv.bias, A, B, b, alpha, frozen_prefix=frozen, **geo)

    def naive(frozen):
        return lambda: reference.dylora_conv(x, conv.weight, conv.bias, A, B, b, alpha, conv.stride, conv.padding,
                                             conv.dilation, frozen)

    methods = {"F.conv2d alone": lambda: F.conv2d(x, conv.weight, conv.bias, **geo),
               "naive full": naive(False), "naive frozen": naive(True),
               "dylora full": ours(False), "dylora frozen": ours(True)}
    if lycoris is not None:
        methods["LyCORIS (frozen)"] = lambda: lycoris(x)
    # the outputs agree (a sanity check, not a test)
    with torch.no_grad():
        y = methods["dylora full"]()
        for name in ("naive full", "LyCORIS (frozen)"):
            if name in methods:
                err = float((methods[name]() - y).norm() / y.norm())
                assert err < (1e-4 if dtype == torch.float32 else 2e-2), (name, err)

    leaves = [x, A, B] + (list(lycoris.parameters()) if lycoris is not None else [])
    med = medians(methods, leaves, g, args.rounds)
    where = (torch.cuda.get_device_name(device) if device.type == "cuda"
             else f"CPU: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads")
    how = "do_bench medians" if device.type == "cuda" else f"medians of {args.rounds} interleaved rounds"
    layout = " channels-last" if args.channels_last else ""
    print(f"\n{where}, torch {torch.__version__}; conv {C}→{C} 3×3 pad 1, x ({args.batch}, {C}, {args.size}, "
          f"{args.size}) {args.dtype}{layout}, r_max = {r_max}, b = {b}; {how}\n")
    print("| method | forward ms | × F.conv2d | fwd+bwd ms | × F.conv2d |")
    print("|---|---|---|---|---|")
    for name in methods:
        f, fb = med[(name, "forward")], med[(name, "fwd+bwd")]
        print(f"| {name} | {f * 1e3:.1f} | {f / med[('F.conv2d alone', 'forward')]:.3f} | {fb * 1e3:.1f} | "
              f"{fb / med[('F.conv2d alone', 'fwd+bwd')]:.3f} |")


if __name__ == "__main__":
    main()
