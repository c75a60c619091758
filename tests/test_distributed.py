"""DyLoRA under torch.distributed on CPU (gloo, 2 processes spawned per run, a tiny model, a few steps):
DDP, DDP + torch.compile and FSDP2 fully_shard, with gradient accumulation over 2 micro-batches, in
frozen-prefix and full mode, against a single-process run over the combined batch.

Each engine runs once (a module-scoped fixture); the tests below read its results. The code the
workers run is tests/_dist_worker.py."""
import json

import pytest
import torch
from safetensors.torch import load_file

from _dist_worker import ENGINES, EXPORT_RANK, MODES, STEPS, export, launch, train
from conftest import rel_err

pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """{mode: history} of the single-process run over the whole batch, exported as process 0 does."""
    outdir = tmp_path_factory.mktemp("single")
    histories = {}
    for mode, frozen_prefix in MODES.items():
        model, run, histories[mode] = train("single", frozen_prefix)
        export(model, run, outdir / mode)
    return histories, outdir


@pytest.fixture(scope="module", params=ENGINES)
def engine(request, tmp_path_factory):
    """(engine, [the results of process 0 and 1], the directory process 0 exported into)."""
    outdir = tmp_path_factory.mktemp(request.param)
    return request.param, launch("engine", outdir, timeout=120, engine=request.param), outdir


def trained_slots(b: int, frozen_prefix: bool) -> torch.Tensor:
    slots = torch.arange(4)
    return slots == b - 1 if frozen_prefix else slots < b


def test_every_micro_batch_and_process_draws_the_steps_rank(engine, single):
    name, results, _ = engine
    for mode in MODES:
        ranks = results[0][mode]["ranks"]
        assert results[1][mode]["ranks"] == ranks
        assert [step for step, _ in ranks] == [s for s in range(STEPS) for _ in range(2)]  # 2 micro-batches
        per_step = dict(ranks)
        assert all(b == per_step[step] for step, b in ranks)
        assert list(per_step.values()) == [b for _, b in single[0][mode]["ranks"]]
        assert len(set(per_step.values())) >= 3  # the rank really changes between steps


def test_gradients_equal_to_one_process_over_the_combined_batch(engine, single):
    name, results, _ = engine
    for mode in MODES:
        for result in results:
            for step in range(STEPS):
                for ours, ref in zip(result[mode]["grads"][step], single[0][mode]["grads"][step]):
                    assert all(rel_err(g, r) <= 1e-5 for g, r in zip(ours, ref)), (name, mode, step)


def test_adapters_bit_identical_across_processes_and_equal_to_one_process(engine, single):
    name, results, _ = engine
    for mode in MODES:
        ours, theirs, ref = (r[mode]["snapshots"] for r in (results[0], results[1], single[0]))
        for step in range(STEPS + 1):
            for (A0, B0), (A1, B1), (rA, rB) in zip(ours[step], theirs[step], ref[step]):
                assert torch.equal(A0, A1) and torch.equal(B0, B1), (name, mode, step)
                assert rel_err(A0, rA) <= 1e-5 and rel_err(B0, rB) <= 1e-5, (name, mode, step)
        for (A, B), (A_init, B_init) in zip(ours[-1], ours[0]):
            assert rel_err(A, A_init) > 1e-2 and rel_err(B, B_init) > 1e-2  # training moved them


def test_untrained_rank_slots_stay_bit_identical(engine):
    name, results, _ = engine
    for mode, frozen_prefix in MODES.items():
        history = results[0][mode]
        per_step = dict(history["ranks"])
        for step in range(STEPS):
            trained = trained_slots(per_step[step], frozen_prefix)
            for (A0, B0), (A1, B1) in zip(history["snapshots"][step], history["snapshots"][step + 1]):
                assert torch.equal(A1[~trained], A0[~trained]) and torch.equal(B1[:, ~trained], B0[:, ~trained])
                assert not torch.equal(A1[trained], A0[trained]) and not torch.equal(B1[:, trained], B0[:, trained])


def test_export_and_merge_on_process_0_match_one_process(engine, single):
    name, results, outdir = engine
    for mode in MODES:
        ours, ref = outdir / mode, single[1] / mode
        config = json.loads((ours / "peft" / "adapter_config.json").read_text())
        assert (ours / "peft" / "adapter_config.json").read_bytes() == (ref / "peft" / "adapter_config.json").read_bytes()
        assert config["r"] == EXPORT_RANK and config["target_modules"] == ["0", "2"]  # no "module." prefix
        tensors, expected = (load_file(d / "peft" / "adapter_model.safetensors") for d in (ours, ref))
        assert sorted(tensors) == sorted(expected) == [f"base_model.model.{i}.lora_{x}.weight" for i in "02" for x in "AB"]
        assert all(rel_err(tensors[k], expected[k]) <= 1e-5 for k in tensors)
        merged, expected = (torch.load(d / "merged.pt") for d in (ours, ref))
        assert sorted(merged) == sorted(expected) and "0.lora_A" not in merged  # plain nn.Linear keys
        assert all(rel_err(merged[k], expected[k]) <= 1e-5 for k in merged)
        if name == "fsdp":
            assert "layer 0 is sharded (FSDP2 fully_shard); gather the full weights" in results[0][mode]["export_error"]
    assert not (outdir / "refused").exists()


@pytest.mark.parametrize("engine", ["ddp_compile"], indirect=True)
def test_compiled_ddp_model_is_not_recompiled_when_the_rank_changes(engine):
    name, results, _ = engine
    for result in results:
        for mode in MODES:
            # The workers turn on torch.compiler's fail_on_recompile after step 0 (both micro-batch
            # kinds seen); steps 1-3 draw other ranks and would raise on a recompile.
            assert result[mode]["frames"] == result[mode]["frames_after_step_0"] >= 1


def test_processes_agree_on_the_sampler_seed(tmp_path):
    results = launch("seeds", tmp_path, timeout=60)
    assert results[0]["none"] == results[1]["none"]  # generator=None: process 0's seed everywhere
    for result in results:
        assert "the processes were given different seeds [0, 1]" in result["error"]
