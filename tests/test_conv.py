"""The dylora conv ops (csrc/conv.cpp, dylora_kernels/conv.py) against the float64 reference
(reference.dylora_conv), with random adapters, odd shapes, every rank kind, NaN in unused slots."""
import pytest
import torch
from torch import nn

import dylora_kernels as dk
from dylora_kernels import reference
from dylora_kernels.ops import _C
from conftest import rel_err

pytestmark = pytest.mark.skipif(_C is None, reason="the conv ops need the C++ extension")
TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 2e-2}
OPS = {1: dk.dylora_conv1d, 2: dk.dylora_conv2d, 3: dk.dylora_conv3d}

# (x shape, C_out, kernel, stride, padding, dilation, r_max, bias): odd sizes, strides, dilation, 1×1,
# r_max = 1 and not a power of two, Conv1d and Conv3d.
CASES = [
    ((2, 5, 9, 11), 7, (3, 3), (1, 1), (1, 1), (1, 1), 6, True),
    ((3, 4, 10, 7), 6, (3, 2), (2, 1), (0, 1), (2, 1), 5, False),
    ((2, 3, 5, 6), 9, (1, 1), (1, 1), (0, 0), (1, 1), 1, True),
    ((3, 6, 13), 5, (5,), (2,), (2,), (1,), 7, True),
    ((2, 3, 4, 5, 5), 4, (3, 1, 3), (1, 2, 1), (1, 0, 1), (1, 1, 1), 3, False),
]
IDS = ["2d-3x3-pad", "2d-strided-dilated-nobias", "2d-1x1-r1", "1d-k5-s2", "3d"]


def make(case, dtype, seed=0, poison=True):
    """Random x, W, bias, A, B (A/B in float64 then cast) and a float64 copy of each."""
    x_shape, C_out, k, stride, padding, dilation, r_max, has_bias = case
    g = torch.Generator().manual_seed(seed)
    C_in = x_shape[1]
    t = {"x": torch.randn(x_shape, generator=g, dtype=torch.float64),
         "weight": torch.randn(C_out, C_in, *k, generator=g, dtype=torch.float64) / 3,
         "bias": torch.randn(C_out, generator=g, dtype=torch.float64) if has_bias else None,
         "lora_A": torch.randn(r_max, C_in, *k, generator=g, dtype=torch.float64) / 3,
         "lora_B": torch.randn(C_out, r_max, generator=g, dtype=torch.float64)}
    ours = {n: None if v is None else v.to(dtype).requires_grad_(n in ("x", "lora_A", "lora_B")) for n, v in t.items()}
    ref = {n: None if v is None else v.clone().requires_grad_(n in ("x", "lora_A", "lora_B")) for n, v in t.items()}
    return ours, ref, dict(stride=list(stride), padding=list(padding), dilation=list(dilation))


