"""End to end: GPT-2's Conv1D layers, the model-wide rank tensor, and whole training steps (forward,
backward, AdamW) of small transformers models compiled once for every rank (CPU) or captured once in a
CUDA graph and replayed with a new rank each step (GPU; skipped without CUDA). Tiny configs, nothing
downloaded."""
import copy
import json
import sys

import pytest
import torch

import dylora_kernels
from dylora_kernels import DyLoRALinear, RankSampler, evaluate_ranks, export_peft, inject, load_peft, merge, unmerge
from dylora_kernels.models import capture_training_step, set_rank
from conftest import BACKENDS, TINY, device_of, randomise, rel_err

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
from transformers.pytorch_utils import Conv1D  # noqa: E402

CUDA = torch.cuda.is_available()


def gpt2(n_layer=2, dropout=0.0) -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_embd=TINY["hidden_size"], n_layer=n_layer, n_head=2, n_positions=64,
                                     vocab_size=TINY["vocab_size"], resid_pdrop=dropout, embd_pdrop=dropout,
                                     attn_pdrop=dropout, use_cache=False)
    return transformers.GPT2LMHeadModel(config).eval()


def roberta_classifier(dropout=0.0) -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.RobertaConfig(pad_token_id=1, num_labels=3, hidden_dropout_prob=dropout,
                                        attention_probs_dropout_prob=dropout, **TINY)
    config.problem_type = "single_label_classification"  # else the first forward sets it: a recompile
    return transformers.RobertaForSequenceClassification(config).eval()


def ids(n=2, seq=7, seed=1):
    return torch.randint(2, TINY["vocab_size"], (n, seq), generator=torch.Generator().manual_seed(seed))


def adapters(model):
    return [m for m in model.modules() if isinstance(m, DyLoRALinear)]


# ---------------------------------------------------------------------------------------------
# GPT-2 Conv1D: the kernels read its (K, N) weight through a transposed, strided view
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", [b for b in ("cpp", "triton") if b in BACKENDS])
@pytest.mark.parametrize("frozen_prefix", [True, False])
def test_ops_accept_a_transposed_weight_view(backend, frozen_prefix):
    """W stored (K, N) as Conv1D keeps it, passed as W_kn.t(): forward and every gradient against the
    float64 reference (odd sizes, a 0-d rank below r_max)."""
    g = torch.Generator().manual_seed(3)
    M, K, N, r_max, b = 13, 19, 23, 6, 4
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)
    W_kn, bias, A, B, x, grad = rnd(K, N) / K**0.5, rnd(N), rnd(r_max, K) / K**0.5, rnd(N, r_max), rnd(M, K), rnd(M, N)
    device = device_of(backend)
    outs = {}
    for name, dtype, be in (("ref", torch.float64, "reference"), ("ours", torch.float32, backend)):
        leaves = [t.to(device, dtype, copy=True).requires_grad_() for t in (x, A, B)]
        weight = W_kn.to(device, dtype).t()
        assert not weight.is_contiguous()
        y = dylora_kernels.dylora_linear(leaves[0], weight, bias.to(device, dtype), leaves[1], leaves[2],
                                         torch.tensor(b, device=device), 1.5, frozen_prefix=frozen_prefix, backend=be)
        y.backward(grad.to(device, dtype))
        outs[name] = [y.detach(), *(t.grad for t in leaves)]
    for got, ref in zip(outs["ours"], outs["ref"]):
        assert rel_err(got.cpu(), ref) <= 1e-5


