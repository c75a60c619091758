"""The C++ CUDA executor (csrc/plan.cpp) on CPU tensors: its key, its plan cache, the planner it calls on a miss,
and the plan kinds it runs ("cublas": the ATen composition in C++; "python": a callable; backward pairs). The GPU
build registers the same code for CUDA tensors; the CPU build runs it here through _C.executor_forward/backward,
with a planner the test supplies (or the real one, backends.plan, on the Triton interpreter)."""
import pytest
import torch

from dylora_kernels import backends, ops
from conftest import CUDA, HAS_TRITON, make_inputs, rel_err

_C = ops._C
pytestmark = pytest.mark.skipif(_C is None, reason="needs the C++ extension")


class FakePlanner:
    """Answers every miss with ``parts`` (and ``final``); counts the calls and keeps their arguments."""

    def __init__(self, parts, final=True):
        self.parts, self.final, self.calls = parts, final, []

    def __call__(self, op, backend, args):
        self.calls.append((op, backend, args))
        return self.parts, self.final


@pytest.fixture
def planner():
    """Install a fake planner (``install(parts, final)``) on an empty plan cache; restore the real one after."""
    def install(parts, final=True):
        fake = FakePlanner(parts, final)
        _C.set_python_side(fake, backends.forward, backends.backward)
        return fake

    _C.executor_clear()
    yield install
    _C.executor_clear()
    _C.set_python_side(backends.plan, backends.forward, backends.backward)


def inputs(M=12, K=10, N=14, r_max=6, dtype=torch.float64, seed=0):
    t = make_inputs((M, K), N, r_max, True, "contiguous", dtype, "cpu", seed)
    return t["x"], t["weight"], t["bias"], t["lora_A"], t["lora_B"]


def forward(x, w, bias, A, B, rank, alpha=2.0, need_u=True, backend="auto", dropout_p=0.0, dropout_seed=None):
    return _C.executor_forward(x, w, bias, None, A, B, rank, alpha, need_u, backend, dropout_p, dropout_seed)


def reference_forward(x, w, bias, A, B, b, alpha=2.0):
    return x @ w.T + bias + alpha / b * (x @ A[:b].T) @ B[:, :b].T


def test_cublas_plan_runs_the_aten_composition_and_is_kept_per_key(planner):
    fake = planner([("cublas", None, None)])
    x, w, bias, A, B = inputs()
    rank = torch.tensor(3)
    y, u = forward(x, w, bias, A, B, rank)
    assert rel_err(y, reference_forward(x, w, bias, A, B, 3)) < 1e-12
    assert rel_err(u[:, :3], x @ A[:3].T) < 1e-12 and not u[:, 3:].any()
    assert len(fake.calls) == 1 and fake.calls[0][:2] == ("forward", "auto")
    assert fake.calls[0][2][0] is not None and torch.equal(fake.calls[0][2][0], x)  # the call's own arguments
    forward(x, w, bias, A, B, torch.tensor(5))  # a new rank: the same key
    forward(*inputs(M=9, seed=1), rank)         # M = 9 is in M = 12's bucket (16)
    assert len(fake.calls) == 1 and _C.executor_stats() == (1, 1)


@pytest.mark.parametrize("change", ["M bucket", "N", "dtype", "bias", "rank form", "backend", "need_u only",
                                    "fp32 precision", "deterministic"])
def test_key_holds_what_changes_the_choice(planner, change):
    """Each field that may change the fastest kernel makes a new key; need_u does not (the same kernels)."""
    fake = planner([("cublas", None, None)])
    x, w, bias, A, B = inputs()
    args = dict(x=x, w=w, bias=bias, A=A, B=B, rank=torch.tensor(2), backend="auto", need_u=True)
    forward(**args)
    precision = torch.get_float32_matmul_precision()
    deterministic = torch.are_deterministic_algorithms_enabled()
    try:
        if change == "M bucket":
            args.update(x=inputs(M=17)[0])
        elif change == "N":
            _, args["w"], args["bias"], _, args["B"] = inputs(N=15)
        elif change == "dtype":
            args.update({k: args[k].float() for k in ("x", "w", "bias")})
        elif change == "bias":
            args["bias"] = None
        elif change == "rank form":
            args["rank"] = torch.tensor([1, 2, 3] * 4)
        elif change == "backend":
            args["backend"] = "cublas"
        elif change == "need_u only":
            args["need_u"] = False
        elif change == "fp32 precision":
            torch.set_float32_matmul_precision("medium" if precision == "highest" else "highest")
        elif change == "deterministic":
            torch.use_deterministic_algorithms(not deterministic)
        forward(**args)
    finally:
        torch.set_float32_matmul_precision(precision)
        torch.use_deterministic_algorithms(deterministic)
    assert len(fake.calls) == (1 if change == "need_u only" else 2)


def test_provisional_choice_is_used_once_not_kept(planner):
    """A choice made without measuring (during a capture) is not kept: the next call asks again."""
    fake = planner([("cublas", None, None)], final=False)
    args = (*inputs(), torch.tensor(2))
    forward(*args)
    forward(*args)
    assert len(fake.calls) == 2 and _C.executor_stats()[0] == 0


