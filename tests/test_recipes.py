"""README "Use as a backend": the LyCORIS and PEFT recipes, run exactly as the README writes them,
against the real lycoris-lora and peft layers' own forward and backward (random adapters, never
LoRA's zero-initialised B)."""
import copy
import re
import statistics
import time
from pathlib import Path

import pytest
import torch
from torch import nn

import dylora_kernels as dk
from conftest import rel_err

try:
    import lycoris
    from lycoris.modules.dylora import DyLoraModule
except ImportError:  # a test dependency: pip install -e ".[test]"
    lycoris = None
peft = pytest.importorskip("peft", reason="peft is not installed (a test dependency: pip install -e '.[test]')")

needs_lycoris = pytest.mark.skipif(lycoris is None, reason="lycoris-lora is not installed (a test dependency: "
                                                           "pip install -e '.[test]')")
README = Path(__file__).resolve().parents[1] / "README.md"
TOL = {torch.float64: 1e-12, torch.float32: 1e-5}  # relative, as the op tests (DESIGN §3)


def readme_recipes() -> dict:
    """Execute every ```python block of the README's "Use as a backend" section, in order, in one
    namespace: the tests below run the recipes exactly as written there."""
    text = README.read_text()
    assert "\n## Use as a backend\n" in text, "README.md has no '## Use as a backend' section"
    section = text.split("\n## Use as a backend\n", 1)[1].split("\n## ", 1)[0]
    namespace = {}
    for block in re.findall(r"```python\n(.*?)```", section, re.S):
        exec(compile(block, f"{README} (Use as a backend)", "exec"), namespace)
    return namespace


RECIPES = readme_recipes()


def test_readme_defines_both_recipes_and_installs_nothing():
    assert callable(RECIPES["lycoris_dylora_forward"]) and callable(RECIPES["peft_dylora_forward"])
    if lycoris is not None:  # executing the README must not patch LyCORIS (the tests would compare it with itself)
        assert DyLoraModule.forward.__module__ == "lycoris.modules.dylora"


def assert_grads_match(ours: dict, theirs: dict, tol: float) -> None:
    """Same parameter names, the same ones without a gradient (None), the others within tol."""
    assert ours.keys() == theirs.keys()
    for name in theirs:
        assert (ours[name] is None) == (theirs[name] is None), name
        if theirs[name] is not None:
            assert rel_err(ours[name], theirs[name]) <= tol, (name, rel_err(ours[name], theirs[name]))


def grads(module: nn.Module) -> dict:
    return {name: None if p.grad is None else p.grad.clone() for name, p in module.named_parameters()}


# --------------------------------------------------------------------------------------------
# LyCORIS
# --------------------------------------------------------------------------------------------
def lycoris_layer(K, N, lora_dim, block_size, alpha, multiplier, dtype, seed=0):
    """A DyLoraModule on a frozen nn.Linear, every block random (up_list starts at zero in LyCORIS). The base is
    as large as the update, so float32 cancellation in LyCORIS's W + ΔW − W shows."""
    return lycoris_conv_layer(nn.Linear(K, N), lora_dim, block_size, alpha, multiplier, dtype, seed)


def forced_block(monkeypatch, block_count: int, b: int) -> list:
    """Make Python's random.randint (LyCORIS's draw and the recipe's) return block b; the list
    collects each call's arguments."""
    import random
    calls = []

    def randint(lo, hi):
        calls.append((lo, hi))
        return b
    monkeypatch.setattr(random, "randint", randint)
    return calls


def run_lycoris(forward, module, x, grad):
    module.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_()
    y = forward(module, x)
    y.backward(grad)
    return y.detach(), x.grad, grads(module)


