"""Model-level DyLoRA: inject, ranks, evaluate_ranks, merge, frozen slots, PEFT I/O, on real
transformers models built from tiny configs (nothing is downloaded)."""
import collections
import copy
import json
import subprocess
import sys
import types

import pytest
import torch
from torch import nn

from dylora_kernels import (DyLoRALinear, MergedLinear, RankSampler, evaluate_ranks, export_peft,
                            freeze_untrained_slots, inject, load_peft, merge, set_rank, unmerge)
from conftest import TINY, mlp, randomise, rel_err

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

TARGETS = {"bert": ["query", "value"], "roberta": ["query", "value"], "llama": ["q_proj", "v_proj"]}


def hf_model(kind: str) -> nn.Module:
    torch.manual_seed(0)
    if kind == "llama":
        config = transformers.LlamaConfig(num_key_value_heads=2, **TINY)
        return transformers.LlamaModel(config).eval()
    config_cls, model_cls = {"bert": (transformers.BertConfig, transformers.BertModel),
                             "roberta": (transformers.RobertaConfig, transformers.RobertaModel)}[kind]
    return model_cls(config_cls(pad_token_id=1, **TINY)).eval()


def hf_batch(n=3, seq=7):
    g = torch.Generator().manual_seed(1)
    return {"input_ids": torch.randint(2, 100, (n, seq), generator=g),
            "attention_mask": torch.ones(n, seq, dtype=torch.long)}


def dylora(model, targets, r_max=6, alpha=12.0, **kw):
    inject(model, targets, r_max=r_max, alpha=alpha, **kw)
    return randomise(model)


def layers(model):
    return [m for m in model.modules() if isinstance(m, DyLoRALinear)]


# ---------------------------------------------------------------------------------------------
# inject
# ---------------------------------------------------------------------------------------------
def test_inject_sequential_replaces_shares_and_freezes():
    model = mlp()
    weight = model[2].weight
    x = torch.randn(4, 12)
    before = model(x)
    names = inject(model, ["0", "2"], r_max=4, alpha=8)
    assert names == ["0", "2"] and isinstance(model[0], DyLoRALinear) and type(model[4]) is nn.Linear
    assert model[2].weight is weight and model[2].r_max == 4 and model[2].alpha == 8
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable == ["0.lora_A", "0.lora_B", "2.lora_A", "2.lora_B"]
    torch.testing.assert_close(model(x), before)  # lora_B starts at zero


@pytest.mark.parametrize("kind", ["bert", "roberta", "llama"])
def test_inject_hf_forward_backward(kind):
    model = hf_model(kind)
    names = inject(model, TARGETS[kind], r_max=4, alpha=8)
    assert len(names) == 4 and all(n.split(".")[-1] in TARGETS[kind] for n in names)
    randomise(model)
    model.train()
    model(**hf_batch()).last_hidden_state.square().mean().backward()
    for name, p in model.named_parameters():
        assert p.requires_grad == ("lora_" in name)
        assert (p.grad is not None) == ("lora_" in name), name
    assert all(m.lora_A.grad.abs().sum() > 0 for m in layers(model))


def test_inject_errors_name_targets_and_linears():
    model = mlp()
    with pytest.raises(ValueError, match=r"\['query'\] match no nn.Linear .* include: 0, 2, 4"):
        inject(model, ["0", "query"], r_max=2, alpha=1)
    assert not layers(model)  # nothing replaced on error
    with pytest.raises(ValueError, match="match no nn.Linear"):
        inject(model, "1", r_max=2, alpha=1)  # "1" is the ReLU, not a Linear
    with pytest.raises(ValueError, match="no DyLoRALinear layers"):
        set_rank(mlp(), 1)