def test_python_part_gets_the_call_and_its_result_comes_back(planner):
    seen = []
    y0, u0 = torch.randn(12, 14, dtype=torch.float64), torch.randn(12, 6)

    def kernel(*args):
        seen.append(args)
        return y0, u0

    planner([("triton", None, kernel)])  # no description: the C++ side calls the kernel
    x, w, bias, A, B = inputs()
    y, u = forward(x, w, bias, A, B, torch.tensor(4), alpha=0.5, need_u=False)
    assert y is not None and torch.equal(y, y0) and torch.equal(u, u0)
    (args,) = seen
    assert len(args) == 11 and args[0] is not None and torch.equal(args[0], x) and args[3] is None
    assert int(args[6]) == 4 and args[7] == 0.5 and args[8] is False and args[9] == 0.0 and args[10] is None


def test_dropout_is_part_of_the_key_and_reaches_the_kernel(planner):
    """A call with adapter dropout has its own plan (a kernel chosen without dropout may not take it) and its p and
    seed reach the part."""
    seen = []

    def kernel(*args):
        seen.append(args)
        return torch.zeros(12, 14, dtype=torch.float64), torch.zeros(12, 6)

    fake = planner([("triton", None, kernel)])
    x, w, bias, A, B = inputs()
    seed = torch.tensor(9)
    forward(x, w, bias, A, B, torch.tensor(4), alpha=0.5, need_u=False)
    forward(x, w, bias, A, B, torch.tensor(4), alpha=0.5, need_u=False, dropout_p=0.25, dropout_seed=seed)
    forward(x, w, bias, A, B, torch.tensor(4), alpha=0.5, need_u=False, dropout_p=0.5, dropout_seed=seed)
    assert len(fake.calls) == 2  # p = 0 and p > 0; the value of p is data
    assert seen[1][9] == 0.25 and seen[1][10] is seed and seen[2][9] == 0.5


def test_backward_pair_takes_dx_from_the_first_part_and_lora_grads_from_the_second(planner):
    calls = []

    def part(tag):
        def kernel(grad, x, weight, lora_A, lora_B, u, rank, alpha, frozen, compute_dx, compute_lora, dropout_p,
                   dropout_seed):
            calls.append((tag, compute_dx, compute_lora))
            fill = 1.0 if tag == "first" else 2.0
            return (torch.full_like(x, fill) if compute_dx else x.new_empty(0),
                    torch.full_like(lora_A, fill) if compute_lora else lora_A.new_empty(0),
                    torch.full_like(lora_B, fill) if compute_lora else lora_B.new_empty(0))
        return kernel

    planner([("triton", None, part("first")), ("cublas-like", None, part("second"))])
    x, w, bias, A, B = inputs()
    g, u = torch.randn(12, 14, dtype=torch.float64), torch.randn(12, 6, dtype=torch.float64)
    dx, dA, dB = _C.executor_backward(g, x, w, A, B, u, torch.tensor(3), 1.0, True, True, True, "auto")
    assert calls == [("first", True, False), ("second", False, True)]
    assert (dx == 1).all() and (dA == 2).all() and (dB == 2).all()


def test_cublas_backward_matches_reference(planner):
    planner([("cublas", None, None)])
    x, w, bias, A, B = inputs()
    g = torch.randn(12, 14, dtype=torch.float64)
    leaves = [t.clone().requires_grad_() for t in (x, A, B)]
    y = leaves[0] @ w.T + 1.5 / 4 * (leaves[0] @ leaves[1][:4].T) @ leaves[2][:, :4].T
    y.backward(g)
    u = _C.executor_forward(x, w, None, None, A, B, torch.tensor(4), 1.5, True, "auto")[1]
    dx, dA, dB = _C.executor_backward(g, x, w, A, B, u, torch.tensor(4), 1.5, False, True, True, "auto")
    for out, leaf in zip((dx, dA, dB), leaves):
        assert rel_err(out, leaf.grad) < 1e-12


@pytest.mark.parametrize("answer, message", [
    (([], True), "0 parts"),
    (([("cublas",)], True), "is \\(name, triton description, callable\\)"),
])
def test_malformed_planner_answer_is_a_clear_error(planner, answer, message):
    _C.set_python_side(lambda op, backend, args: answer, backends.forward, backends.backward)
    with pytest.raises(RuntimeError, match=message):
        forward(*inputs(), torch.tensor(2))


@pytest.mark.skipif(CUDA or not HAS_TRITON, reason="the real planner on CPU tensors runs Triton's interpreter")
def test_real_planner_on_the_interpreter_matches_the_reference(planner):
    _C.set_python_side(backends.plan, backends.forward, backends.backward)
    x, w, bias, A, B = inputs(dtype=torch.float32)
    y, _ = forward(x, w, bias, A, B, torch.tensor(5), backend="triton")
    assert rel_err(y, reference_forward(*(t.double() for t in (x, w, bias, A, B)), 5)) < 1e-5
    ((name, description, kernel),), final = backends.plan("forward", "triton", (x, w, bias, None, A, B,
                                                                                torch.tensor(5), 2.0, True, 0.0, None))
    assert name == "triton" and final and callable(kernel)


def test_unknown_backend_is_refused(planner):
    planner([("cublas", None, None)])
    with pytest.raises(ValueError, match="unknown backend 'bogus'"):
        forward(*inputs(), torch.tensor(2), backend="bogus")
