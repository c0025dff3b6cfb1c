"""Which layers compute the dense ground truth in a fine-tuning forward (a cheaper ground truth).

Sparse fine-tuning trains every gate against the pooled dense attention map, which costs one dense
attention pass per layer and step on top of the sparse forward and backward. Two knobs thin it out:

- `seerattn_gt_every_n_steps = n`: only every n-th training forward computes any ground truth;
- `seerattn_gt_layers_per_step = L`: in such a forward only L layers do, rotating so that every
  layer gets its turn every `ceil(num_layers / L)` ground-truth forwards.

A layer without ground truth in a forward skips the pooled-attention pass and has no gate loss
(its gate gets no gradient that step); its sparse attention still uses its gate's current blocks.
"Step" counts training forwards (micro-batches under gradient accumulation).
"""

from __future__ import annotations

__all__ = ["gt_active"]


def gt_active(step: int, layer: int, num_layers: int, every_n_steps: int = 1, layers_per_step: int = 0) -> bool:
    """Whether `layer` computes the ground truth in training forward number `step` (0-based).

    Args:
        every_n_steps (int): >= 1.
        layers_per_step (int): layers per ground-truth forward; 0 (or >= num_layers) means all.
    """
    if every_n_steps < 1 or layers_per_step < 0:
        raise ValueError(f"every_n_steps must be >= 1 and layers_per_step >= 0, got {every_n_steps}, {layers_per_step}")
    if step % every_n_steps:
        return False
    if layers_per_step == 0 or layers_per_step >= num_layers:
        return True
    turn = step // every_n_steps
    return (layer - turn * layers_per_step) % num_layers < layers_per_step