# ---------------------------------------------------------------------------------------------
# ranks
# ---------------------------------------------------------------------------------------------
def test_rank_sampler_is_seeded_shared_and_in_place():
    model = dylora(mlp(), ["0", "2", "4"], r_max=6)
    buffers = [m._rank for m in layers(model)]
    torch.manual_seed(123)  # the global RNG does not matter
    sampler = RankSampler(model, r_min=2, generator=7)
    draws = [sampler.step() for _ in range(200)]
    torch.manual_seed(456)
    again = RankSampler(model, r_min=2, generator=torch.Generator().manual_seed(7))
    assert [again.step() for _ in range(200)] == draws
    assert set(draws) == {2, 3, 4, 5, 6}
    assert [m.rank for m in layers(model)] == [draws[-1]] * 3
    assert [m._rank for m in layers(model)] == buffers and all(
        a is b for a, b in zip((m._rank for m in layers(model)), buffers))  # filled in place
    per_layer = RankSampler(model, r_max=3, generator=0, per_layer=True)
    steps = [per_layer.step() for _ in range(20)]
    assert all(len(s) == 3 and set(s) <= {1, 2, 3} for s in steps)
    assert any(len(set(s)) > 1 for s in steps) and [m.rank for m in layers(model)] == steps[-1]
    with pytest.raises(ValueError, match="r_max <= 6"):
        RankSampler(model, r_max=7)


def test_rank_sampler_same_seed_same_ranks_across_processes():
    code = ("import torch, sys; from torch import nn; import dylora_kernels as d; "
            "m = nn.Sequential(nn.Linear(3, 3)); d.inject(m, ['0'], 8, 1.0); "
            "torch.manual_seed(int(sys.argv[1])); s = d.RankSampler(m, generator=11); "
            "print([s.step() for _ in range(30)])")
    other = subprocess.run([sys.executable, "-c", code, "1"], capture_output=True, text=True, check=True)
    torch.manual_seed(2)
    sampler = RankSampler(dylora(mlp(), ["0"], r_max=8), generator=11)
    assert other.stdout == f"{[sampler.step() for _ in range(30)]}\n"


def test_rank_sampler_draws_per_optimizer_step_index():
    model = dylora(mlp(), ["0", "2"], r_max=6)
    sampler = RankSampler(model, generator=4)
    sequential = [sampler.step() for _ in range(30)]
    assert sequential == [sampler.draw(i) for i in range(30)] and set(sequential) == set(range(1, 7))
    assert [sampler.step(7) for _ in range(3)] == [sequential[7]] * 3  # every micro-batch of step 7: one b
    assert sampler.step() == sequential[8]  # without an index: the step after the last one drawn
    resumed = RankSampler(model, generator=torch.Generator().manual_seed(4))  # e.g. from a checkpoint
    assert resumed.step(20) == sequential[20] and [m.rank for m in layers(model)] == [sequential[20]] * 2
    assert [RankSampler(model, generator=5).draw(i) for i in range(30)] != sequential
    per_layer = RankSampler(model, generator=4, per_layer=True)
    assert per_layer.step(3) == per_layer.draw(3) == [m.rank for m in layers(model)]
    for step in (-1, 1.0, True):
        with pytest.raises(ValueError, match="step must be the optimizer-step index, an int >= 0"):
            sampler.step(step)
    with pytest.raises(ValueError, match="generator must be an int seed >= 0"):
        RankSampler(model, generator=-1)


# ---------------------------------------------------------------------------------------------
# evaluate_ranks
# ---------------------------------------------------------------------------------------------
def loop(model, inputs, ranks, field=None):
    outs = {}
    with torch.no_grad():
        for b in ranks:
            set_rank(model, b)
            out = model(**inputs) if isinstance(inputs, dict) else model(inputs)
            outs[b] = out if field is None else out[field]
    return outs


