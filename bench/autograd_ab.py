"""A/B: the same C++ forward/backward kernels under three autograd mechanisms (one thread, tiny shapes).

    python bench/autograd_ab.py

Times forward + backward (grads of x, A, B; frozen-prefix mode) at M = 1, K = N = 64, r_max = 8, b = 4, where
the arithmetic costs nearly nothing, through (1) the C++ autograd kernel of ``torch.ops.dylora.linear``,
(2) a Python ``torch.autograd.Function`` and (3) ``torch.library.register_autograd`` on a Python-defined op,
the last two wrapping the same ``torch.ops.dylora.forward`` / ``backward`` kernels. Prints the median µs.
"""
import statistics
import timeit

import torch

import dylora_kernels  # noqa: F401  (registers the dylora ops)

ALPHA, CALLS, REPEATS = 2.0, 3000, 9
torch.set_num_threads(1)
g = torch.Generator().manual_seed(0)
x = torch.randn(1, 64, generator=g, requires_grad=True)
W, bias = torch.randn(64, 64, generator=g), torch.randn(64, generator=g)
A = torch.randn(8, 64, generator=g, requires_grad=True)
B = torch.randn(64, 8, generator=g, requires_grad=True)
rank, grad = torch.tensor(4), torch.randn(1, 64, generator=g)


class PythonFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, W, bias, A, B, rank, alpha):
        y, u = torch.ops.dylora.forward(x, W, bias, None, A, B, rank, alpha, True, "cpp")
        ctx.save_for_backward(x, W, A, B, u, rank.clone())
        ctx.alpha = alpha
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, W, A, B, u, rank = ctx.saved_tensors
        dx, dA, dB = torch.ops.dylora.backward(grad_y, x, W, A, B, u, rank, ctx.alpha, True, True, True, "cpp")
        return dx, None, None, dA, dB, None, None


LIB = torch.library.Library("dylora_ab", "DEF")
LIB.define("fwd(Tensor x, Tensor W, Tensor? bias, Tensor A, Tensor B, Tensor rank, float alpha) -> (Tensor, Tensor)")
LIB.impl("fwd", lambda x, W, bias, A, B, rank, alpha:
         torch.ops.dylora.forward(x, W, bias, None, A, B, rank, alpha, True, "cpp"), "CPU")
torch.library.register_fake("dylora_ab::fwd")(
    lambda x, W, bias, A, B, rank, alpha: (x.new_empty(x.shape[0], W.shape[0]), x.new_empty(x.shape[0], A.shape[0])))


def _setup_context(ctx, inputs, output):
    x, W, bias, A, B, rank, alpha = inputs
    ctx.save_for_backward(x, W, A, B, output[1], rank.clone())
    ctx.alpha = alpha


def _backward(ctx, grad_y, _grad_u):
    x, W, A, B, u, rank = ctx.saved_tensors
    dx, dA, dB = torch.ops.dylora.backward(grad_y, x, W, A, B, u, rank, ctx.alpha, True, True, True, "cpp")
    return dx, None, None, dA, dB, None, None


torch.library.register_autograd("dylora_ab::fwd", _backward, setup_context=_setup_context)

CANDIDATES = {
    "C++ autograd kernel (dylora::linear)":
        lambda: torch.ops.dylora.linear.default(x, W, bias, None, A, B, rank, ALPHA, True, "cpp"),
    "torch.autograd.Function over the ops": lambda: PythonFunction.apply(x, W, bias, A, B, rank, ALPHA),
    "torch.library.register_autograd": lambda: torch.ops.dylora_ab.fwd(x, W, bias, A, B, rank, ALPHA)[0],
}

if __name__ == "__main__":
    for name, forward in CANDIDATES.items():
        step = lambda forward=forward: torch.autograd.grad(forward(), [x, A, B], grad)
        step()
        times = timeit.repeat(step, number=CALLS, repeat=REPEATS)
        print(f"{name:40s} {statistics.median(times) / CALLS * 1e6:7.2f} µs per forward + backward")
