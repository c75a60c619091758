"""End to end: one DyLoRA training step (forward + backward + AdamW, a rank drawn per step, frozen-prefix
mode) on the paper's own models, built from transformers configs (random weights, nothing downloaded).

    python bench/bench_e2e.py --quick        # CPU, small stacks, eager (≲ 1-2 min on 2 cores)
    python bench/bench_e2e.py --cpu-compile  # CPU, torch.compile of a 2-layer RoBERTa (a few minutes)
    python bench/bench_e2e.py --cpu-paper    # CPU, RoBERTa-base (12 x 768) at 8 x 128 and 1 x 32 (eager)
    python bench/bench_e2e.py --gpu-quick    # CUDA, the paper's sizes, few steps (bench/gpu_check.sh)
    python bench/bench_e2e.py --paper        # CUDA, the paper's sizes, every variant, more steps

Models: RoBERTa-base with a classification head (adapters on query/value, r_max 8, alpha 16; the head
trains too), GPT-2 medium (24 x 1024, adapters on c_attn: transformers' Conv1D, weight stored (K, N)),
and a LLaMA-style stack (hidden 4096, adapters on q/k/v/o, r_max 64, bf16) where the low-rank GEMMs are
large. Variants, interleaved round by round in one run (the order rotates each round):

    peft            PEFT LoRA at r = r_max (lora_dropout 0): the cost of plain LoRA
    naive           the official DyLoRA recipe's math (DESIGN.md §1): A[:b], B[:, :b] sliced on the host,
                    the prefix detached + cat (frozen-prefix), both factors times sqrt(r/b), times alpha/r
    dylora          this package, eager; the rank written once per step into the model-wide rank tensor
                    (RankSampler(shared=True))
    dylora-compile  this package under torch.compile (one graph for every rank: no recompilation)
    peft-compile    PEFT under torch.compile (its rank never changes)
    dylora-graph    CUDA: the whole step captured ONCE in a CUDA graph (capture_training_step), replayed
                    with a new rank each step written into the rank tensor on the GPU
    peft-graph      CUDA: PEFT's step captured the same way

Every variant trains the same adapters from the same weights with AdamW (lr 1e-4; the frozen base weights
are shared between the variants' models, not copied); DyLoRA variants draw the same rank sequence. Reported
per variant: median step ms (after warm-up, which includes compilation/capture), tokens/s, peak memory (CUDA:
the most allocated during one step above its start, for a graph the memory its capture kept; CPU: the most
bytes of tensors alive between ops during one eager step, temporaries inside one op not seen; compiled CPU
variants are not measured), the ratio over PEFT eager, and the median process CPU time per step and its
ratio (on a shared machine the CPU time a step used is steadier than its wall time; with more than one
thread it includes threads that spin waiting). Results: <out>/bench_e2e.json and .md, and a
second table: the host cost of one rank change (RankSampler.step) per layer buffer vs the shared tensor.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import os
import platform
import statistics
import sys
import time
import weakref
from datetime import datetime, timezone

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from dylora_kernels import RankSampler, inject
from dylora_kernels.models import capture_training_step
from dylora_kernels.nn import DyLoRALinear, is_conv1d

LR, SEED = 1e-4, 0
TARGETS = {"roberta": ["query", "value"], "gpt2": ["c_attn"], "llama": ["q_proj", "k_proj", "v_proj", "o_proj"]}
HEADS = {"roberta": "classifier"}  # trainable heads (besides the adapters)


@dataclasses.dataclass
class Case:
    model: str                 # roberta | gpt2 | llama
    layers: int
    batch: int
    seq: int
    r_max: int = 8
    alpha: float = 16.0
    dtype: str = "float32"     # the model's parameters
    amp: str | None = None     # CUDA autocast dtype
    hidden: int | None = None  # None: the paper model's own
    vocab: int | None = None
    threads: int | None = None  # CPU torch threads for this case (None: as set)
    variants: tuple = ("peft", "naive", "dylora")
    rounds: int | None = None  # timed rounds (None: the size's default)
    note: str = ""

    @property
    def label(self) -> str:
        name = {"roberta": "RoBERTa-base", "gpt2": "GPT-2 medium", "llama": "LLaMA-style"}[self.model]
        size = f"{self.layers} layers" + (f", hidden {self.hidden}" if self.hidden else "") + (
            f", vocab {self.vocab}" if self.vocab else "")
        prec = self.dtype.removeprefix("float") if not self.amp else f"autocast {self.amp}"
        prec = {"32": "fp32", "bfloat16": "bf16"}.get(prec, prec)
        threads = f", {self.threads} thread{'s' * (self.threads > 1)}" if self.threads else ""
        return f"{name} ({size}) {self.batch}x{self.seq} {prec}{threads}"


EAGER = ("peft", "naive", "dylora")
COMPILED = ("peft", "dylora", "dylora-compile", "peft-compile")
GPU_VARIANTS = ("peft", "naive", "dylora", "dylora-graph", "peft-graph", "dylora-compile", "peft-compile")
EAGER_GPU = ("peft", "naive", "dylora", "dylora-graph", "peft-graph")
SIZES = {
    # CPU, ≲ 1-2 min on 2 idle cores, eager: the paper models' widths with fewer layers (and a smaller
    # vocabulary for the two language models, whose LM head would dominate), small batches.
    "quick": [Case("roberta", 2, 8, 128, variants=EAGER, rounds=8),
              Case("roberta", 2, 1, 32, threads=1, variants=EAGER, rounds=20),
              Case("gpt2", 2, 2, 128, vocab=8192, variants=EAGER, rounds=8),
              Case("llama", 1, 1, 64, r_max=64, hidden=2048, vocab=1024, variants=EAGER, rounds=8, note="fp32 on CPU")],
    # CPU, torch.compile (inductor; each compile takes a minute or more on 2 cores): 2 RoBERTa layers.
    "cpu-compile": [Case("roberta", 2, 2, 128, variants=COMPILED, rounds=10)],
    # CPU, the paper's RoBERTa-base: the 8 x 128 (2 threads) and 1 x 32 (1 thread) eager settings.
    "cpu-paper": [Case("roberta", 12, 8, 128, variants=EAGER, rounds=6),
                  Case("roberta", 12, 1, 32, threads=1, variants=EAGER, rounds=20)],
    # CUDA, a short session: the paper sizes, compile only for RoBERTa (each compile costs ~a minute).
    # The eager/captured cases first: a run cut by gpu_check.sh's timeout keeps them.
    "gpu-quick": [Case("gpt2", 24, 8, 512, amp="bfloat16", variants=EAGER_GPU),
                  Case("llama", 2, 4, 1024, r_max=64, dtype="bfloat16", variants=EAGER_GPU),
                  Case("roberta", 12, 16, 512, amp="bfloat16", variants=GPU_VARIANTS)],
    "paper": [Case("roberta", 12, 16, 512, variants=GPU_VARIANTS),
              Case("roberta", 12, 16, 512, amp="bfloat16", variants=GPU_VARIANTS),
              Case("roberta", 12, 16, 128, amp="bfloat16", variants=GPU_VARIANTS),
              Case("gpt2", 24, 8, 512, amp="bfloat16", variants=GPU_VARIANTS),
              Case("llama", 4, 4, 2048, r_max=64, dtype="bfloat16", variants=GPU_VARIANTS)],
}
ROUNDS = {"quick": (2, 8), "cpu-compile": (2, 10), "cpu-paper": (2, 6), "gpu-quick": (3, 10), "paper": (5, 30)}  # (warm-up, timed)


# ----------------------------------------------------------------------------------------------------
# Models and the naive recipe
# ----------------------------------------------------------------------------------------------------
def build_base(case: Case, device="cpu") -> nn.Module:
    """The case's model, its weights initialised directly on ``device`` (no host copy of the large stacks)."""
    import transformers

    torch.manual_seed(SEED)
    with torch.device(device):
        return _build(transformers, case).to(getattr(torch, case.dtype))