def test_evaluate_ranks_equals_the_loop_sequential():
    model = dylora(mlp(), ["0", "2", "4"], r_max=6)
    x = torch.randn(9, 12)
    set_rank(model, 2)
    outs = evaluate_ranks(model, x, [1, 3, 6, 4])
    assert list(outs) == [1, 3, 6, 4]
    assert all(m.rank == 2 for m in layers(model))  # restored
    for b, ref in loop(model, x, outs).items():
        assert outs[b].shape == (9, 5) and rel_err(outs[b], ref) <= 1e-6
    assert rel_err(outs[1], outs[6]) > 1e-2  # the ranks really differ


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_evaluate_ranks_equals_the_loop_hf(kind):
    model = dylora(hf_model(kind), TARGETS[kind])
    batch = hf_batch()
    outs = evaluate_ranks(model, batch, range(1, 7))
    ref = loop(model, batch, range(1, 7), "last_hidden_state")
    assert type(outs[1]) is type(model(**batch))
    for b in range(1, 7):
        assert rel_err(outs[b].last_hidden_state, ref[b]) <= 1e-5
    assert rel_err(outs[1].last_hidden_state, outs[6].last_hidden_state) > 1e-3


def test_evaluate_ranks_splits_containers_and_restores_on_error():
    Pair = collections.namedtuple("Pair", "total mean")

    class Multi(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(6, 4)

        def forward(self, x, scale):
            y = self.proj(x) * scale
            return {"y": y, "pair": Pair(y.sum(-1), y.mean()), "note": "text"}

    model = dylora(Multi(), ["proj"], r_max=3)
    x = torch.randn(5, 2, 6)  # batch-first 3-D input: one rank per sample
    outs = evaluate_ranks(model, (x, torch.tensor(2.0)), [3, 1])
    for b in (3, 1):
        set_rank(model, b)
        with torch.no_grad():
            ref = model(x, torch.tensor(2.0))
        assert rel_err(outs[b]["y"], ref["y"]) <= 1e-6 and rel_err(outs[b]["pair"].total, ref["pair"].total) <= 1e-6
        assert outs[b]["pair"].mean is None and outs[b]["note"] is None  # not batch-first: not split
    set_rank(model, 2)
    with pytest.raises(ValueError, match="x must have shape"):
        evaluate_ranks(model, (torch.randn(5, 7), 1.0), [1, 2])  # wrong width: fails inside forward
    assert all(m.rank == 2 for m in layers(model))
    with pytest.raises(ValueError, match="distinct ints in"):
        evaluate_ranks(model, x, [1, 1])
    with pytest.raises(ValueError, match=r"in \[1, 3\]"):
        evaluate_ranks(model, x, [4])


# ---------------------------------------------------------------------------------------------
# merge / unmerge
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["mlp", "bert"])
def test_merge_matches_the_adapter_and_unmerge_restores(kind):
    base = mlp() if kind == "mlp" else hf_model("bert")
    model = dylora(copy.deepcopy(base), ["0", "2", "4"] if kind == "mlp" else TARGETS["bert"])
    inputs = torch.randn(6, 12) if kind == "mlp" else hf_batch()

    def run():
        with torch.no_grad():
            out = model(**inputs) if kind == "bert" else model(inputs)
        return out if kind == "mlp" else out.last_hidden_state

    weights = {n: p.clone() for n, p in model.named_parameters() if not p.requires_grad}
    set_rank(model, 3)
    adapted = run()
    with torch.no_grad():
        plain = base(inputs) if kind == "mlp" else base(**inputs).last_hidden_state
    assert rel_err(adapted, plain) > 1e-3
    names = merge(model, 3)
    assert len(names) in (3, 4) and all(isinstance(model.get_submodule(n), MergedLinear) for n in names)
    assert not layers(model) and set(model.state_dict()) == set(base.state_dict())  # plain keys
    assert rel_err(run(), adapted) <= 1e-5  # the adapter is not added a second time
    assert rel_err(model.get_submodule(names[0]).weight, weights[f"{names[0]}.weight"]) > 1e-4
    assert unmerge(model) == names and len(layers(model)) == len(names)
    for n, p in model.named_parameters():
        if n in weights:
            torch.testing.assert_close(p, weights[n], rtol=0, atol=1e-6)
    assert rel_err(run(), adapted) <= 1e-5
    with pytest.raises(ValueError, match="no merged DyLoRA layers"):
        unmerge(model)


