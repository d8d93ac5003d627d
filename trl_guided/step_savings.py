"""Work a training step can leave out without changing its gradient (up to float rounding).

Three savings on TRL's loss path, each on only where it is exact (`StepSavings.refusals` names why one is off):

- **Zero-advantage rows** (`skip_zero_advantage_rows`). A row whose advantage is 0 at every trained token adds 0 to
  the policy-gradient term of every TRL loss type (each per-token loss is a multiple of the advantage) and 0 to its
  gradient, so its forward and backward are left out. The loss type's normaliser is kept as if the row were there:
  `grpo`/`sapo`/`luspo`/`dr_grpo` divide by the micro-batch's row count (the loss is multiplied by kept / all rows),
  `bnpo` by its trained-token count (multiplied by kept / all tokens), `dapo`/`cispo`/`vespo` by the generation
  batch's `num_items_in_batch`, which the rows keep. Not exact, so off: `beta` > 0 (the KL term trains such rows), an
  entropy bonus, `top_entropy_quantile` < 1 (the quantile is over the micro-batch's tokens), the OT term, a MoE
  auxiliary loss. Every process keeps as many rows as the process that keeps the most (at least one), so each runs
  one forward and backward through every layer and TRL's per-row metric gathers see equal shapes (DDP and ZeRO-3
  join every collective).
- **Right padding** (`trim_loss_padding`): the completion columns after a micro-batch's longest completion are
  dropped before its forward (masked everywhere in the loss; causal attention never looks right). Exact for every
  loss type; off with the OT term (its hidden states align with the columns).
- **Group layout** (`group_micro_batches`): TRL shuffles the generation batch's rows before splitting it into
  micro-batches; here a prompt group's rows stay together, so the shared-prefix forward encodes each prompt (and
  guided prefix) once per group, and groups of similar length share a micro-batch. The split of rows into
  micro-batches changes, which leaves the gradient unchanged only when one optimizer step covers whole generation
  batches (`gradient_accumulation_steps` a multiple of `steps_per_generation`) and the loss is a sum over rows with a
  partition-free normaliser: `grpo`, `sapo`, `luspo`, `dr_grpo` (equal micro-batch sizes), `dapo`, `cispo`, `vespo`.
  Off for `bnpo`, an entropy bonus, `top_entropy_quantile` < 1, OT and a MoE auxiliary loss (each normalises per
  micro-batch), and for multimodal batches. TRL's shuffle still draws its permutation, so the random stream of the
  run is unchanged.

`StepSavings` holds the settings; the trainer calls `micro_batch` in `compute_loss` (training only) and `layout` when
TRL has split a new generation batch (`_prepare_inputs`). TRL 1.16 relied on: the scored batch's keys (per-row tensors
first dimension, `num_items_in_batch` 0-dim), and `_compute_loss`'s normalisers per loss type.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from .loss_focus import drop_columns_after

# The config fields that switch the savings (`GuidedGRPOConfig`), named as `StepSavings`'s.
SAVINGS = ("skip_zero_advantage_rows", "trim_loss_padding", "group_micro_batches")
# The loss types whose normaliser counts rows (loss scales with kept / all rows when rows are left out).
_PER_ROW = ("grpo", "sapo", "luspo", "dr_grpo")
# The loss types whose normaliser is the generation batch's trained-token count (`num_items_in_batch`).
_PER_BATCH_TOKENS = ("dapo", "cispo", "vespo")
# Keys of multimodal batches, whose rows TRL splits by image grid (the layout leaves them to TRL).
_MULTIMODAL = ("pixel_values", "image_grid_thw", "pixel_attention_mask", "image_sizes", "num_images")


@dataclass
class StepSavings:
    """The savings of one trainer's settings. `gather` is the processes' all-gather (identity on one process)."""

    skip_zero_advantage_rows: bool = True
    trim_loss_padding: bool = True
    group_micro_batches: bool = True
    loss_type: str = "dapo"
    beta: float = 0.0
    entropy_bonus: bool = False
    top_entropy_quantile: float = 1.0
    ot: bool = False
    aux_loss: bool = False
    gradient_accumulation_steps: int = 1
    steps_per_generation: int = 1
    pad_to_multiple_of: int | None = None
    gather: Callable[[torch.Tensor], torch.Tensor] = lambda tensor: tensor

    refusals: dict[str, str] = field(init=False)  # saving -> why it is off under these settings

    def __post_init__(self):
        per_micro_batch = []
        if self.entropy_bonus:
            per_micro_batch.append("the entropy bonus")
        if self.top_entropy_quantile < 1.0:
            per_micro_batch.append("top_entropy_quantile < 1")
        if self.ot:
            per_micro_batch.append("the OT term")
        if self.aux_loss:
            per_micro_batch.append("the MoE auxiliary loss")
        self.refusals = {}
        rows = (["beta > 0 (the KL term trains every row)"] if self.beta != 0 else []) + per_micro_batch
        if rows:
            self.refusals["skip_zero_advantage_rows"] = ", ".join(rows)
        if self.ot:
            self.refusals["trim_loss_padding"] = "the OT term"
        layout = per_micro_batch + ([f"loss_type={self.loss_type!r}"] if self.loss_type == "bnpo" else [])
        if self.gradient_accumulation_steps % self.steps_per_generation:
            layout.append("gradient_accumulation_steps not a multiple of steps_per_generation")
        if layout:
            self.refusals["group_micro_batches"] = ", ".join(layout)

    def active(self, saving: str) -> bool:
        return getattr(self, saving) and saving not in self.refusals

    # ------------------------------------------------------------------------------------------------- per micro-batch

    def micro_batch(self, inputs: dict[str, Any]) -> tuple[dict[str, Any], float, float]:
        """The micro-batch to run the loss on, the factor its loss is multiplied by, and the share of rows left out."""
        scale, skipped = 1.0, 0.0
        if self.active("skip_zero_advantage_rows"):
            trains = training_rows(inputs)
            rows = trains.numel()
            kept = rows_to_keep(inputs, trains, self.gather)
            if kept.numel() < rows:
                scale = normaliser_scale(self.loss_type, inputs, kept)
                skipped = 1.0 - kept.numel() / rows
                inputs = select_rows(inputs, kept)
        if self.active("trim_loss_padding"):
            inputs = trim_right_padding(inputs, self.pad_to_multiple_of)
        return inputs, scale, skipped

    # --------------------------------------------------------------------------------------------- generation batch

    def layout(self, micro_batches: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """TRL's shuffled micro-batches of one generation batch, re-split with each prompt group's rows together."""
        if not self.active("group_micro_batches") or len(micro_batches) < 2:
            return micro_batches
        if any(micro_batches[0].get(key) is not None for key in _MULTIMODAL):
            return micro_batches
        batch = join_rows(micro_batches)
        order = grouped_order(batch)
        size = order.numel() // len(micro_batches)
        return [select_rows(batch, order[i * size : (i + 1) * size]) for i in range(len(micro_batches))]


def training_rows(inputs: dict[str, Any]) -> torch.Tensor:
    """(B,) bool: rows with a non-zero advantage at some trained token (NaN counts as non-zero: it is kept)."""
    advantages = inputs["advantages"]
    if advantages.dim() == 1:
        return advantages != 0
    mask = inputs["completion_mask"].bool()
    if "tool_mask" in inputs:
        mask = mask & inputs["tool_mask"].bool()
    return ((advantages != 0) & mask).any(dim=1)


def rows_to_keep(
    inputs: dict[str, Any], trains: torch.Tensor, gather: Callable[[torch.Tensor], torch.Tensor]
) -> torch.Tensor:
    """Indices of the rows that run: the training rows, topped up with the shortest other rows to the count the
    process with the most training rows needs (at least one row, so every process runs a forward and backward)."""
    count = torch.tensor([max(int(trains.sum()), 1)], device=trains.device)
    needed = int(gather(count).max())
    lengths = inputs["completion_mask"].sum(dim=1)
    filler = (~trains).nonzero().squeeze(1)
    filler = filler[torch.argsort(lengths[filler], stable=True)]
    chosen = torch.cat([trains.nonzero().squeeze(1), filler[: needed - int(trains.sum())]])
    return chosen.sort().values


def normaliser_scale(loss_type: str, inputs: dict[str, Any], kept: torch.Tensor) -> float:
    """What the loss of the `kept` rows is multiplied by so that it equals TRL's loss over every row (the rows left
    out add 0 to its numerator, not to its denominator)."""
    if loss_type in _PER_ROW:
        return kept.numel() / inputs["advantages"].size(0)
    if loss_type in _PER_BATCH_TOKENS:
        return 1.0
    if loss_type == "bnpo":
        mask = inputs["completion_mask"]
        if "tool_mask" in inputs:
            mask = mask * inputs["tool_mask"]
        return float(mask[kept].sum().clamp(min=1.0) / mask.sum().clamp(min=1.0))
    raise ValueError(f"Unknown loss type {loss_type!r}: the zero-advantage saving does not know its normaliser.")


def select_rows(batch: dict[str, Any], rows: torch.Tensor) -> dict[str, Any]:
    """The batch restricted to `rows` (per-row tensors and lists; 0-dim tensors and None as they are)."""
    selected = {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            selected[key] = value[rows.to(value.device)]
        elif isinstance(value, list):
            selected[key] = [value[i] for i in rows.tolist()]
        else:
            selected[key] = value
    return selected


def join_rows(batches: list[dict[str, Any]]) -> dict[str, Any]:
    """The micro-batches of one split, joined back into one batch (the inverse of TRL's `split_tensor_dict`)."""
    joined = {}
    for key, value in batches[0].items():
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            joined[key] = torch.cat([batch[key] for batch in batches])
        elif isinstance(value, list):
            joined[key] = [item for batch in batches for item in batch[key]]
        else:
            joined[key] = value
    return joined


def grouped_order(batch: dict[str, Any]) -> torch.Tensor:
    """Row order with each prompt group's rows together (rows with identical prompt ids and mask form a group):
    groups that train first, longest completion first, then the groups whose rows all have advantage 0."""
    prompt_keys = torch.cat([batch["prompt_ids"], batch["prompt_mask"].to(batch["prompt_ids"].dtype)], dim=1)
    _, group_of_row = torch.unique(prompt_keys, dim=0, return_inverse=True)
    group_of_row = group_of_row.cpu()
    groups = int(group_of_row.max()) + 1
    lengths = batch["completion_mask"].sum(dim=1).float().cpu()
    trains = training_rows(batch).float().cpu()
    longest = torch.zeros(groups).scatter_reduce(0, group_of_row, lengths, reduce="amax")
    trained = torch.zeros(groups).scatter_reduce(0, group_of_row, trains, reduce="amax")
    ranked = sorted(range(groups), key=lambda group: (-trained[group].item(), -longest[group].item(), group))
    rank_of_group = torch.empty(groups, dtype=torch.long)
    rank_of_group[ranked] = torch.arange(groups)
    return torch.argsort(rank_of_group[group_of_row], stable=True)


def trim_right_padding(inputs: dict[str, Any], pad_to_multiple_of: int | None = None) -> dict[str, Any]:
    """The micro-batch without the completion columns after its longest completion (rounded up to the multiple)."""
    completion_mask = inputs["completion_mask"]
    width = completion_mask.size(1)
    filled = completion_mask.any(dim=0).nonzero()
    keep = int(filled.max()) + 1 if filled.numel() else 1
    if pad_to_multiple_of:
        keep = -(-keep // pad_to_multiple_of) * pad_to_multiple_of
    if keep >= width:
        return inputs
    return drop_columns_after(dict(inputs), keep, width)
