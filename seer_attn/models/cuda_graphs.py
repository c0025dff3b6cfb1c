"""`seerattn_cuda_graphs`: replay a whole cache-free prefill forward as one CUDA graph.

At 32k tokens a SmolLM2-sized forward is launch-bound (more CPU time issuing kernels than GPU time
running them), and the sparse path adds the gate's and the selection's launches to every layer.
With the switch on, a forward that qualifies (CUDA, no autograd, eval mode, `input_ids` only,
`use_cache=False`, no padding mask, no labels) is captured once per input shape and settings and
replayed afterwards: one launch for the whole model. The sparse path must be free of host syncs for
that (the fused gate and the TopK path with `nz_ratio` or `threshold` are; a mask path that builds
lists with `.item()` is not, and capture then fails with an error naming the switch).

Costs: the graph keeps its own memory pool (one forward's activations) while it lives; one graph is
kept (a new shape or new `seerattn_*` values recapture). Logits are copied out of the graph's
static buffer (cheap with `logits_to_keep=1`). Anything else, e.g. generate() with its KV cache,
runs eagerly as before.
"""

from __future__ import annotations

import torch

__all__ = ["graphable", "GraphedPrefill"]


def graphable(
    model, input_ids, attention_mask, position_ids, past_key_values, inputs_embeds, labels, use_cache, kwargs
) -> bool:
    """Whether this forward call qualifies for graph replay (see the module docstring)."""
    return (
        input_ids is not None
        and input_ids.is_cuda
        and attention_mask is None
        and position_ids is None
        and past_key_values is None
        and inputs_embeds is None
        and labels is None
        and use_cache is False
        and not kwargs
        and not model.training
        and not torch.is_grad_enabled()
    )


class GraphedPrefill:
    """One captured forward: `run(ids) -> (logits, kept)` replayed for a fixed key."""

    def __init__(self):
        self.key = None
        self.graph = None
        self.static_ids = None
        self.static_out = None

    def __call__(self, key, input_ids: torch.Tensor, run):
        """Replay `run` on `input_ids` (capturing it first when `key` changed); returns its outputs."""
        if key != self.key:
            self._capture(key, input_ids, run)
        self.static_ids.copy_(input_ids)
        self.graph.replay()
        return self.static_out

    def _capture(self, key, input_ids, run) -> None:
        self.key = self.graph = self.static_out = None
        torch.cuda.synchronize()
        self.static_ids = input_ids.clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            # warm-up outside the graph: autotuning, lazy inits and cached tables happen here
            for _ in range(2):
                run(self.static_ids)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                out = run(self.static_ids)
        except RuntimeError as e:
            raise RuntimeError(
                "seerattn_cuda_graphs: capturing the forward failed; the sparse path must not sync with the host "
                f"(use the fused gate / TopK with nz_ratio or threshold, or turn the switch off): {e}"
            ) from e
        self.graph, self.static_out, self.key = graph, out, key