def test_merge_uses_each_layers_current_rank():
    model = dylora(mlp(), ["0", "2"])
    model[0].set_rank(2)
    model[2].set_rank(5)
    x = torch.randn(3, 12)
    with torch.no_grad():
        ref = model(x)
    merge(model)
    assert [model[0].merged_rank, model[2].merged_rank] == [2, 5] and rel_err(model(x), ref) <= 1e-5


def test_merge_refuses_per_row_ranks_before_touching_weights_and_round_trips_bfloat16():
    model = dylora(mlp(), ["0", "2"]).to(torch.bfloat16)
    weights = [model[i].weight.clone() for i in (0, 2)]
    model[2].set_rank(torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="layer 2 has a per-row rank"):
        merge(model)
    assert all(torch.equal(model[i].weight, w) for i, w in zip((0, 2), weights))
    x = torch.randn(3, 12, dtype=torch.bfloat16)
    set_rank(model, 4)
    with torch.no_grad():
        ref = model(x)
        merge(model)
        assert rel_err(model(x), ref) <= 2e-2
    assert all(rel_err(model[i].weight, w) > 0.1 for i, w in zip((0, 2), weights))
    unmerge(model)
    assert all(rel_err(model[i].weight, w) <= 1e-2 for i, w in zip((0, 2), weights))


# ---------------------------------------------------------------------------------------------
# frozen prefix that really freezes
# ---------------------------------------------------------------------------------------------
def adamw_steps(guard: bool, per_layer: bool, steps=3):
    """Train with AdamW (momentum + weight decay); return the ranks of each step and snapshots of
    every layer's (lora_A, lora_B, AdamW state of lora_A) before each step and after the last."""
    model = dylora(mlp(), ["0", "2", "4"], r_max=5)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1, weight_decay=0.1)
    if guard:
        freeze_untrained_slots(opt, model)
    sampler = RankSampler(model, generator=3, per_layer=per_layer)
    x = torch.randn(8, 12, generator=torch.Generator().manual_seed(0))

    def snapshot():
        return [(m.lora_A.detach().clone(), m.lora_B.detach().clone(),
                 {k: v.clone() for k, v in opt.state[m.lora_A].items() if k != "step"})
                for m in layers(model)]

    ranks, snapshots = [], [snapshot()]
    for _ in range(steps):
        drawn = sampler.step()
        ranks.append(drawn if per_layer else [drawn] * 3)
        model(x).square().sum().backward()
        opt.step()
        opt.zero_grad()
        snapshots.append(snapshot())
    return ranks, snapshots


@pytest.mark.parametrize("per_layer", [False, True], ids=["shared", "per_layer"])
def test_freeze_untrained_slots_keeps_other_rows_bit_identical(per_layer):
    ranks, snapshots = adamw_steps(False, per_layer)
    assert any(not torch.equal(A1[torch.arange(5) != b - 1], A0[torch.arange(5) != b - 1])
               for step, step_ranks in enumerate(ranks)
               for b, (A0, _, _), (A1, _, _) in zip(step_ranks, snapshots[step], snapshots[step + 1]))
    # plain AdamW moved rows whose gradient was zero; with the hooks they stay bit-identical
    ranks, snapshots = adamw_steps(True, per_layer)
    assert per_layer == any(len(set(r)) > 1 for r in ranks)
    for step, step_ranks in enumerate(ranks):
        for b, (A0, B0, S0), (A1, B1, S1) in zip(step_ranks, snapshots[step], snapshots[step + 1]):
            other = torch.arange(5) != b - 1
            assert torch.equal(A1[other], A0[other]) and torch.equal(B1[:, other], B0[:, other])
            assert not torch.equal(A1[b - 1], A0[b - 1]) and not torch.equal(B1[:, b - 1], B0[:, b - 1])
            for key in ("exp_avg", "exp_avg_sq"):
                assert torch.equal(S1[key][other], S0.get(key, torch.zeros_like(A0))[other])