def _build(transformers, case: Case) -> nn.Module:
    if case.model == "roberta":
        extra = {"hidden_size": case.hidden, "num_attention_heads": case.hidden // 64,
                 "intermediate_size": 4 * case.hidden} if case.hidden else {}
        config = transformers.RobertaConfig(num_hidden_layers=case.layers, num_labels=2, max_position_embeddings=514,
                                            **({"vocab_size": case.vocab} if case.vocab else {}), **extra)
        config.problem_type = "single_label_classification"  # else set by the first forward: a recompile
        model = transformers.RobertaForSequenceClassification(config)
    elif case.model == "gpt2":
        config = transformers.GPT2Config(n_embd=case.hidden or 1024, n_layer=case.layers, n_head=(case.hidden or 1024) // 64,
                                         n_positions=1024, use_cache=False,
                                         **({"vocab_size": case.vocab} if case.vocab else {}))
        model = transformers.GPT2LMHeadModel(config)
    else:
        hidden = case.hidden or 4096
        config = transformers.LlamaConfig(hidden_size=hidden, intermediate_size=hidden * 11008 // 4096,
                                          num_hidden_layers=case.layers, num_attention_heads=hidden // 128,
                                          num_key_value_heads=hidden // 128, vocab_size=case.vocab or 32000,
                                          max_position_embeddings=4096, use_cache=False)
        model = transformers.LlamaForCausalLM(config)
    return model


