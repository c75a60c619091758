"""What the distributed tests run: the training loops (one process, DDP, DDP + torch.compile, FSDP2,
Trainer), ``launch`` (starts WORLD fresh processes and returns their results) and the worker entry
point it starts: ``python tests/_dist_worker.py JOB OUTDIR OPTIONS_JSON`` with torchrun's variables
(RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT) set. Each worker saves its result to OUTDIR/result<rank>.pt.
"""
from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.tensor import DTensor

import dylora_kernels
from dylora_kernels import (DyLoRALinear, RankSampler, export_peft, freeze_untrained_slots, inject, merge,
                            set_rank)
from conftest import TINY, mlp, randomise

WORLD = 2            # processes
STEPS = 4            # optimizer steps
ACCUM = 2            # micro-batches per optimizer step and process (gradient accumulation)
MICRO = 3            # samples per micro-batch
R_MAX, ALPHA, SEED = 4, 8.0, 5  # seed 5 draws b = 3, 1, 4, 4 for steps 0-3
EXPORT_RANK = 3
MODES = {"frozen_prefix": True, "full": False}
ENGINES = ("ddp", "ddp_compile", "fsdp")  # DDP, DDP under torch.compile, FSDP2 fully_shard


# --------------------------------------------------------------------------------------------
# The tiny model, its data and one training loop for every engine
# --------------------------------------------------------------------------------------------
def tiny_model(frozen_prefix: bool) -> torch.nn.Module:
    """An MLP 12 -> 20 -> 16 -> 5 with adapters on the first two Linears (random lora_B)."""
    model = mlp()
    inject(model, ["0", "2"], r_max=R_MAX, alpha=ALPHA, frozen_prefix=frozen_prefix)
    return randomise(model)


def micro_batches(step: int, rank: int = 0, world: int = 1, accum: int = 1) -> list:
    """Process ``rank``'s share of the global batch of optimizer step ``step`` (the same global batch
    for every world size) as ``accum`` micro-batches of (x, y)."""
    g = torch.Generator().manual_seed(1000 + step)
    n = WORLD * ACCUM * MICRO
    x, y = torch.randn(n, 12, generator=g), torch.randn(n, 5, generator=g)
    share = n // world
    x, y = x[rank * share:(rank + 1) * share], y[rank * share:(rank + 1) * share]
    return list(zip(x.chunk(accum), y.chunk(accum)))


def adapters(model) -> list[DyLoRALinear]:
    return [m for m in model.modules() if isinstance(m, DyLoRALinear)]