def test_freeze_untrained_slots_trains_like_adamw_on_the_trained_slot():
    (plain_ranks,), plain = adamw_steps(False, False, steps=1)
    (ranks,), guarded = adamw_steps(True, False, steps=1)
    b = ranks[0]
    assert ranks == plain_ranks
    for (A, B, _), (gA, gB, _) in zip(plain[1], guarded[1]):
        assert torch.equal(A[b - 1], gA[b - 1]) and torch.equal(B[:, b - 1], gB[:, b - 1])


def test_freeze_untrained_slots_hooks_the_optimizer_inside_a_wrapper():
    model = dylora(mlp(), ["0"], r_max=4)
    optimizer = torch.optim.AdamW([model[0].lora_A, model[0].lora_B], lr=0.1, weight_decay=0.1)
    freeze_untrained_slots(types.SimpleNamespace(optimizer=optimizer), model)  # as accelerate's wrapper
    set_rank(model, 2)
    A, B = model[0].lora_A.detach().clone(), model[0].lora_B.detach().clone()
    model(torch.randn(3, 12)).square().sum().backward()
    optimizer.step()
    other = torch.arange(4) != 1
    assert torch.equal(model[0].lora_A[other], A[other]) and torch.equal(model[0].lora_B[:, other], B[:, other])
    assert not torch.equal(model[0].lora_A[1], A[1])
    with pytest.raises(TypeError, match="needs a torch.optim.Optimizer .* got object"):
        freeze_untrained_slots(object(), model)


# ---------------------------------------------------------------------------------------------
# torch.compile
# ---------------------------------------------------------------------------------------------
def test_compile_does_not_recompile_when_the_rank_changes():
    from torch._dynamo.testing import CompileCounter, CompileCounterWithBackend

    torch._dynamo.reset()
    model = dylora(mlp(), ["0", "2", "4"], r_max=6)
    counter = CompileCounterWithBackend("aot_eager")  # AOTAutograd traces forward and backward
    step = torch.compile(lambda x: model(x).square().sum(), backend=counter, fullgraph=True)
    sampler, x = RankSampler(model, generator=0), torch.randn(5, 12)
    for _ in range(6):
        b = sampler.step()
        loss = step(x)
        loss.backward()
        assert rel_err(loss, model(x).square().sum()) <= 1e-5, b
    assert counter.frame_count == 1

    bert = dylora(hf_model("bert"), TARGETS["bert"])
    counter = CompileCounter()
    compiled = torch.compile(bert, backend=counter)
    batch = hf_batch()
    outs = {}
    for b in (1, 4, 6, 2):
        set_rank(bert, b)
        outs[b] = compiled(**batch).last_hidden_state
    frames = counter.frame_count
    for b in (3, 5, 1):
        set_rank(bert, b)
        compiled(**batch)
    assert counter.frame_count == frames
    ref = loop(bert, batch, outs, "last_hidden_state")
    assert all(rel_err(outs[b], ref[b]) <= 1e-5 for b in outs)


# ---------------------------------------------------------------------------------------------
# PEFT
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["bert", "roberta", "llama"])
def test_export_peft_loads_in_peft_with_the_same_outputs(kind, tmp_path):
    base = hf_model(kind)
    model = dylora(copy.deepcopy(base), TARGETS[kind], r_max=6, alpha=12.0)
    model.config._name_or_path = "tiny/" + kind
    batch = hf_batch()
    set_rank(model, 3)
    with torch.no_grad():
        ours = model(**batch).last_hidden_state
    export_peft(model, tmp_path, rank=3)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["target_modules"]) == (3, 12.0, sorted(TARGETS[kind]))
    assert config["base_model_name_or_path"] == "tiny/" + kind

    loaded = peft.PeftModel.from_pretrained(base, tmp_path).eval()
    with torch.no_grad():
        theirs = loaded(**batch).last_hidden_state
    assert rel_err(theirs, ours) <= 1e-5
    # PEFT's own key names for the same adapter layout are exactly ours
    reference = peft.get_peft_model(hf_model(kind), peft.LoraConfig(r=3, target_modules=TARGETS[kind]))
    saved = __import__("safetensors.torch").torch.load_file(tmp_path / "adapter_model.safetensors")
    assert set(saved) == set(peft.get_peft_model_state_dict(reference))


