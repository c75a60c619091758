"""DyLoRA with the Hugging Face Trainer: one callback (needs ``pip install 'dylora_kernels[hf]'``).

    trainer = Trainer(model=model, args=args, train_dataset=..., eval_dataset=...,
                      callbacks=[DyLoRACallback()])

DyLoRACallback draws the rank at the start of each optimizer step (the same b for every
micro-batch of a gradient-accumulation step and on every process), keeps the untrained rank slots
frozen in the Trainer's optimizer, and at each evaluation scores every rank in one pass.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import TrainerCallback

from .models import RankSampler, _layers, evaluate_ranks, freeze_untrained_slots, set_rank


def cross_entropy(output, batch: Mapping) -> dict[str, Tensor]:
    """``{"loss": mean cross-entropy of output.logits against batch["labels"]}`` (labels -100 ignored).

    The loss of sequence- and token-classification heads, whose logits line up with the labels.
    For other heads (e.g. a causal LM, whose labels are shifted by one) pass your own metric.
    """
    logits, labels = output["logits"], batch["labels"]
    return {"loss": F.cross_entropy(logits.flatten(0, -2).float(), labels.flatten(), ignore_index=-100)}


class DyLoRACallback(TrainerCallback):
    """Trains and evaluates a DyLoRA model (``inject`` already applied) under ``transformers.Trainer``.

    - Training: at the start of optimizer step i it sets the rank drawn by
      ``RankSampler(model, r_min, r_max, generator=seed, per_layer).step(i)``, with
      i = ``state.global_step``, so every micro-batch of the step and every process use the same b
      (``seed`` defaults to ``TrainingArguments.seed``, which is the same on every process), and a
      run resumed from a checkpoint draws what the uninterrupted run drew. Between steps and after
      training the model is at rank ``eval_rank`` (default: the sampler's r_max), so the Trainer's
      own evaluation, ``predict()`` and anything run after ``train()`` see one fixed rank.
    - ``freeze_untrained=True``: ``freeze_untrained_slots`` on the Trainer's optimizer for the
      whole run (the rank slots a step does not train keep their values and AdamW state).
    - Evaluation: after each ``Trainer.evaluate`` it runs the evaluation set once through
      ``evaluate_ranks`` (one forward per batch serves every rank in ``eval_ranks``, default all of
      1..r_max) and adds ``{prefix}_{name}_r{b}`` for each rank b and each entry of
      ``metric(output_at_rank_b, batch)`` (default ``cross_entropy``: ``eval_loss_r1``, ...). Values
      are averaged over batches weighted by batch size, as the Trainer's ``eval_loss`` is, and over
      all processes. They go into the metrics that ``evaluate()`` returns (so they work as
      ``metric_for_best_model``) and into ``state.log_history``; ``eval_ranks=()`` turns this off.
    """

    def __init__(self, r_min: int = 1, r_max: int | None = None, seed: int | None = None,
                 per_layer: bool = False, freeze_untrained: bool = True, eval_rank: int | None = None,
                 eval_ranks: Iterable[int] | None = None,
                 metric: Callable[[object, Mapping], Mapping[str, Tensor | float]] = cross_entropy):
        self.r_min, self.r_max, self.seed, self.per_layer = r_min, r_max, seed, per_layer
        self.freeze_untrained, self.eval_rank, self.metric = freeze_untrained, eval_rank, metric
        self.eval_ranks = None if eval_ranks is None else list(eval_ranks)
        self.sampler, self.hooks = None, None

    # ---------------------------------------------------------------------------------- training
    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        seed = args.seed if self.seed is None else self.seed
        self.sampler = RankSampler(model, self.r_min, self.r_max, generator=seed, per_layer=self.per_layer)
        if self.eval_rank is None:
            self.eval_rank = self.sampler.r_max
        if self.freeze_untrained:
            self.hooks = freeze_untrained_slots(optimizer, model)

    def on_step_begin(self, args, state, control, **kwargs):
        self.sampler.step(state.global_step)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        set_rank(model, self.eval_rank)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if self.hooks is not None:
            self.hooks.remove()
            self.hooks = None
        set_rank(model, self.eval_rank)

    # -------------------------------------------------------------------------------- evaluation
    def on_evaluate(self, args, state, control, metrics=None, model=None, eval_dataloader=None, **kwargs):
        ranks = self.eval_ranks
        if ranks is None:
            ranks = range(1, min(layer.r_max for _, layer in _layers(model)) + 1)
        if not ranks or eval_dataloader is None:
            return
        prefix = next((k[:-len("_runtime")] for k in metrics if k.endswith("_runtime")), "eval")
        per_rank = _evaluate_every_rank(model, eval_dataloader, list(ranks), self.metric, args.device)
        scores = {f"{prefix}_{name}_r{b}": value for (b, name), value in per_rank.items()}
        metrics.update(scores)
        state.log_history.append({**scores, "step": state.global_step})


@torch.no_grad()
def _evaluate_every_rank(model: nn.Module, loader, ranks: list[int], metric, device) -> dict:
    """{(rank, metric name): mean over the loader's batches (weighted by batch size) and processes}."""
    sums: dict[tuple[int, str], Tensor] = {}
    samples = 0
    was_training = model.training
    model.eval()
    try:
        for batch in loader:
            n = next(v.shape[0] for v in batch.values() if isinstance(v, Tensor) and v.dim())
            for b, output in evaluate_ranks(model, batch, ranks).items():
                for name, value in metric(output, batch).items():
                    sums[b, name] = sums.get((b, name), 0) + torch.as_tensor(value, device=device).double() * n
            samples += n
    finally:
        model.train(was_training)
    keys = sorted(sums)
    totals = torch.stack([sums[k] for k in keys] + [torch.tensor(float(samples), device=device).double()])
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(totals)
    return {k: float(v) for k, v in zip(keys, (totals[:-1] / totals[-1]).tolist())}