def pick_rank(kind, r_max, n):
    if kind == "1":
        return 1
    if kind == "mid":
        return torch.tensor(max(1, (r_max + 1) // 2))
    if kind == "r_max":
        return r_max
    return torch.tensor([(3 * i + 1) % r_max + 1 for i in range(n)])  # per-sample, mixed


def poison_unused(t: dict, rank) -> None:
    """NaN in the slots of A and B no sample uses (beyond the largest rank): they must never leak."""
    hi = int(rank.max()) if isinstance(rank, torch.Tensor) else int(rank)
    with torch.no_grad():
        t["lora_A"][hi:] = float("nan")
        t["lora_B"][:, hi:] = float("nan")


def run(fn, t, g):
    y = fn()
    leaves = [t[n] for n in ("x", "lora_A", "lora_B")]
    grads = torch.autograd.grad(y, leaves, g.to(y.dtype))
    return (y.detach(), *grads)


def ref_grads(t, rank, alpha, geo, frozen, g):
    y = reference.dylora_conv(t["x"], t["weight"], t["bias"], t["lora_A"], t["lora_B"], rank, alpha,
                              geo["stride"], geo["padding"], geo["dilation"], frozen)
    return (y.detach(), *torch.autograd.grad(y, [t["x"], t["lora_A"], t["lora_B"]], g))


def trained_slots(rank, r_max, frozen):
    b = rank.reshape(-1) if isinstance(rank, torch.Tensor) else torch.tensor([rank])
    slots = torch.arange(r_max)
    hit = (slots[None] == b[:, None] - 1) if frozen else (slots[None] < b[:, None])
    return hit.any(0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", CASES, ids=IDS)
@pytest.mark.parametrize("rank_kind", ["1", "mid", "r_max", "per_sample"])
@pytest.mark.parametrize("frozen", [False, True], ids=["full", "frozen"])
def test_matches_float64_reference(dtype, case, rank_kind, frozen):
    ours, ref, geo = make(case, dtype)
    r_max, dims = case[6], len(case[2])
    rank = pick_rank(rank_kind, r_max, case[0][0])
    poison_unused(ours, rank)
    y_ref = reference.dylora_conv(ref["x"], ref["weight"], ref["bias"], ref["lora_A"], ref["lora_B"], rank, 2.5,
                                  geo["stride"], geo["padding"], geo["dilation"], frozen)
    g = torch.randn(y_ref.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    expected = ref_grads(ref, rank, 2.5, geo, frozen, g)
    got = run(lambda: OPS[dims](ours["x"], ours["weight"], ours["bias"], ours["lora_A"], ours["lora_B"], rank, 2.5,
                                frozen_prefix=frozen, **geo), ours, g)
    for name, out, exp in zip(("y", "dx", "dA", "dB"), got, expected):
        assert out.dtype == dtype and out.shape == exp.shape, name
        keep = torch.isfinite(exp)  # reference's dA/dB are NaN-free too: the poisoned slots get no gradient
        assert keep.all() and torch.isfinite(out).all(), f"{name} has non-finite values"
        assert rel_err(out, exp) <= TOL[dtype], (name, rel_err(out, exp))
    dA, dB = got[2], got[3]
    untouched = ~trained_slots(rank, r_max, frozen)
    assert (dA[untouched] == 0).all() and (dB[:, untouched] == 0).all()
    assert dA[~untouched].abs().sum() > 0 and dB[:, ~untouched].abs().sum() > 0


@pytest.mark.parametrize("case", [CASES[0], CASES[1], CASES[4]], ids=["2d", "2d-strided", "3d"])
@pytest.mark.parametrize("rank_kind", ["1", "per_sample"])
@pytest.mark.parametrize("device_path", [False, True], ids=["host-rank", "device-rank"])
def test_channels_last_input(case, rank_kind, device_path):
    """A channels-last x (as diffusion UNets run): the convolution keeps the layout and the 1×1 expand runs as one
    GEMM over the pixels into y (conv.cpp: channels_last_expand); y (with and without a base) equals the float64
    reference, NaN in unused slots never leaks, and y comes out channels-last wherever ATen's convolution keeps x's
    layout."""
    ours, ref, geo = make(case, torch.float64)
    fmt = torch.channels_last if len(case[0]) == 4 else torch.channels_last_3d
    x = ours["x"].detach().contiguous(memory_format=fmt)
    W, bias, A, B = (ours[n] for n in ("weight", "bias", "lora_A", "lora_B"))
    A, B = A.detach(), B.detach()
    rank = pick_rank(rank_kind, case[6], case[0][0])
    rank = rank if isinstance(rank, torch.Tensor) or not device_path else torch.tensor(rank)
    poison_unused({"lora_A": A, "lora_B": B}, rank)
    args = (geo["stride"], geo["padding"], geo["dilation"])
    y, u = _C.conv_forward(x, W, bias, None, A, B, rank if isinstance(rank, torch.Tensor) else torch.tensor(rank),
                           2.5, *args, True, device_path)
    expected = reference.dylora_conv(ref["x"], ref["weight"], ref["bias"], ref["lora_A"], ref["lora_B"], rank, 2.5,
                                     *args, False)
    conv = (torch.nn.functional.conv2d if len(case[0]) == 4 else torch.nn.functional.conv3d)
    keeps_layout = conv(x, W, None, *args).is_contiguous(memory_format=fmt)  # ATen's choice (3-d fp64 CPU: no)
    assert y.is_contiguous(memory_format=fmt) == keeps_layout and torch.isfinite(y).all()
    assert rel_err(y, expected) <= 1e-12
    base = torch.randn(expected.shape, dtype=torch.float64)  # and with a base output added
    y_base, _ = _C.conv_forward(x, W, bias, base, A, B, rank if isinstance(rank, torch.Tensor) else torch.tensor(rank),
                                2.5, *args, False, device_path)
    assert rel_err(y_base, expected + base) <= 1e-12


@pytest.mark.parametrize("case", [CASES[0], CASES[1], CASES[3]], ids=["2d", "2d-strided", "1d"])
@pytest.mark.parametrize("rank_kind", ["mid", "per_sample"])
@pytest.mark.parametrize("frozen", [False, True], ids=["full", "frozen"])
def test_device_rank_path(case, rank_kind, frozen):
    """The path a rank tensor on the GPU takes (r_max slots, masks and α/b on the device, no host read),
    forced on CPU tensors: the same values as the reference, NaN in slots no sample uses never leaks."""
    ours, ref, geo = make(case, torch.float64)
    r_max = case[6]
    rank = pick_rank(rank_kind, r_max, case[0][0])
    rank = rank if isinstance(rank, torch.Tensor) else torch.tensor(rank)
    poison_unused(ours, rank)
    x, W, bias, A, B = (ours[n] for n in ("x", "weight", "bias", "lora_A", "lora_B"))
    x, A, B = x.detach(), A.detach(), B.detach()
    args = (geo["stride"], geo["padding"], geo["dilation"])
    y, u = _C.conv_forward(x, W, bias, None, A, B, rank, 2.5, *args, True, True)
    expected_y = reference.dylora_conv(ref["x"], ref["weight"], ref["bias"], ref["lora_A"], ref["lora_B"], rank,
                                       2.5, *args, frozen)
    g = torch.randn(expected_y.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    _, dx_ref, dA_ref, dB_ref = ref_grads(ref, rank, 2.5, geo, frozen, g)
    dx, dA, dB = _C.conv_backward(g, x, W, A, B, u, rank, 2.5, *args, frozen, True, True, True)
    for name, out, exp in (("y", y, expected_y), ("dx", dx, dx_ref), ("dA", dA, dA_ref), ("dB", dB, dB_ref)):
        assert torch.isfinite(out).all() and rel_err(out, exp) <= 1e-12, (name, rel_err(out, exp))
    _, dA, dB = _C.conv_backward(g, x, W, A, B, u, rank, 2.5, *args, frozen, False, True, True)  # no dx: v's
    assert rel_err(dA, dA_ref) <= 1e-12 and rel_err(dB, dB_ref) <= 1e-12  # trained channel alone (frozen, 0-d)
    # and it agrees with the host-rank path exactly where the saved u is concerned (zero beyond b_n)
    _, u_host = _C.conv_forward(x, W, bias, None, A, B, rank, 2.5, *args, True, False)
    assert rel_err(u, u_host) <= 1e-12 and u.shape == u_host.shape


def test_device_rank_out_of_range_gives_nan_rows_only():
    """A device rank cannot be checked on the host: a sample whose rank is out of range comes out NaN,
    the others are exact."""
    ours, ref, geo = make(CASES[0], torch.float64)
    x, W, bias, A, B = (ours[n].detach() if ours[n] is not None else None
                        for n in ("x", "weight", "bias", "lora_A", "lora_B"))
    rank = torch.tensor([3, 99])
    y, _ = _C.conv_forward(x, W, bias, None, A, B, rank, 2.0, geo["stride"], geo["padding"], geo["dilation"],
                           False, True)
    assert torch.isnan(y[1]).all()
    expected = reference.dylora_conv(ref["x"][:1], ref["weight"], ref["bias"], ref["lora_A"], ref["lora_B"], 3, 2.0,
                                     geo["stride"], geo["padding"], geo["dilation"])
    assert rel_err(y[:1], expected) <= 1e-12


def test_host_rank_out_of_range_is_a_value_error():
    ours, _, geo = make(CASES[0], torch.float32)
    args = [ours[n] for n in ("x", "weight", "bias", "lora_A", "lora_B")]
    for bad in (0, 7, torch.tensor(7), torch.tensor([1, 0])):
        with pytest.raises(ValueError, match=r"\[1, 6\]"):
            dk.dylora_conv2d(*args, bad, 1.0, **geo)


def test_weight_none_base_and_unfrozen_base():
    """weight=None: the low-rank term (+ bias + base), base's gradient passes through; an unfrozen W and
    bias get the convolution's own gradients."""
    ours, ref, geo = make(CASES[1], torch.float64)
    gen = torch.Generator().manual_seed(5)
    for t in (ours, ref):
        t["weight"].requires_grad_(True)
    y_ref = reference.dylora_conv(ref["x"], ref["weight"], None, ref["lora_A"], ref["lora_B"], 3, 1.5,
                                  geo["stride"], geo["padding"], geo["dilation"])
    base = torch.randn(y_ref.shape, generator=gen, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(y_ref.shape[1], generator=gen, dtype=torch.float64, requires_grad=True)
    g = torch.randn(y_ref.shape, generator=gen, dtype=torch.float64)
    y = dk.dylora_conv2d(ours["x"], None, bias, ours["lora_A"], ours["lora_B"], 3, 1.5, base=base, **geo)
    y_exp = reference.dylora_conv(ref["x"], None, bias, ref["lora_A"], ref["lora_B"], 3, 1.5, geo["stride"],
                                  geo["padding"], geo["dilation"], base=base)
    leaves = (ours["x"], ours["lora_A"], base, bias)
    for out, exp in zip((y, *torch.autograd.grad(y, leaves, g)),
                        (y_exp, *torch.autograd.grad(y_exp, (ref["x"], ref["lora_A"], base, bias), g))):
        assert rel_err(out, exp) <= 1e-12
    y = dk.dylora_conv2d(ours["x"], ours["weight"], bias, ours["lora_A"], ours["lora_B"], 3, 1.5, **geo)
    y_exp = reference.dylora_conv(ref["x"], ref["weight"], bias, ref["lora_A"], ref["lora_B"], 3, 1.5,
                                  geo["stride"], geo["padding"], geo["dilation"])
    dW, db = torch.autograd.grad(y, (ours["weight"], bias), g)
    dW_ref, db_ref = torch.autograd.grad(y_exp, (ref["weight"], bias), g)
    assert rel_err(dW, dW_ref) <= 1e-12 and rel_err(db, db_ref) <= 1e-12


def test_gradcheck_float64():
    """Finite differences agree with the C++ backward in full mode (every input) and, in frozen-prefix
    mode, for x (A and B get DyLoRA's truncated gradient on purpose)."""
    g = torch.Generator().manual_seed(4)
    shapes = [(2, 3, 5, 4), (4, 3, 3, 2), (4,), (3, 3, 3, 2), (4, 3)]
    inputs = [torch.randn(s, generator=g, dtype=torch.float64, requires_grad=True) for s in shapes]
    geo = dict(stride=(2, 1), padding=(1, 0), dilation=(1, 1))
    for rank in (2, torch.tensor([1, 3])):
        f = lambda *t: dk.dylora_conv2d(*t[:3], *t[3:], rank, 2.0, **geo)
        assert torch.autograd.gradcheck(f, inputs)
        frozen = lambda x: dk.dylora_conv2d(x, *inputs[1:], rank, 2.0, frozen_prefix=True, **geo)
        assert torch.autograd.gradcheck(frozen, inputs[:1])


@pytest.mark.parametrize("per_sample", [False, True], ids=["one-rank", "per-sample"])
def test_opcheck(per_sample):
    ours, _, geo = make(CASES[1], torch.float32)
    x, W, bias, A, B = (ours[n] for n in ("x", "weight", "bias", "lora_A", "lora_B"))
    rank = torch.tensor([1, 5, 3]) if per_sample else torch.tensor(4)
    args = (geo["stride"], geo["padding"], geo["dilation"])
    y = torch.ops.dylora.conv(x, W, bias, None, A, B, rank, 2.0, *args, False)
    base = torch.randn(y.shape, requires_grad=True)
    for frozen in (False, True):
        torch.library.opcheck(torch.ops.dylora.conv.default, (x, W, bias, None, A, B, rank, 2.0, *args, frozen))
        torch.library.opcheck(torch.ops.dylora.conv.default, (x, None, None, base, A, B, rank, 2.0, *args, frozen))
    x, A, B = x.detach(), A.detach(), B.detach()
    for need_u in (False, True):
        torch.library.opcheck(torch.ops.dylora.conv_forward.default, (x, W, bias, None, A, B, rank, 2.0, *args, need_u))
    y, u = torch.ops.dylora.conv_forward(x, W, bias, None, A, B, rank, 2.0, *args, True)
    g = torch.randn_like(y)
    for frozen in (False, True):
        for compute_dx, compute_lora in ((False, True), (True, False), (True, True)):
            torch.library.opcheck(torch.ops.dylora.conv_backward.default,
                                  (g, x, W, A, B, u, rank, 2.0, *args, frozen, compute_dx, compute_lora))


@pytest.mark.parametrize("frozen", [False, True], ids=["full", "frozen"])
def test_only_lora_gradients_requested(frozen):
    """x without requires_grad: the backward skips dx; dA and dB are unchanged (the one-slot path of
    frozen-prefix mode computes v only for the trained column)."""
    ours, ref, geo = make(CASES[0], torch.float64)
    ours["x"].requires_grad_(False)
    y = dk.dylora_conv2d(ours["x"], ours["weight"], ours["bias"], ours["lora_A"], ours["lora_B"], 4, 2.0,
                         frozen_prefix=frozen, **geo)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    dA, dB = torch.autograd.grad(y, (ours["lora_A"], ours["lora_B"]), g)
    _, _, dA_ref, dB_ref = ref_grads(ref, 4, 2.0, geo, frozen, g)
    assert rel_err(dA, dA_ref) <= 1e-12 and rel_err(dB, dB_ref) <= 1e-12


def test_autocast_cpu_bfloat16():
    ours, ref, geo = make(CASES[0], torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = dk.dylora_conv2d(ours["x"], ours["weight"], ours["bias"], ours["lora_A"], ours["lora_B"], 3, 2.0, **geo)
    assert y.dtype == torch.bfloat16
    expected = reference.dylora_conv(ref["x"], ref["weight"], ref["bias"], ref["lora_A"], ref["lora_B"], 3, 2.0,
                                     geo["stride"], geo["padding"], geo["dilation"])
    assert rel_err(y, expected) <= 2e-2
    y.float().sum().backward()
    assert ours["lora_A"].grad.dtype == torch.float32 and torch.isfinite(ours["lora_A"].grad).all()


def test_compile_fullgraph_no_recompile_across_ranks():
    """torch.compile(fullgraph=True) of a DyLoRAConv2d: the rank is data (a buffer filled in place), so
    switching it compiles nothing new; values match eager at every rank."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    layer = dk.DyLoRAConv2d.from_conv(nn.Conv2d(4, 6, 3, padding=1), r_max=5, alpha=2.0)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(2, 4, 7, 7, requires_grad=True)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    from torch._dynamo.utils import counters
    counters.clear()
    for b in (1, 3, 5, 2):
        layer.set_rank(b)
        y = compiled(x)
        y.sum().backward()
        expected = dk.dylora_conv2d(x, layer.weight, layer.bias, layer.lora_A, layer.lora_B, b, 2.0, padding=1)
        assert rel_err(y, expected) <= 1e-6
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])


def test_validation_errors():
    ours, _, geo = make(CASES[0], torch.float32)
    x, W, bias, A, B = (ours[n] for n in ("x", "weight", "bias", "lora_A", "lora_B"))
    f = dk.dylora_conv2d
    with pytest.raises(ValueError, match="4-D"):
        f(x[0], W, bias, A, B, 2, 1.0, **geo)
    with pytest.raises(ValueError, match="kernel size"):
        f(x, W, bias, A[..., :2], B, 2, 1.0, **geo)
    with pytest.raises(ValueError, match="groups = 1 only"):
        f(x, W[:, :2], bias, A, B, 2, 1.0, **geo)
    with pytest.raises(ValueError, match=r"lora_B must have shape \(C_out, r_max\) = \(7, 6\)"):
        f(x, W, bias, A, B[:, :, None, None], 2, 1.0, **geo)
    with pytest.raises(ValueError, match="stride must be"):
        f(x, W, bias, A, B, 2, 1.0, stride=0)
    with pytest.raises(ValueError, match="string padding"):
        f(x, W, bias, A, B, 2, 1.0, padding="same")
    with pytest.raises(ValueError, match="one rank per sample"):
        f(x, W, bias, A, B, torch.ones(5, dtype=torch.long), 1.0, **geo)
    with pytest.raises(ValueError, match="smaller than"):
        f(x[..., :2, :2], W, bias, A, B, 2, 1.0, stride=1, padding=0, dilation=2)
    with pytest.raises(TypeError, match="float16"):
        f(x.half(), W.half(), bias.half(), A.half(), B.half(), 2, 1.0, **geo)
    with pytest.raises(ValueError, match="base must have"):
        f(x, W, bias, A, B, 2, 1.0, base=torch.zeros(2, 7, 3, 3), **geo)
    with pytest.raises(ValueError, match="groups=1 only"):
        dk.DyLoRAConv2d.from_conv(nn.Conv2d(4, 4, 3, groups=2), 4, 1.0)
    with pytest.raises(ValueError, match="padding_mode"):
        dk.DyLoRAConv2d.from_conv(nn.Conv2d(4, 4, 3, padding_mode="reflect"), 4, 1.0)
    with pytest.raises(TypeError, match="expects an Conv2d"):
        dk.DyLoRAConv2d.from_conv(nn.Conv1d(4, 4, 3), 4, 1.0)