def test_gpt2_conv1d_inject_forward_merge_and_peft_round_trip(tmp_path):
    base = gpt2()
    model = copy.deepcopy(base)
    conv = model.transformer.h[0].attn.c_attn
    names = inject(model, ["c_attn"], r_max=6, alpha=12.0)
    randomise(model)
    assert names == [f"transformer.h.{i}.attn.c_attn" for i in range(2)]
    layer = model.transformer.h[0].attn.c_attn
    assert layer.fan_in_fan_out and layer.weight is conv.weight and layer.bias is conv.bias  # shared, no copy
    assert (layer.in_features, layer.out_features) == (32, 96) and layer.weight.shape == (32, 96)
    assert set(model.state_dict()) - {k for k in model.state_dict() if "lora_" in k} == set(base.state_dict())
    assert [n for n, p in model.named_parameters() if p.requires_grad] == [f"{n}.lora_{x}" for n in names for x in "AB"]

    # the layer against the reference math in float64: y = x·W + bias + (alpha/b)·(x·A[:b]ᵀ)·B[:, :b]ᵀ
    x = torch.randn(3, 5, 32, dtype=torch.float64)
    layer.set_rank(4)
    A, B, W = layer.lora_A.double(), layer.lora_B.double(), layer.weight.double()
    expected = x @ W + layer.bias.double() + (12.0 / 4) * (x @ A[:4].t()) @ B[:, :4].t()
    assert rel_err(layer(x.float()), expected) <= 1e-5

    batch = ids()
    set_rank(model, 3)
    with torch.no_grad():
        ours = model(batch).logits
        export_peft(model, tmp_path, rank=3)
        config = json.loads((tmp_path / "adapter_config.json").read_text())
        assert config["fan_in_fan_out"] is True and config["target_modules"] == ["c_attn"] and config["r"] == 3
        theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()(batch).logits
        assert rel_err(theirs, ours) <= 1e-5
        loaded = copy.deepcopy(base)
        assert load_peft(loaded, tmp_path) == names
        assert all(m.fan_in_fan_out and m.r_max == 3 for m in adapters(loaded))
        assert rel_err(loaded(batch).logits, ours) <= 1e-5

        weight_before = conv.weight.clone()
        merge(model, 3)
        merged = model.transformer.h[0].attn.c_attn
        assert isinstance(merged, Conv1D) and merged.weight is conv.weight and not adapters(model)
        assert set(model.state_dict()) == set(base.state_dict())
        assert rel_err(model(batch).logits, ours) <= 1e-5
        unmerge(model)
        assert isinstance(model.transformer.h[0].attn.c_attn, DyLoRALinear)
        assert rel_err(conv.weight, weight_before) <= 1e-6
        assert rel_err(model(batch).logits, ours) <= 1e-5


def test_from_conv1d_refuses_other_modules():
    with pytest.raises(TypeError, match="from_conv1d expects a transformers Conv1D, got Linear"):
        DyLoRALinear.from_conv1d(torch.nn.Linear(3, 4), r_max=2, alpha=1.0)


# ---------------------------------------------------------------------------------------------
# One model-wide rank tensor
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("per_layer", [False, True])
def test_shared_rank_is_one_tensor_filled_once_per_step(per_layer):
    model, twin = gpt2(n_layer=3), gpt2(n_layer=3)
    for m in (model, twin):
        inject(m, ["c_attn", "c_proj"], r_max=6, alpha=12.0)
    shared = RankSampler(model, generator=4, per_layer=per_layer, shared=True)
    plain = RankSampler(twin, generator=4, per_layer=per_layer)
    layers, rank = adapters(model), shared.rank
    assert rank.shape == ((len(layers),) if per_layer else ())
    for step in range(4):
        assert shared.step() == plain.step()
        assert [m.rank for m in layers] == [m.rank for m in adapters(twin)]
        assert shared.rank is rank  # the same tensor every step: written, never replaced
        for m in layers:
            assert m._rank.untyped_storage().data_ptr() == rank.untyped_storage().data_ptr()

    # a layer set on its own leaves the others alone and is bound again at the next step
    layers[1].set_rank(2)
    assert layers[1].rank == 2 and [m.rank for m in layers[:1] + layers[2:]] == [m.rank for m in adapters(twin)[:1] + adapters(twin)[2:]]
    assert shared.step() == plain.step() and [m.rank for m in layers] == [m.rank for m in adapters(twin)]
    # evaluate_ranks puts the very same tensors back
    before = [m._rank for m in layers]
    evaluate_ranks(model, ids(), [1, 5])
    assert all(m._rank is t for m, t in zip(layers, before))
    if not per_layer:  # the model-wide set_rank writes the one tensor
        set_rank(model, 5)
        assert all(m._rank is rank for m in layers) and int(rank) == 5
        with pytest.raises(ValueError, match=r"rank must be in \[1, r_max\] = \[1, 6\], got 7"):
            set_rank(model, 7)
    # buffers replaced behind the sampler's back (as model.to(device) does): bound again at the next step
    model._apply(lambda t: t.clone())
    assert shared.step() == plain.step() and [m.rank for m in layers] == [m.rank for m in adapters(twin)]
    with pytest.raises(ValueError, match=r"share_rank needs a 0-d int64 tensor on cpu, got torch.int32 of shape \(\)"):
        layers[0].share_rank(torch.tensor(3, dtype=torch.int32))


