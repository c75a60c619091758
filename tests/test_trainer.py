"""DyLoRACallback with transformers.Trainer: a tiny BERT classifier, 2 micro-batches per optimizer
step, AdamW with weight decay; in this process, and under DDP in 2 spawned processes (gloo)."""
import pytest
import torch

from _dist_worker import ACCUM, R_MAX, SEED, STEPS, launch, trainer_job
from conftest import rel_err

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from dylora_kernels import DyLoRALinear, RankSampler  # noqa: E402


def expected_ranks() -> list[int]:
    """What RankSampler draws for each step with the Trainer's seed (DyLoRACallback's default)."""
    sampler = RankSampler(DyLoRALinear(2, 2, R_MAX, 1.0), generator=SEED)
    return [sampler.draw(step) for step in range(STEPS)]


def check_training(result: dict, freeze_untrained: bool = True) -> None:
    """One rank per optimizer step for all its micro-batches (the sampler's draw for that step), the
    untrained rank slots of every layer untouched (values and AdamW exp_avg), rank r_max afterwards."""
    ranks = expected_ranks()
    assert len(set(ranks)) >= 3
    assert result["forwards"] == [(step, b) for step, b in enumerate(ranks) for _ in range(ACCUM)]
    assert result["final_rank"] == [R_MAX] * len(result["final_rank"])
    moved_untrained = False
    for step, b in enumerate(ranks):
        for (rank, A0, B0, S0), (_, A1, B1, S1) in zip(result["before"][step], result["after"][step]):
            assert rank == b
            other = torch.arange(R_MAX) != b - 1  # inject's default: frozen-prefix mode
            assert not torch.equal(A1[b - 1], A0[b - 1]) and not torch.equal(B1[:, b - 1], B0[:, b - 1])
            untouched = (torch.equal(A1[other], A0[other]) and torch.equal(B1[:, other], B0[:, other])
                         and torch.equal(S1[other], S0[other]))
            assert untouched or not freeze_untrained
            moved_untrained |= not untouched
    assert moved_untrained != freeze_untrained  # without the freeze, weight decay moves them


def check_evaluation(result: dict, tolerance: float) -> None:
    """evaluate() holds every rank's loss from one pass, equal to the loss at that rank computed directly."""
    metrics = result["every_rank"]
    losses = [metrics[f"eval_loss_r{b}"] for b in range(1, R_MAX + 1)]
    assert all(rel_err(torch.tensor(metrics[f"eval_loss_r{b}"]), torch.tensor(result["direct"][b])) <= tolerance
               for b in range(1, R_MAX + 1))
    assert max(losses) - min(losses) > 1e-5  # the ranks really differ
    assert any("eval_loss_r1" in entry for entry in result["log_history"])


@pytest.mark.parametrize("freeze_untrained", [True, False], ids=["freeze", "no_freeze"])
def test_trainer_one_process(freeze_untrained, tmp_path):
    result = trainer_job(tmp_path, freeze_untrained=freeze_untrained)
    check_training(result, freeze_untrained)
    check_evaluation(result, 1e-6)
    # ... and equal to the Trainer's own eval_loss: at r_max (where training left the model) and at
    # each rank set by hand
    metrics = result["every_rank"]
    assert rel_err(torch.tensor(metrics["eval_loss"]), torch.tensor(metrics[f"eval_loss_r{R_MAX}"])) <= 1e-6
    for b in range(1, R_MAX + 1):
        assert rel_err(torch.tensor(result["at_rank"][b]), torch.tensor(result["every_rank"][f"eval_loss_r{b}"])) <= 1e-6


@pytest.mark.distributed
def test_trainer_ddp_two_processes(tmp_path):
    results = launch("trainer", tmp_path, timeout=180)
    for result in results:
        check_training(result)
        check_evaluation(result, 1e-5)  # each process: its half of the evaluation set, all-reduced
    first, second = results
    per_rank = lambda result: {k: v for k, v in result["every_rank"].items() if k.startswith("eval_loss_r")}
    assert first["forwards"] == second["forwards"] and per_rank(first) == per_rank(second)
    for step in range(STEPS):
        for ours, theirs in zip(first["after"][step], second["after"][step]):
            assert all(torch.equal(a, b) for a, b in zip(ours[1:], theirs[1:]))