def batch_for(case: Case, device) -> dict:
    g = torch.Generator().manual_seed(SEED + 1)
    vocab = case.vocab or {"roberta": 50265, "gpt2": 50257, "llama": 32000}[case.model]
    ids = torch.randint(3, vocab, (case.batch, case.seq), generator=g)
    # No padding: every token is real, so no attention mask (the same attention in every variant).
    labels = torch.randint(0, 2, (case.batch,), generator=g) if case.model == "roberta" else ids
    return {"input_ids": ids.to(device), "labels": labels.to(device)}


class NaiveDyLoRA(nn.Module):
    """The official DyLoRA recipe's math (DESIGN.md §1), as its loralib layer computes it: the base layer,
    plus x·(s·A')ᵀ·(s·B')ᵀ·(alpha/r) with A' = A[:b], B' = B[:, :b] sliced by a host int b, in frozen-prefix
    mode the prefix rows/columns detached and concatenated with row/column b-1, and s = sqrt(r/b) on both
    factors (net alpha/b). The rank is a Python int read from ``state`` (one per model)."""

    def __init__(self, base: nn.Module, r_max: int, alpha: float, state: dict):
        super().__init__()
        weight = base.weight
        K, N = weight.shape if is_conv1d(base) else weight.shape[::-1]
        self.base, self.r_max, self.alpha, self.state = base, r_max, alpha, state
        self.lora_A = nn.Parameter(torch.empty(r_max, K, dtype=weight.dtype, device=weight.device))
        self.lora_B = nn.Parameter(torch.zeros(N, r_max, dtype=weight.dtype, device=weight.device))

    def forward(self, x):
        b, r = self.state["b"], self.r_max
        A, B = self.lora_A[:b], self.lora_B[:, :b]
        A = torch.cat([A[:b - 1].detach(), A[b - 1:]])
        B = torch.cat([B[:, :b - 1].detach(), B[:, b - 1:]], dim=1)
        s = math.sqrt(r / b)
        return self.base(x) + (x @ (A * s).t()) @ (B * s).t() * (self.alpha / r)


def _copy_sharing_frozen(base: nn.Module, head: str | None) -> nn.Module:
    """A deep copy whose frozen base weights are the base model's own tensors (only the head is copied)."""
    memo = {id(p): p for name, p in base.named_parameters() if not (head and name.startswith(head + "."))}
    return copy.deepcopy(base, memo)


