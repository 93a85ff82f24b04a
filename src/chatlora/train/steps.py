"""Which examples each optimizer step sees, and how they become tensors (packed or padded).

The order is a pure function of (seed, step): epoch e visits the training examples in a permutation
seeded by (seed, e), `examples_per_step` at a time, the last step of an epoch taking what is left.
So a resumed run sees exactly the examples the uninterrupted run would have, with no saved cursor.

Targets are the labels shifted left *within each example* (`targets[i]` is what position i must
predict), so examples can be concatenated into one packed row without a target leaking across an
example boundary. Packed rows restart `position_ids` at 0 for each example; transformers turns that
into a block-diagonal causal mask (no attention across examples) when no attention_mask is passed.

    plan = StepPlan(len(train), examples_per_step=16, seed=42)
    for micro in micro_batches([train[i] for i in plan.indices(step)], 4):
        batch = pack(micro)   # {"input_ids", "position_ids", "targets"}, each [1, tokens]
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch

from chatlora.templates import IGNORE


@dataclass(frozen=True)
class StepPlan:
    num_examples: int
    examples_per_step: int
    seed: int

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.num_examples / self.examples_per_step)

    def total_steps(self, epochs: float, max_steps: int | None = None) -> int:
        return max_steps if max_steps is not None else max(1, math.ceil(epochs * self.steps_per_epoch))

    def epoch_of(self, step: int) -> int:
        return step // self.steps_per_epoch

    def indices(self, step: int) -> list[int]:
        """Example indices of optimizer step `step` (0-based)."""
        epoch, within = divmod(step, self.steps_per_epoch)
        order = list(range(self.num_examples))
        random.Random(f"{self.seed}:{epoch}").shuffle(order)
        return order[within * self.examples_per_step:(within + 1) * self.examples_per_step]


def targets_of(labels: list[int]) -> list[int]:
    """labels aligned with input_ids -> what each position must predict (last position: nothing)."""
    return labels[1:] + [IGNORE]


def micro_batches(examples: list, size: int, max_tokens: int | None = None) -> list[list]:
    """Consecutive groups of at most `size` examples and `max_tokens` tokens (an example longer
    than `max_tokens` goes alone). Fewer, larger passes are faster; the loss is the same."""
    groups: list[list] = []
    tokens = 0
    for e in examples:
        n = len(e.input_ids)
        if not groups or len(groups[-1]) == size or (max_tokens is not None and tokens + n > max_tokens):
            groups.append([])
            tokens = 0
        groups[-1].append(e)
        tokens += n
    return groups


def supervised_count(examples) -> int:
    return sum(sum(1 for t in targets_of(e.labels) if t != IGNORE) for e in examples)


def pack(examples, device=None) -> dict[str, torch.Tensor]:
    """All examples in one row: [1, total tokens], positions restarting per example, no padding."""
    ids, pos, tgt = [], [], []
    for e in examples:
        ids += e.input_ids
        pos += range(len(e.input_ids))
        tgt += targets_of(e.labels)
    as_row = lambda xs: torch.tensor([xs], dtype=torch.long, device=device)  # noqa: E731
    return {"input_ids": as_row(ids), "position_ids": as_row(pos), "targets": as_row(tgt)}


def pad(examples, pad_id: int, device=None) -> dict[str, torch.Tensor]:
    """One row per example, right-padded to the longest (the self-llm recipe's batches)."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    tgt = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e.input_ids)
        ids[row, :n] = torch.tensor(e.input_ids)
        tgt[row, :n] = torch.tensor(targets_of(e.labels))
        mask[row, :n] = 1
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "targets": tgt.to(device)}


# Causal LMs whose logits are exactly lm_head(final hidden state): no scaling or soft-capping.
PLAIN_HEAD_MODELS = {"llama", "mistral", "qwen2", "qwen3"}


def loss_sum(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Sum of token cross-entropies over the batch's supervised targets, logits in fp32.

    For plain-head models the vocabulary projection runs only at supervised positions (about a
    third of a chat example's tokens): the same loss and gradients as projecting every position,
    with a fraction of the logits' memory (tests/test_train.py compares both)."""
    inputs = {k: v for k, v in batch.items() if k != "targets"}
    targets = batch["targets"]
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    if lm.config.model_type not in PLAIN_HEAD_MODELS:
        logits = model(**inputs, use_cache=False).logits
        return torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), targets.flatten(),
                                                 ignore_index=IGNORE, reduction="sum")
    hidden = lm.get_decoder()(**inputs, use_cache=False).last_hidden_state
    keep = targets != IGNORE
    logits = lm.get_output_embeddings()(hidden[keep])
    return torch.nn.functional.cross_entropy(logits.float(), targets[keep], reduction="sum")


def held_out_loss(model, examples, batch_examples: int, device, max_tokens: int | None = None) -> float | None:
    """Mean cross-entropy over every supervised token of `examples` (eval mode, no gradients)."""
    if not examples:
        return None
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for chunk in micro_batches(examples, batch_examples, max_tokens):
            total += loss_sum(model, pack(chunk, device)).item()
            count += supervised_count(chunk)
    model.train(was_training)
    return total / count