@needs_lycoris
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("lora_dim,block_size", [(8, 1), (8, 2), (12, 4)])
def test_lycoris_recipe_matches_lycoris_at_every_block(monkeypatch, dtype, lora_dim, block_size):
    K, N = 37, 29
    module = lycoris_layer(K, N, lora_dim, block_size, alpha=3.0, multiplier=0.75, dtype=dtype)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 5, K, dtype=dtype, generator=g)
    grad = torch.randn(3, 5, N, dtype=dtype, generator=g)
    ours_forward = RECIPES["lycoris_dylora_forward"]
    for b in range(lora_dim // block_size):
        calls = forced_block(monkeypatch, lora_dim // block_size, b)
        y_ref, dx_ref, grads_ref = run_lycoris(DyLoraModule.forward, module, x, grad)
        y, dx, grads_ours = run_lycoris(ours_forward, module, x, grad)
        assert calls == [(0, lora_dim // block_size - 1)] * 2  # both drew one block, from the same range
        assert y.dtype == dtype and rel_err(y, y_ref) <= TOL[dtype], (b, rel_err(y, y_ref))
        assert rel_err(dx, dx_ref) <= TOL[dtype], (b, rel_err(dx, dx_ref))
        trained = [f"up_list.{b}", f"down_list.{b}"]
        assert [n for n, v in grads_ref.items() if v is not None] == trained  # LyCORIS trains block b only
        assert_grads_match(grads_ours, grads_ref, TOL[dtype])


def lycoris_conv_layer(conv, lora_dim, block_size, alpha, multiplier, dtype, seed=0):
    """A DyLoraModule on a frozen base (nn.Linear, nn.Conv1d/2d/3d) with a random base and every block random."""
    g = torch.Generator().manual_seed(seed)
    conv = conv.to(dtype).requires_grad_(False)
    with torch.no_grad():
        for p in conv.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    module = DyLoraModule("layer", conv, multiplier=multiplier, lora_dim=lora_dim, alpha=alpha,
                          block_size=block_size).to(dtype)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)
    return module


CONV_LAYERS = {  # (layer, input spatial size): 3×3 as SD's UNet, strided + dilated, 1×1, reflect padding, 1d, 3d
    "2d-3x3": (lambda: nn.Conv2d(6, 5, 3, padding=1), (9, 7)),
    "2d-strided-dilated": (lambda: nn.Conv2d(6, 5, (3, 2), stride=(2, 1), padding=(1, 0), dilation=(2, 1), bias=False),
                           (11, 8)),
    "2d-1x1": (lambda: nn.Conv2d(6, 5, 1), (4, 5)),
    "2d-reflect": (lambda: nn.Conv2d(6, 5, 3, padding=1, padding_mode="reflect"), (6, 7)),
    "1d": (lambda: nn.Conv1d(6, 5, 3, stride=2, padding=1), (13,)),
    "3d": (lambda: nn.Conv3d(6, 5, 3, padding=1), (3, 4, 5)),
}


@needs_lycoris
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("lora_dim,block_size", [(8, 1), (8, 2), (12, 4)])
@pytest.mark.parametrize("layer", list(CONV_LAYERS))
def test_lycoris_recipe_matches_lycoris_conv_at_every_block(monkeypatch, dtype, lora_dim, block_size, layer):
    make, spatial = CONV_LAYERS[layer]
    module = lycoris_conv_layer(make(), lora_dim, block_size, alpha=3.0, multiplier=0.75, dtype=dtype)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 6, *spatial, dtype=dtype, generator=g)
    with torch.no_grad():
        grad = torch.randn(module.org_forward(x).shape, dtype=dtype, generator=g)
    ours_forward = RECIPES["lycoris_dylora_forward"]
    for b in range(lora_dim // block_size):
        calls = forced_block(monkeypatch, lora_dim // block_size, b)
        y_ref, dx_ref, grads_ref = run_lycoris(DyLoraModule.forward, module, x, grad)
        y, dx, grads_ours = run_lycoris(ours_forward, module, x, grad)
        assert calls == [(0, lora_dim // block_size - 1)] * 2
        assert y.dtype == dtype and rel_err(y, y_ref) <= TOL[dtype], (b, rel_err(y, y_ref))
        assert rel_err(dx, dx_ref) <= TOL[dtype], (b, rel_err(dx, dx_ref))
        assert [n for n, v in grads_ref.items() if v is not None] == [f"up_list.{b}", f"down_list.{b}"]
        assert_grads_match(grads_ours, grads_ref, TOL[dtype])


@needs_lycoris
def test_lycoris_recipe_refuses_grouped_conv():
    module = lycoris_conv_layer(nn.Conv2d(6, 4, 3, groups=2), 4, 1, alpha=1.0, multiplier=1.0, dtype=torch.float64)
    with pytest.raises(NotImplementedError, match="groups=1"):
        RECIPES["lycoris_dylora_forward"](module, torch.randn(1, 6, 5, 5, dtype=torch.float64))


@needs_lycoris
def test_lycoris_recipe_installed_in_a_network(monkeypatch):
    """The README's install lines: DyLoraModule.forward patched before create_lycoris/apply_to, a
    conv layer and two linear layers, each layer drawing its own block from the seeded Python RNG."""
    import random

    def build():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(3, 24, 3, padding=1), nn.Flatten(2), nn.Linear(16, 40), nn.GELU(),
                              nn.Linear(40, 16)).double().requires_grad_(False)
        network = lycoris.create_lycoris(model, 0.5, linear_dim=8, linear_alpha=4.0, conv_dim=8, conv_alpha=2.0,
                                         algo="dylora", block_size=2)
        network.apply_to()
        return model, network.double()

    model_ref, network_ref = build()
    monkeypatch.setattr(DyLoraModule, "forward", RECIPES["lycoris_dylora_forward"])
    model, network = build()
    assert len(network.loras) == 3 and all(lora.forward.__func__ is RECIPES["lycoris_dylora_forward"]
                                           for lora in network.loras)
    with torch.no_grad():
        for (name, p), (name_ref, p_ref) in zip(network.named_parameters(), network_ref.named_parameters()):
            assert name == name_ref
            p_ref.copy_(torch.randn_like(p_ref))
            p.copy_(p_ref)
    x = torch.randn(6, 3, 4, 4, dtype=torch.float64)
    for seed in range(5):
        outputs = []
        for m, net in ((model_ref, network_ref), (model, network)):
            net.zero_grad(set_to_none=True)
            random.seed(seed)
            y = m(x)
            y.pow(2).sum().backward()
            outputs.append((y.detach(), grads(net)))
        (y_ref, grads_ref), (y, grads_ours) = outputs
        assert rel_err(y, y_ref) <= 1e-12
        assert sum(v is not None for v in grads_ref.values()) == 6  # one block's up and down in each layer
        assert_grads_match(grads_ours, grads_ref, 1e-12)


@needs_lycoris
def test_lycoris_trainable_base_weight_gets_twice_its_gradient_in_lycoris(monkeypatch):
    """The README's one gradient difference: with a trainable base weight LyCORIS 4.1.3 gives it 2·gᵀx
    (through org_forward and again through get_merged_weight); the recipe gives gᵀx."""
    module = lycoris_layer(12, 10, 4, 1, alpha=2.0, multiplier=1.0, dtype=torch.float64)
    base = module.org_module[0].requires_grad_(True)
    x, grad = torch.randn(5, 12, dtype=torch.float64), torch.randn(5, 10, dtype=torch.float64)
    forced_block(monkeypatch, 4, 2)
    weight_grads = []
    for forward in (DyLoraModule.forward, RECIPES["lycoris_dylora_forward"]):
        base.zero_grad(set_to_none=True)
        forward(module, x).backward(grad)
        weight_grads.append(base.weight.grad)
    torch.testing.assert_close(weight_grads[1], grad.t() @ x, rtol=1e-12, atol=0)
    torch.testing.assert_close(weight_grads[0], 2 * grad.t() @ x, rtol=1e-12, atol=0)


@needs_lycoris
@pytest.mark.parametrize("block_size", [1, 4])
def test_lycoris_recipe_timing(monkeypatch, capsys, block_size):
    """LyCORIS's forward+backward and the recipe's, interleaved round by round (same block each round),
    on a modest CPU shape. Prints the times and the ratio (README); asserts only that both agree."""
    M, K, N, lora_dim, rounds = 1024, 1024, 1024, 32, 15
    module = lycoris_layer(K, N, lora_dim, block_size, alpha=16.0, multiplier=1.0, dtype=torch.float32)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(4, M // 4, K, generator=g)
    grad = torch.randn(4, M // 4, N, generator=g)
    linear = module.org_module[0]
    floor = lambda module, x: nn.functional.linear(x, linear.weight, linear.bias)  # the frozen GEMM alone
    times = {"lycoris": [], "dylora": [], "floor": []}
    for r in range(rounds + 2):  # two warm-up rounds
        forced_block(monkeypatch, lora_dim // block_size, r % (lora_dim // block_size))
        results = {}
        for name, forward in (("lycoris", DyLoraModule.forward), ("dylora", RECIPES["lycoris_dylora_forward"]),
                              ("floor", floor)):
            start = time.perf_counter()
            results[name] = run_lycoris(forward, module, x, grad)
            if r >= 2:
                times[name].append(time.perf_counter() - start)
        (y_ref, dx_ref, grads_ref), (y, dx, grads_ours) = results["lycoris"], results["dylora"]
        assert rel_err(y, y_ref) <= 1e-5 and rel_err(dx, dx_ref) <= 1e-5
        assert_grads_match(grads_ours, grads_ref, 1e-5)
    ratios = [a / b for a, b in zip(times["lycoris"], times["dylora"])]
    with capsys.disabled():
        print(f"\nLyCORIS DyLoRA fwd+bwd, x ({M}, {K}) float32, N = {N}, lora_dim = {lora_dim}, "
              f"block_size = {block_size}, {torch.get_num_threads()} threads: LyCORIS "
              f"{statistics.median(times['lycoris']) * 1e3:.1f} ms, recipe "
              f"{statistics.median(times['dylora']) * 1e3:.1f} ms, F.linear alone "
              f"{statistics.median(times['floor']) * 1e3:.1f} ms (medians of {rounds}); speed-up "
              f"{statistics.median(ratios):.2f}x (per-round {min(ratios):.2f}-{max(ratios):.2f})")


# --------------------------------------------------------------------------------------------
# PEFT
# --------------------------------------------------------------------------------------------
class Net(nn.Module):
    def __init__(self, K=37, N=29):
        super().__init__()
        self.proj = nn.Linear(K, N)
        self.head = nn.Linear(N, 3)

    def forward(self, x):
        return self.head(self.proj(x))


def peft_layer(r, lora_alpha, dtype, dropout=0.0, use_rslora=False, seed=0, base=None):
    """The proj layer of a real peft LoRA model (from a small config: nothing downloaded) on the same
    base weights for every seed, its adapters random. A bfloat16 model gets float32 adapters, as PEFT
    makes them by default."""
    torch.manual_seed(seed)
    net = Net().to(dtype) if base is None else copy.deepcopy(base)
    model = peft.get_peft_model(net, peft.LoraConfig(r=r, lora_alpha=lora_alpha, target_modules=["proj"],
                                                     lora_dropout=dropout, use_rslora=use_rslora))
    layer = model.base_model.model.proj
    assert isinstance(layer, peft.tuners.lora.Linear)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in (layer.lora_A["default"].weight, layer.lora_B["default"].weight):
            p.copy_(torch.randn(p.shape, generator=g) / p.shape[1] ** 0.5)
    return layer


def run_peft(forward, layer, x, grad, seed=0):
    """(y, dx, dA, dB) of forward(x) with the dropout RNG seeded."""
    for p in layer.parameters():
        p.grad = None
    x = x.detach().clone().requires_grad_()
    torch.manual_seed(seed)
    y = forward(x)
    y.backward(grad)
    return y.detach(), x.grad, layer.lora_A["default"].weight.grad, layer.lora_B["default"].weight.grad


class SameMaskDropout(nn.Module):
    """PEFT's lora_dropout replaced by the fused kernels' mask: the seed drawn as ``dylora_delta`` draws it (from
    torch's generator), the mask of ``reference.dropout_keep`` applied with 1/(1 − p). With it, PEFT's own forward
    sees the x the fused op's adapter path sees."""

    def __init__(self, p):
        super().__init__()
        self.p = p

    def forward(self, x):
        seed = torch.randint(1 << 62, (), dtype=torch.int64, device=x.device)
        return dk.reference.dropped(x, self.p, seed)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("frozen_prefix", [False, True], ids=["full", "frozen"])
def test_peft_recipe_at_rank_b_is_peft_with_r_b(dtype, frozen_prefix):
    """The r_max layer at DyLoRA rank b equals PEFT's own forward of a LoRA layer with r = b,
    lora_alpha = alpha and the weights A[:b], B[:, :b]; dA/dB are its gradients on the trained slots
    (all < b, or b − 1 only in frozen-prefix mode) and exactly zero elsewhere. Dropout on (fused in the recipe; PEFT's
    layer given the same mask), seeded."""
    r_max, lora_alpha = 6, 9.0
    layer = peft_layer(r_max, lora_alpha, dtype, dropout=0.25)
    base_net = Net().to(dtype)
    base_net.proj = copy.deepcopy(layer.base_layer)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 7, 37, dtype=dtype, generator=g)
    grad = torch.randn(4, 7, 29, dtype=dtype, generator=g)
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    for b in range(1, r_max + 1):
        small = peft_layer(b, lora_alpha, dtype, dropout=0.25, base=base_net)
        with torch.no_grad():
            small.lora_A["default"].weight.copy_(A[:b])
            small.lora_B["default"].weight.copy_(B[:, :b])
        small.lora_dropout["default"] = SameMaskDropout(0.25)
        y_ref, dx_ref, dA_ref, dB_ref = run_peft(small, small, x, grad)
        y, dx, dA, dB = run_peft(lambda x: RECIPES["peft_dylora_forward"](layer, x, b, frozen_prefix=frozen_prefix),
                                 layer, x, grad)
        tol = TOL[dtype]
        assert rel_err(y, y_ref) <= tol and rel_err(dx, dx_ref) <= tol, b
        trained = [b - 1] if frozen_prefix else list(range(b))
        assert rel_err(dA[trained], dA_ref[trained]) <= tol and rel_err(dB[:, trained], dB_ref[:, trained]) <= tol
        untrained = [j for j in range(r_max) if j not in trained]
        assert torch.count_nonzero(dA[untrained]) == 0 and torch.count_nonzero(dB[:, untrained]) == 0
        assert layer.base_layer.weight.grad is None


@pytest.mark.parametrize("use_rslora", [False, True], ids=["lora", "rslora"])
def test_peft_recipe_at_full_rank_is_the_layers_own_forward(use_rslora):
    """At b = r the recipe is the same layer's own PEFT forward and backward (alpha = scaling·r also
    under rsLoRA, whose scaling is lora_alpha/√r)."""
    layer = peft_layer(8, 5.0, torch.float64, use_rslora=use_rslora)
    assert layer.scaling["default"] == (5.0 / 8 ** 0.5 if use_rslora else 5.0 / 8)
    x, grad = torch.randn(2, 9, 37, dtype=torch.float64), torch.randn(2, 9, 29, dtype=torch.float64)
    ref = run_peft(layer, layer, x, grad)
    ours = run_peft(lambda x: RECIPES["peft_dylora_forward"](layer, x, 8), layer, x, grad)
    for name, a, b in zip(("y", "dx", "dA", "dB"), ours, ref):
        assert rel_err(a, b) <= 1e-12, name


def test_peft_recipe_mixed_precision_bf16_model_fp32_adapters():
    """PEFT's default under a bfloat16 model: float32 adapters. y and dx in bfloat16, dA/dB in float32.
    Against PEFT's own forward at b = r and the float64 reference at every b, all within bf16 rounding
    (1e-2): the C++ kernels run the adapters' GEMMs in x's dtype (fp32 accumulation), so dA/dB are
    float32 tensors of bf16 precision (about 2e-3 here), where PEFT's float32 adapter path gives 1e-7."""
    r = 8
    layer = peft_layer(r, 16.0, torch.bfloat16)
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    assert A.dtype == B.dtype == torch.float32 and layer.base_layer.weight.dtype == torch.bfloat16
    g = torch.Generator().manual_seed(4)
    x = torch.randn(3, 11, 37, generator=g).bfloat16()
    grad = torch.randn(3, 11, 29, generator=g).bfloat16()
    W, bias = layer.base_layer.weight, layer.base_layer.bias
    for b in (1, 3, r):
        y, dx, dA, dB = run_peft(lambda x: RECIPES["peft_dylora_forward"](layer, x, b), layer, x, grad)
        assert y.dtype == dx.dtype == torch.bfloat16 and dA.dtype == dB.dtype == torch.float32
        leaves = [t.detach().double().requires_grad_() for t in (x, A, B)]
        y64 = dk.dylora_linear(leaves[0], W.double(), bias.double(), leaves[1], leaves[2], b, 16.0,
                               backend="reference")
        y64.backward(grad.double())
        y64 = y64.detach()
        assert rel_err(y, y64) <= 1e-2 and rel_err(dx, leaves[0].grad) <= 1e-2, b
        assert rel_err(dA, leaves[1].grad) <= 1e-2 and rel_err(dB, leaves[2].grad) <= 1e-2, b
        if b == r:
            y_ref, dx_ref, dA_ref, dB_ref = run_peft(layer, layer, x, grad)
            assert y_ref.dtype == torch.bfloat16 and rel_err(y, y_ref) <= 1e-2 and rel_err(dx, dx_ref) <= 1e-2
            assert rel_err(dA, dA_ref) <= 1e-2 and rel_err(dB, dB_ref) <= 1e-2


class Int8Linear(nn.Module):
    """A weight-only int8 linear (per-row scale): a base layer the wrapper computes itself, with no
    float `weight` the recipe could hand to dylora_linear."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        scale = linear.weight.detach().abs().amax(1, keepdim=True) / 127
        self.register_buffer("qweight", torch.round(linear.weight.detach() / scale).to(torch.int8))
        self.register_buffer("scale", scale)
        self.register_buffer("bias", linear.bias.detach().clone())
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x):
        return nn.functional.linear(x, self.qweight.to(x.dtype) * self.scale, self.bias)


def test_peft_recipe_serves_a_base_layer_the_wrapper_computes():
    """dylora_delta(base=...) on a PEFT layer whose base is a weight-only int8 linear: the recipe equals
    PEFT's own forward and backward over the same base at b = r, and base + the reference term below."""
    layer = peft_layer(6, 6.0, torch.float64)
    layer.base_layer = Int8Linear(layer.base_layer)
    x, grad = torch.randn(5, 37, dtype=torch.float64), torch.randn(5, 29, dtype=torch.float64)
    ref = run_peft(layer, layer, x, grad)
    ours = run_peft(lambda x: RECIPES["peft_dylora_forward"](layer, x, 6), layer, x, grad)
    for name, a, b in zip(("y", "dx", "dA", "dB"), ours, ref):
        assert rel_err(a, b) <= 1e-12, name
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    with torch.no_grad():
        y = RECIPES["peft_dylora_forward"](layer, x, 2)
        expected = layer.base_layer(x) + (6.0 / 2) * (x @ A[:2].t()) @ B[:, :2].t()
    assert rel_err(y, expected) <= 1e-12