def test_export_peft_per_layer_ranks_and_alphas_round_trip(tmp_path):
    base = hf_model("bert")
    model = dylora(copy.deepcopy(base), TARGETS["bert"], r_max=6, alpha=12.0)
    ranks = RankSampler(model, r_min=2, generator=5, per_layer=True).step()
    layers(model)[1].alpha = 5.0
    assert len(set(ranks)) > 1
    batch = hf_batch()
    with torch.no_grad():
        ours = model(**batch).last_hidden_state
    export_peft(model, tmp_path, rank=None)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["rank_pattern"] and list(config["alpha_pattern"].values()) == [5.0]
    with torch.no_grad():
        theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()(**batch).last_hidden_state
        assert rel_err(theirs, ours) <= 1e-5
        load_peft(base, tmp_path)
        assert [m.r_max for m in layers(base)] == ranks
        assert rel_err(base(**batch).last_hidden_state, ours) <= 1e-5
    with pytest.raises(ValueError, match="needs an int rank in"):
        export_peft(model, tmp_path, rank=7)


def test_export_peft_unwraps_data_parallel_and_compiled_models(tmp_path):
    model = dylora(mlp(), ["0", "2"])
    export_peft(model, tmp_path / "plain", rank=2)
    export_peft(nn.DataParallel(torch.compile(model)), tmp_path / "wrapped", rank=2)  # names: "module._orig_mod.0"
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert (tmp_path / "wrapped" / name).read_bytes() == (tmp_path / "plain" / name).read_bytes()


@pytest.mark.parametrize("use_rslora", [False, True])
def test_load_peft_turns_a_peft_adapter_into_dylora(use_rslora, tmp_path):
    peft_model = peft.get_peft_model(hf_model("bert"), peft.LoraConfig(
        r=4, lora_alpha=6, target_modules=["query", "value"], use_rslora=use_rslora))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn_like(p) * 0.3)
    peft_model.eval().save_pretrained(tmp_path)
    batch = hf_batch()
    with torch.no_grad():
        theirs = peft_model(**batch).last_hidden_state

    model = hf_model("bert")
    names = load_peft(model, tmp_path, frozen_prefix=False)
    assert len(names) == 4 and all(m.r_max == 4 and not m.frozen_prefix for m in layers(model))
    with torch.no_grad():
        assert rel_err(model(**batch).last_hidden_state, theirs) <= 1e-5
    assert [n for n, p in model.named_parameters() if p.requires_grad] == [
        f"{n}.lora_{x}" for n in names for x in "AB"]


def test_failed_merge_changes_no_rank():
    model = dylora(mlp(), ["0"])
    model[2] = DyLoRALinear.from_linear(model[2], r_max=4, alpha=2.0)
    before = [model[0].rank, model[2].rank]
    with pytest.raises(ValueError, match=r"rank must be in \[1, r_max\] = \[1, 4\], got 6"):
        merge(model, 6)
    assert [model[0].rank, model[2].rank] == before


def test_load_peft_refuses_adapters_that_train_more_than_lora_factors(tmp_path):
    peft_model = peft.get_peft_model(hf_model("bert"), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["query", "value"], bias="all"))
    peft_model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"holds more than LoRA factors \(bias='all'"):
        load_peft(hf_model("bert"), tmp_path)


def test_evaluate_ranks_refuses_non_integer_ranks():
    model = dylora(mlp(), ["0"])
    with pytest.raises(ValueError, match="ranks must be distinct ints"):
        evaluate_ranks(model.eval(), torch.randn(2, 12), [1.5, 3])