# ---------------------------------------------------------------------------------------------
# Whole training steps: compiled once for every rank (CPU), captured once (CUDA)
# ---------------------------------------------------------------------------------------------
def _training_setup(kind, device="cpu"):
    model = roberta_classifier() if kind == "roberta" else gpt2()
    inject(model, ["query", "value"] if kind == "roberta" else ["c_attn"], r_max=6, alpha=12.0)
    randomise(model)
    model.to(device).train()
    batch = {"input_ids": ids(2, 9).to(device)}
    batch["labels"] = (torch.tensor([0, 2]) if kind == "roberta" else batch["input_ids"].cpu()).to(device)
    return model, batch


def _step(model, batch, optimizer):
    loss = model(**batch).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()


@pytest.mark.parametrize("kind", ["roberta", "gpt2"])
@pytest.mark.parametrize("shared", [True, False])
def test_compiled_training_step_never_recompiles_across_ranks(kind, shared):
    """A whole step (forward, backward, AdamW) through torch.compile with the rank changing every step:
    compiled on the first step only (a later compile raises), and equal to the same steps run eagerly."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    model, batch = _training_setup(kind)
    twin = copy.deepcopy(model)
    counter = CompileCounterWithBackend("aot_eager")  # AOTAutograd traces forward and backward
    compiled = torch.compile(model, backend=counter)
    runs = []
    for m, run_model in ((model, compiled), (twin, twin)):
        optimizer = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2)
        sampler = RankSampler(m, generator=7, shared=shared)
        losses, ranks = [], []
        for i in range(5):
            ranks.append(sampler.step())
            if i == 1 and run_model is compiled:
                frames = counter.frame_count
                recompile_guard = torch._dynamo.config.patch(error_on_recompile=True)
                recompile_guard.__enter__()
            losses.append(_step(run_model, batch, optimizer))
        if run_model is compiled:
            recompile_guard.__exit__(None, None, None)
            assert counter.frame_count == frames > 0
        runs.append((ranks, torch.stack(losses), [p.detach() for p in m.parameters() if p.requires_grad]))
    (ranks, losses, params), (ranks_eager, losses_eager, params_eager) = runs
    assert ranks == ranks_eager and len(set(ranks)) > 2
    assert rel_err(losses, losses_eager) <= 1e-5
    assert all(rel_err(p, q) <= 1e-5 for p, q in zip(params, params_eager))


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("kind", ["roberta", "gpt2"])
def test_captured_training_step_replays_every_rank(kind):
    """The whole step captured ONCE in a CUDA graph, replayed with a new rank each step (written into
    the sampler's model-wide rank tensor): the same losses and adapters as eager steps at those ranks."""
    model, batch = _training_setup(kind, "cuda")
    twin = copy.deepcopy(model)
    params = lambda m: [p for p in m.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params(model), lr=1e-2, capturable=True)
    twin_opt = torch.optim.AdamW(params(twin), lr=1e-2, capturable=True)
    sampler, twin_sampler = RankSampler(model, generator=7, shared=True), RankSampler(twin, generator=7, shared=True)

    def step():  # forward, backward, optimizer; no zero_grad (the capture leaves the gradients None)
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        return loss.detach()

    sampler.step(0)
    graph, static_loss = capture_training_step(step, opt, warmup=3)  # 3 real steps at rank b_0, then the capture
    twin_sampler.step(0)
    for _ in range(3):
        _step(twin, batch, twin_opt)
    for i in range(1, 6):
        b = sampler.step(i)
        assert twin_sampler.step(i) == b
        graph.replay()
        eager_loss = _step(twin, batch, twin_opt)
        assert rel_err(static_loss, eager_loss) <= 1e-4, b
        assert all(rel_err(p, q) <= 1e-4 for p, q in zip(params(model), params(twin))), b


def test_capture_training_step_refuses_a_non_capturable_optimizer():
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.ones(2))])
    with pytest.raises(ValueError, match="capturable=True"):
        capture_training_step(lambda: None, opt)


