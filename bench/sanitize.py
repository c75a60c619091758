"""A small forward + backward through every plan kind, for compute-sanitizer (bench/gpu_check.sh runs it under
``compute-sanitizer --tool memcheck``): the cuBLAS composition with a host rank (slices) and a device rank (the lean
composition's prep kernel), each Triton variant, and "auto"; shared and per-row ranks, both modes, bias, and with
adapter dropout (a 0-d device rank, a fixed seed); then the results against float64 (a sanitizer run must also
compute the right thing).

    compute-sanitizer --tool memcheck --error-exitcode 1 python bench/sanitize.py [--backends triton,...]
"""
from __future__ import annotations

import argparse
import sys

import torch

import dylora_kernels
from dylora_kernels import reference

BACKENDS = ("cublas", "triton", "triton-tma", "triton-decode", "auto")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", default=",".join(BACKENDS))
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    failures = 0
    for backend in args.backends.split(","):
        M = 16 if backend == "triton-decode" else 96
        K, N, r_max = 136, 72, 12  # not multiples of the block sizes: masked edges
        x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16) / K**0.5
        bias = torch.randn(N, device="cuda", dtype=torch.bfloat16)
        A = (torch.randn(r_max, K, device="cuda") / K**0.5).bfloat16()
        B = torch.randn(N, r_max, device="cuda", dtype=torch.bfloat16)
        device_rank = torch.tensor(7, device="cuda")
        cases = [(rank, 0.0) for rank in (5, device_rank, torch.randint(1, r_max + 1, (M,), device="cuda"))]
        for rank, p in cases + [(device_rank, 0.25)]:
            for frozen in (False, True):
                leaves = [t.clone().requires_grad_() for t in (x, A, B)]
                try:
                    y = dylora_kernels.dylora_linear(leaves[0], w, bias, leaves[1], leaves[2], rank, 2.0,
                                                     frozen_prefix=frozen, backend=backend, dropout_p=p,
                                                     dropout_seed=torch.tensor(3, device="cuda") if p else None)
                except ValueError as error:  # a variant that does not apply here (e.g. TMA below sm_90)
                    print(f"{backend}: skipped ({error})")
                    break
                if backend != "triton-decode":  # the decode variant is a forward; its backward is the pointer one
                    y.float().square().sum().backward()
                ref = reference.dylora_linear(x.double().cpu(), w.double().cpu(), bias.double().cpu(),
                                              A.double().cpu(), B.double().cpu(),
                                              rank.cpu() if isinstance(rank, torch.Tensor) else rank, 2.0,
                                              dropout_p=p, dropout_seed=3)
                err = float((y.detach().double().cpu() - ref).norm() / ref.norm())
                kind = "int" if isinstance(rank, int) else ("0-d" if rank.dim() == 0 else "per-row")
                kind += f" p={p}" if p else ""
                ok = err <= 1e-2 and all(leaf.grad is None or torch.isfinite(leaf.grad).all() for leaf in leaves)
                failures += not ok
                print(f"{backend:14s} rank {kind:14s} {'frozen' if frozen else 'full':6s} y rel err {err:.1e} "
                      f"{'ok' if ok else 'FAILED'}")
    torch.cuda.synchronize()
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