def snapshot(model, grad: bool = False) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(lora_A, lora_B) of every layer, or their gradients, whole (FSDP2 shards are gathered: a collective)."""
    def whole(p):
        p = p.grad if grad else p
        return (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
    return [(whole(m.lora_A), whole(m.lora_B)) for m in adapters(model)]


def train(engine: str, frozen_prefix: bool, rank: int = 0, world: int = 1):
    """STEPS AdamW steps (weight decay, freeze_untrained_slots, RankSampler) on the tiny model.

    engine "single": one process, the whole global batch per step. "ddp", "ddp_compile" (the DDP
    model under torch.compile) and "fsdp" (FSDP2 fully_shard): this process's share, in ACCUM
    micro-batches whose gradients are synchronised only after the last one. Returns the model, what
    ran it (the DDP / compiled wrapper, else the model) and
    {"ranks": [(step, b) for every micro-batch], "snapshots": [before step 0, after each step],
     "grads": [the synchronised gradients of each step]}.
    """
    model = tiny_model(frozen_prefix)
    run, ddp = model, None
    if engine.startswith("ddp"):
        # No broadcast of buffers (DDP's default would copy process 0's rank buffer into the others
        # at every forward): the processes' samplers alone must agree.
        run = ddp = torch.nn.parallel.DistributedDataParallel(model, broadcast_buffers=False)
    if engine == "ddp_compile":
        from torch._dynamo.testing import CompileCounterWithBackend
        counter = CompileCounterWithBackend("aot_eager")  # AOTAutograd traces forward and backward
        run = torch.compile(ddp, backend=counter)
    if engine == "fsdp":
        from torch.distributed.fsdp import fully_shard
        fully_shard(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05, weight_decay=0.1)
    freeze_untrained_slots(optimizer, model)
    sampler = RankSampler(model, generator=SEED)
    accum = 1 if engine == "single" else ACCUM
    history = {"ranks": [], "snapshots": [snapshot(model)], "grads": []}
    for step in range(STEPS):
        for i, (x, y) in enumerate(micro_batches(step, rank, world, accum)):
            history["ranks"].append((step, sampler.step(step)))  # every micro-batch asks; the step decides
            sync = i == accum - 1
            if engine == "fsdp":
                model.set_requires_gradient_sync(sync)
            with ddp.no_sync() if ddp is not None and not sync else contextlib.nullcontext():
                (F.mse_loss(run(x), y) / accum).backward()
        history["grads"].append(snapshot(model, grad=True))
        optimizer.step()
        optimizer.zero_grad()
        history["snapshots"].append(snapshot(model))
        if engine == "ddp_compile" and step == 0:
            history["frames_after_step_0"] = counter.frame_count
            torch.compiler.set_stance("fail_on_recompile")  # both micro-batch kinds seen: a recompile raises
    if engine == "ddp_compile":
        history["frames"] = counter.frame_count
        torch.compiler.set_stance("default")
    return model, run, history


def export(model, run, path: Path) -> None:
    """What a user does after training: export_peft at EXPORT_RANK (handed the wrapper that trained),
    then merge that rank into the weights; the merged state_dict is saved beside."""
    export_peft(run, path / "peft", rank=EXPORT_RANK)
    merge(model, EXPORT_RANK)
    torch.save(model.state_dict(), path / "merged.pt")


# --------------------------------------------------------------------------------------------
# Jobs (run in every worker)
# --------------------------------------------------------------------------------------------
def engine_job(outdir: Path, engine: str) -> dict:
    """Train both modes with ``engine``; process 0 exports each. Returns {mode: train() history}."""
    rank, world = dist.get_rank(), dist.get_world_size()
    results = {}
    for mode, frozen_prefix in MODES.items():
        model, run, results[mode] = train(engine, frozen_prefix, rank, world)
        if engine == "fsdp":
            # Sharded adapters cannot be exported as they are (export_peft says so): gather the
            # full state dict on every process, load it into an unsharded copy on process 0.
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
            if rank == 0:
                try:
                    export_peft(model, outdir / "refused", rank=EXPORT_RANK)
                except ValueError as e:
                    results[mode]["export_error"] = str(e)
            state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
            if rank == 0:
                model = run = tiny_model(frozen_prefix)
                model.load_state_dict(state)
        if rank == 0:
            export(model, run, outdir / mode)
        dist.barrier()
    return results


def trainer_job(outdir: Path, freeze_untrained: bool = True) -> dict:
    """A tiny BERT classifier trained by transformers.Trainer with DyLoRACallback (ACCUM micro-batches
    per step, weight decay), in one process or under torch.distributed (then DDP, as with torchrun).

    Returns the rank seen by every training forward, the adapters and AdamW state before and after
    each step, evaluate() after training (the callback's per-rank metrics), the Trainer's own
    eval_loss at each rank set by hand, and the eval loss at each rank computed directly."""
    import transformers
    from dylora_kernels.trainer import DyLoRACallback

    torch.manual_seed(0)
    config = transformers.BertConfig(pad_token_id=1, num_labels=3, hidden_dropout_prob=0.0,
                                     attention_probs_dropout_prob=0.0, **TINY)
    model = transformers.BertForSequenceClassification(config)
    inject(model, ["query", "value"], r_max=R_MAX, alpha=ALPHA)
    randomise(model)
    g = torch.Generator().manual_seed(7)

    def dataset(n):
        return [{"input_ids": torch.randint(2, 100, (8,), generator=g), "attention_mask": torch.ones(8, dtype=torch.long),
                 "labels": torch.randint(0, 3, (), generator=g)} for _ in range(n)]

    class Recorder(transformers.TrainerCallback):
        def __init__(self):
            self.step, self.forwards, self.before, self.after = None, [], [], []

        def state(self, optimizer):
            inner = optimizer.optimizer  # accelerate's AcceleratedOptimizer around torch's AdamW
            return [(m.rank, m.lora_A.detach().clone(), m.lora_B.detach().clone(),
                     inner.state.get(m.lora_A, {}).get("exp_avg", torch.zeros_like(m.lora_A)).clone())
                    for m in adapters(model)]

        def on_step_begin(self, args, state, control, optimizer=None, **kwargs):
            self.step = state.global_step
            self.before.append(self.state(optimizer))

        def on_step_end(self, args, state, control, optimizer=None, **kwargs):
            self.after.append(self.state(optimizer))

    recorder = Recorder()
    adapters(model)[0].register_forward_pre_hook(
        lambda m, args: recorder.forwards.append((recorder.step, m.rank)) if m.training else None)
    args = transformers.TrainingArguments(
        output_dir=str(outdir / "trainer"), use_cpu=True, report_to="none", save_strategy="no",
        disable_tqdm=True, seed=SEED, max_steps=STEPS, per_device_train_batch_size=MICRO,
        gradient_accumulation_steps=ACCUM, per_device_eval_batch_size=4, learning_rate=0.05,
        weight_decay=0.1, lr_scheduler_type="constant", logging_steps=1,
        ddp_broadcast_buffers=False)  # the processes' samplers alone must agree
    eval_set = dataset(8)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=dataset(WORLD * ACCUM * MICRO * STEPS),
                                   eval_dataset=eval_set,
                                   callbacks=[DyLoRACallback(freeze_untrained=freeze_untrained), recorder])
    trainer.train()
    final_rank = [m.rank for m in adapters(model)]
    every_rank = trainer.evaluate()
    at_rank, direct = {}, {}
    whole = transformers.default_data_collator(eval_set)
    for b in range(1, R_MAX + 1):
        set_rank(model, b)
        at_rank[b] = trainer.evaluate()["eval_loss"]  # the Trainer's own loop at rank b
        with torch.no_grad():
            direct[b] = model.eval()(**whole).loss.item()  # the whole evaluation set in this process
    return {"forwards": recorder.forwards, "before": recorder.before, "after": recorder.after,
            "final_rank": final_rank, "every_rank": every_rank, "at_rank": at_rank, "direct": direct,
            "log_history": trainer.state.log_history}


def seeds_job(outdir: Path) -> dict:
    """RankSampler's one collective: generator=None takes process 0's seed; different seeds are refused."""
    model = tiny_model(True)
    torch.manual_seed(100 + dist.get_rank())  # a different default seed on each process
    result = {"none": [RankSampler(model).draw(step) for step in range(20)]}
    try:
        RankSampler(model, generator=dist.get_rank())
    except ValueError as e:
        result["error"] = str(e)
    return result


JOBS = {"engine": engine_job, "trainer": trainer_job, "seeds": seeds_job}


# --------------------------------------------------------------------------------------------
# Launching
# --------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(job: str, outdir: Path, timeout: float = 120, **options) -> list:
    """Run JOBS[job](outdir, **options) in WORLD fresh processes (gloo, CPU); return their results
    in rank order. A worker that fails (or a run past ``timeout`` seconds) kills the others and
    raises with the failing worker's output, traceback included."""
    package_root = str(Path(dylora_kernels.__file__).resolve().parents[1])  # the tree this test imported
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()),
           "WORLD_SIZE": str(WORLD), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([package_root, str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    logs = [outdir / f"worker{rank}.log" for rank in range(WORLD)]
    procs = []
    for rank, log in enumerate(logs):
        with open(log, "w") as out:
            procs.append(subprocess.Popen(
                [sys.executable, __file__, job, str(outdir), json.dumps(options)],
                env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)}, stdout=out, stderr=subprocess.STDOUT))
    deadline = time.monotonic() + timeout
    try:
        while True:
            codes = [p.poll() for p in procs]
            failed = [r for r, c in enumerate(codes) if c not in (None, 0)]
            if failed or time.monotonic() > deadline:
                why = (f"worker {failed[0]} exited with {codes[failed[0]]}" if failed
                       else f"the workers ran past {timeout} s and were killed")
                rank = failed[0] if failed else 0
                raise AssertionError(f"{job}: {why}; its output:\n{logs[rank].read_text()[-6000:]}")
            if all(c == 0 for c in codes):
                break
            time.sleep(0.05)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return [torch.load(outdir / f"result{rank}.pt", weights_only=False) for rank in range(WORLD)]


def _worker(job: str, outdir: str, options: str) -> None:
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    try:
        result = JOBS[job](Path(outdir), **json.loads(options))
        torch.save(result, Path(outdir) / f"result{dist.get_rank()}.pt")
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    _worker(*sys.argv[1:])
    # The result is saved and the process group destroyed: skip the interpreter's teardown. A worker once aborted
    # with "terminate called without an active exception" (SIGABRT, 1 suite run in ~20 on the 2-core VM; where
    # in the process is not known); torch/gloo threads alive at interpreter exit are a known source of that
    # message, and exiting here leaves them no teardown to abort in. A failing job still raises above.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