# ---------------------------------------------------------------------------------------------
# bench/bench_e2e.py compares equal work: its baselines compute what the package computes
# ---------------------------------------------------------------------------------------------
def _bench_module():
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).parents[1] / "bench" / "bench_e2e.py"
    spec = importlib.util.spec_from_file_location("bench_e2e", path)
    be = sys.modules[spec.name] = importlib.util.module_from_spec(spec)  # dataclasses look their module up
    spec.loader.exec_module(be)
    return be


def test_bench_e2e_runs_a_tiny_case_and_writes_its_table():
    be = _bench_module()
    case = be.Case("gpt2", layers=1, batch=1, seq=8, hidden=64, vocab=100, r_max=4)
    progress = type("Progress", (), {"update": lambda self, n: None})()
    rows = be.bench_case(case, torch.device("cpu"), warmup=1, rounds=2, block=1, progress=progress)
    assert [r["variant"] for r in rows] == ["peft", "naive", "dylora"] and not any(r["error"] for r in rows)
    assert rows[0]["ratio_vs_peft"] == 1.0 and all(len(r["step_ms_all"]) == 2 and r["peak_mib"] > 0 for r in rows)
    meta = {"machine": "test", "torch": torch.__version__, "date": "today", "command": "pytest", "warmup": 1,
            "load_average_start": 0.0, "load_average_now": 0.0}
    table = be.markdown(meta, rows, be.rank_change_cost(layer_counts=(3,), calls=10))
    assert table.count("| GPT-2 medium (1 layers, hidden 64, vocab 100) 1x8 fp32 |") == 3 and "| 3 |" in table


@pytest.mark.parametrize("model", ["roberta", "gpt2"])
def test_bench_e2e_variants_train_the_same_adapters(model):
    """PEFT, the naive official recipe and this package, built by the benchmark from one tiny config:
    at r_max the first losses agree (PEFT's scale alpha/r is DyLoRA's alpha/b at b = r); then at the
    drawn ranks the naive recipe and the package give the same losses and adapters, step after step."""
    be = _bench_module()
    case = be.Case(model, layers=2, batch=2, seq=8, hidden=64, vocab=100, r_max=6)
    base, cpu = be.build_base(case), torch.device("cpu")
    batch, init = be.batch_for(case, cpu), be.initial_adapters(case, base, cpu)
    variants = {name: be.Variant(name, case, base, batch, init, cpu) for name in ("peft", "naive", "dylora")}

    def step(name, rank=None):
        torch.manual_seed(5)  # the same dropout masks in every variant
        variants[name].run(rank)
        return float(variants[name].loss)

    first = {name: step(name, None if name == "peft" else case.r_max) for name in variants}
    assert abs(first["naive"] - first["peft"]) <= 1e-5 * abs(first["peft"])
    assert abs(first["dylora"] - first["peft"]) <= 1e-5 * abs(first["peft"])
    ranks = []
    for _ in range(4):  # drawn ranks: the same sequence in both
        ranks.append(int(variants["dylora"].sampler.draw(variants["dylora"].step_index)))
        assert rel_err(torch.tensor(step("naive")), torch.tensor(step("dylora"))) <= 1e-5
        for (A, B), (A2, B2) in zip(be.adapter_pairs(variants["naive"].model), be.adapter_pairs(variants["dylora"].model)):
            assert rel_err(A2, A) <= 1e-5 and rel_err(B2, B) <= 1e-5
    assert len(set(ranks)) > 1