def adapter_pairs(model: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(lora_A (r, K), lora_B (N, r)) of every adapted layer, in module order, for any variant's model."""
    pairs = [(m.lora_A, m.lora_B) for m in model.modules() if isinstance(getattr(m, "lora_A", None), nn.Parameter)]
    return pairs or [(m.lora_A["default"].weight, m.lora_B["default"].weight) for m in model.modules()
                     if isinstance(getattr(m, "lora_A", None), nn.ModuleDict)]  # PEFT: ModuleDicts of nn.Linear


def _same_adapters(model: nn.Module, A_B: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Give the adapters (in module order) the reference values: every variant starts equal."""
    pairs = adapter_pairs(model)
    assert len(pairs) == len(A_B), (len(pairs), len(A_B))
    with torch.no_grad():
        for (A, B), (A0, B0) in zip(pairs, A_B):
            A.copy_(A0)
            B.copy_(B0)


class Variant:
    """One model + optimizer + step function; ``run()`` does one training step (the rank drawn first)."""

    def __init__(self, name: str, case: Case, base: nn.Module, batch: dict, init: list, device):
        import peft

        self.name, self.case, self.batch, self.device = name, case, batch, device
        self.step_index, self.error, self.pool_mib = 0, None, None
        model = _copy_sharing_frozen(base, HEADS.get(case.model))
        if name.startswith("peft"):
            config = peft.LoraConfig(r=case.r_max, lora_alpha=case.alpha, lora_dropout=0.0,
                                     target_modules=TARGETS[case.model])
            model = peft.get_peft_model(model, config, autocast_adapter_dtype=False)  # adapters in the model dtype
        elif name == "naive":
            self.state = {"b": case.r_max}
            for mod_name, m in list(model.named_modules()):
                if mod_name.rpartition(".")[2] in TARGETS[case.model]:
                    parent, _, child = mod_name.rpartition(".")
                    setattr(model.get_submodule(parent), child, NaiveDyLoRA(m, case.r_max, case.alpha, self.state))
            for p_name, p in model.named_parameters():
                p.requires_grad_("lora_" in p_name)
        else:
            inject(model, TARGETS[case.model], r_max=case.r_max, alpha=case.alpha)
        if case.model in HEADS:
            getattr(model.base_model.model if name.startswith("peft") else model, HEADS[case.model]).requires_grad_(True)
        _same_adapters(model, init)
        self.model = model.to(device).train()
        params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=LR, capturable=name.endswith("-graph"))
        self.sampler = RankSampler(model, generator=SEED, shared=True) if name.startswith("dylora") else None
        # naive: the same draws (RankSampler's, over a stand-in layer: the naive layers are not DyLoRALinear)
        self.draw = (RankSampler(DyLoRALinear(1, 1, r_max=case.r_max, alpha=1.0), generator=SEED).draw
                     if name == "naive" else None)
        self.forward = torch.compile(model) if name.endswith("-compile") else model
        self.graph = None

    def _set_rank(self, rank: int | None) -> None:
        """The rank of this step: drawn (the same sequence in every DyLoRA variant), or ``rank``."""
        if self.sampler is not None:
            if rank is None:
                self.sampler.step(self.step_index)  # one fill of the model-wide rank tensor
            else:
                self.sampler.rank.fill_(rank)
        elif self.draw is not None:
            self.state["b"] = self.draw(self.step_index) if rank is None else rank
        self.step_index += 1

    def _loss(self):
        if self.case.amp:
            with torch.autocast("cuda", dtype=getattr(torch, self.case.amp)):
                return self.forward(**self.batch).loss
        return self.forward(**self.batch).loss

    def _fwd_bwd_opt(self):
        loss = self._loss()
        loss.backward()
        self.optimizer.step()
        return loss.detach()

    def run(self, rank: int | None = None) -> None:
        self._set_rank(rank)
        if self.name.endswith("-graph"):
            if self.graph is None:  # the first call: warm-up steps and the capture (counted as warm-up)
                before = torch.cuda.memory_allocated()
                self.graph, self.loss = capture_training_step(self._fwd_bwd_opt, self.optimizer, warmup=3)
                self.pool_mib = (torch.cuda.memory_allocated() - before) / 2**20
            self.graph.replay()
        else:
            self.loss = self._fwd_bwd_opt()
            self.optimizer.zero_grad(set_to_none=True)


# ----------------------------------------------------------------------------------------------------
# Timing and memory
# ----------------------------------------------------------------------------------------------------
def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


class LiveTensorBytes(TorchDispatchMode):
    """The most bytes of tensor storage alive at once, counted at op boundaries: a storage an op returns
    that none of its inputs holds is new; it is subtracted when freed (CPU peak memory of one step)."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self.tracked: set[int] = set()

    def _freed(self, key: int, nbytes: int) -> None:
        self.live -= nbytes
        self.tracked.discard(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {id(t.untyped_storage()) for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            key = id(storage)
            if key in inputs or key in self.tracked:
                continue
            self.tracked.add(key)
            self.live += storage.nbytes()
            weakref.finalize(storage, self._freed, key, storage.nbytes())
        self.peak = max(self.peak, self.live)
        return out


def peak_mib(variant: Variant) -> float | None:
    device = variant.device
    if variant.name.endswith("-graph"):
        return variant.pool_mib
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        variant.run()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - start) / 2**20
    if variant.name.endswith("-compile"):
        return None
    with LiveTensorBytes() as counter:
        variant.run()
    return counter.peak / 2**20


def _compiles() -> int:
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def initial_adapters(case: Case, base: nn.Module, device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The adapters every variant starts from: random A (Kaiming-uniform's range, as LoRA) and random B
    (not LoRA's zeros, so the low-rank path is really computed; the speed does not depend on it)."""
    g = torch.Generator().manual_seed(SEED + 2)
    init = []
    for name, m in base.named_modules():
        if name.rpartition(".")[2] in TARGETS[case.model]:
            K, N = m.weight.shape if is_conv1d(m) else m.weight.shape[::-1]
            init.append(((torch.rand(case.r_max, K, generator=g) * 2 - 1) / math.sqrt(K),
                         torch.randn(N, case.r_max, generator=g) * 0.01))
    return [(A.to(device, getattr(torch, case.dtype)), B.to(device, getattr(torch, case.dtype))) for A, B in init]


def bench_case(case: Case, device, warmup: int, rounds: int, block: int, progress) -> list[dict]:
    threads = torch.get_num_threads()
    if case.threads and device.type == "cpu":
        torch.set_num_threads(case.threads)
    try:
        base = build_base(case, device)
        batch = batch_for(case, device)
        init = initial_adapters(case, base, device)
        variants = []
        for name in case.variants:
            if name.endswith("-graph") and device.type != "cuda":
                continue
            variants.append(Variant(name, case, base, batch, init, device))
        times = {v.name: [] for v in variants}
        cpu_times = {v.name: [] for v in variants}  # process CPU time: what the step cost, whatever else runs
        compiled_in_warmup = 0
        for rnd in range(warmup + rounds):
            order = variants[rnd % len(variants):] + variants[:rnd % len(variants)]
            for v in order:
                if v.error:
                    continue
                try:
                    _sync(device)
                    start, cpu_start = time.perf_counter(), time.process_time()
                    for _ in range(block):
                        v.run()
                    _sync(device)
                    if rnd >= warmup:
                        times[v.name].append((time.perf_counter() - start) / block)
                        cpu_times[v.name].append((time.process_time() - cpu_start) / block)
                except Exception as error:  # a variant that cannot run here (e.g. capture) is reported, not fatal
                    v.error = f"{type(error).__name__}: {str(error).splitlines()[0][:160]}"
            if rnd == warmup - 1:
                compiled_in_warmup = _compiles()
            progress.update(1)
        recompiles = _compiles()
        rows = []
        tokens = case.batch * case.seq
        for v in variants:
            row = {"case": case.label, "model": case.model, "variant": v.name, "error": v.error,
                   "batch": case.batch, "seq": case.seq, "layers": case.layers, "dtype": case.dtype, "amp": case.amp,
                   "r_max": case.r_max, "note": case.note}
            if not v.error and times[v.name]:
                ms = statistics.median(times[v.name]) * 1e3
                row.update(step_ms=ms, tokens_per_s=tokens / ms * 1e3, step_ms_all=[t * 1e3 for t in times[v.name]],
                           cpu_ms=statistics.median(cpu_times[v.name]) * 1e3, loss=float(v.loss))
                try:
                    row["peak_mib"] = peak_mib(v)
                except Exception as error:
                    row["peak_mib"], row["peak_error"] = None, f"{type(error).__name__}: {error}"[:160]
            if v.name.endswith("-compile"):  # dynamo's counter, shared by the case's compiled variants
                row["graphs_compiled_in_warmup"] = compiled_in_warmup
                row["graphs_compiled_after_warmup"] = recompiles - compiled_in_warmup
            rows.append(row)
        peft_ms = next((r.get("step_ms") for r in rows if r["variant"] == "peft"), None)
        peft_cpu = next((r.get("cpu_ms") for r in rows if r["variant"] == "peft"), None)
        for r in rows:
            if peft_ms and r.get("step_ms"):
                r["ratio_vs_peft"] = r["step_ms"] / peft_ms
                r["cpu_ratio_vs_peft"] = r["cpu_ms"] / peft_cpu
        del variants, base
        return rows
    finally:
        torch.set_num_threads(threads)


def rank_change_cost(layer_counts=(24, 128), calls=2000) -> list[dict]:
    """Host µs of one RankSampler.step(): every layer's buffer set vs one write into the shared tensor.
    The layers are small (the cost does not depend on their size); 24 = RoBERTa-base q/v or GPT-2 medium
    c_attn, 128 = a 32-layer LLaMA's q/k/v/o."""
    rows = []
    for n in layer_counts:
        model = nn.Sequential(*[DyLoRALinear(16, 16, r_max=8, alpha=16.0) for _ in range(n)])
        result = {"layers": n}
        for shared in (False, True):
            sampler = RankSampler(model, generator=SEED, shared=shared)
            for i in range(100):
                sampler.step(i)
            samples = []
            for rep in range(5):
                start = time.perf_counter()
                for i in range(calls):
                    sampler.step(i)
                samples.append((time.perf_counter() - start) / calls * 1e6)
            result["shared_us" if shared else "per_layer_us"] = statistics.median(samples)
        draw = RankSampler(model, generator=SEED).draw
        start = time.perf_counter()
        for i in range(calls):
            draw(i)
        result["draw_only_us"] = (time.perf_counter() - start) / calls * 1e6
        rows.append(result)
    return rows


# ----------------------------------------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------------------------------------
def markdown(meta: dict, rows: list[dict], rank_rows: list[dict]) -> str:
    lines = [f"{meta['machine']}, torch {meta['torch']}, {meta['date']}; `{meta['command']}`; 1-min load average "
             f"{meta['load_average_start']:.1f} at the start, {meta['load_average_now']:.1f} at the end; "
             f"median over n interleaved steps after {meta['warmup']} warm-up rounds; AdamW, "
             "frozen-prefix, rank drawn per step (DyLoRA variants), PEFT at r = r_max", "",
             "| model, batch x seq, precision | variant | n | step ms | tokens/s | peak MiB | × PEFT eager | "
             "CPU-time ms | CPU-time × PEFT | note |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r.get("error") or "step_ms" not in r:
            lines.append(f"| {r['case']} | {r['variant']} | - | - | - | - | - | - | - | {r.get('error') or 'no timed step'} |")
            continue
        peak = "-" if r.get("peak_mib") is None else f"{r['peak_mib']:.0f}"
        notes = [r["note"]] if r["note"] else []
        if "graphs_compiled_after_warmup" in r:
            notes.append(f"graphs compiled: {r['graphs_compiled_in_warmup']} in warm-up, "
                         f"{r['graphs_compiled_after_warmup']} after")
        if r["variant"].endswith("-graph"):
            notes.append("peak = the capture's memory pool")
        lines.append(f"| {r['case']} | {r['variant']} | {len(r['step_ms_all'])} | {r['step_ms']:.2f} | {r['tokens_per_s']:.0f} | {peak} | "
                     f"{r.get('ratio_vs_peft', float('nan')):.3f} | {r['cpu_ms']:.2f} | "
                     f"{r.get('cpu_ratio_vs_peft', float('nan')):.3f} | {'; '.join(notes)} |")
    if rank_rows:
        lines += ["", "Host cost of one rank change, `RankSampler.step()` (µs; median of 5 × 2000 calls):", "",
                  "| DyLoRA layers | every layer's buffer set (shared=False) | one shared tensor filled (shared=True) | the draw alone |",
                  "|---|---|---|---|"]
        lines += [f"| {r['layers']} | {r['per_layer_us']:.1f} | {r['shared_us']:.1f} | {r['draw_only_us']:.1f} |"
                  for r in rank_rows]
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    size = parser.add_mutually_exclusive_group()
    for name in SIZES:
        size.add_argument(f"--{name}", dest="size", action="store_const", const=name)
    parser.add_argument("--models", default=None, help="comma-separated subset of roberta,gpt2,llama")
    parser.add_argument("--variants", default=None, help="comma-separated subset of the variants")
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds (default: per size)")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up rounds (default: per size)")
    parser.add_argument("--block", type=int, default=None, help="steps per timed block (default: 1 on CPU, 3 on CUDA)")
    parser.add_argument("--threads", type=int, default=None, help="CPU torch threads (default: as set)")
    parser.add_argument("--machine", default=None, help="machine name for the table (default: from the platform)")
    parser.add_argument("--out", default=os.environ.get("OUT") or os.path.join(os.path.dirname(os.path.abspath(__file__)), "out"))
    args = parser.parse_args()
    size = args.size or ("gpu-quick" if torch.cuda.is_available() else "quick")
    device = torch.device("cuda" if size in ("gpu-quick", "paper") else "cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit(f"--{size} needs a CUDA device")
    if args.threads:
        torch.set_num_threads(args.threads)
    cases = SIZES[size]
    if args.models:
        cases = [c for c in cases if c.model in args.models.split(",")]
    if args.variants:
        cases = [dataclasses.replace(c, variants=tuple(v for v in c.variants if v in args.variants.split(",")))
                 for c in cases]
    warmup, rounds = ROUNDS[size]
    warmup, rounds = args.warmup or warmup, args.rounds or rounds
    block = args.block or (3 if device.type == "cuda" else 1)
    machine = args.machine or (torch.cuda.get_device_name() if device.type == "cuda"
                               else f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads")
    command = "python bench/bench_e2e.py " + " ".join(sys.argv[1:])
    meta = {"machine": machine, "torch": torch.__version__, "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "command": command.strip(), "size": size, "warmup": warmup, "rounds": rounds, "block": block,
            "threads": torch.get_num_threads(), "lr": LR, "load_average_start": os.getloadavg()[0]}
    from tqdm import tqdm

    os.makedirs(args.out, exist_ok=True)

    def write(rows, rank_rows):  # after each case: a run cut short keeps what it finished
        meta["load_average_now"] = os.getloadavg()[0]
        with open(os.path.join(args.out, "bench_e2e.json"), "w") as f:
            json.dump({"meta": meta, "rows": rows, "rank_change": rank_rows}, f, indent=1)
        table = markdown(meta, rows, rank_rows)
        with open(os.path.join(args.out, "bench_e2e.md"), "w") as f:
            f.write(table)
        return table

    rows = []
    total = sum(warmup + (args.rounds or c.rounds or rounds) for c in cases)
    with tqdm(total=total, desc="rounds", file=sys.stderr) as progress:
        for case in cases:
            progress.set_postfix_str(case.label)
            rows += bench_case(case, device, warmup, args.rounds or case.rounds or rounds, block, progress)
            torch._dynamo.reset()
            write(rows, [])
    print(write(rows, rank_change_cost()))


if __name__ == "__main__":
    main()
