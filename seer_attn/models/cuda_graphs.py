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

:class:`GraphedDecoder` is the decoding counterpart: greedy decoding on a `StaticCache`, each one-token
step replayed as one CUDA graph, dense or sparse decoding alike (so the two compare on equal terms).
Its steps go through `seer_attn.modules.decode.static_decode_attention`, which keeps every length on
the device.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from seer_attn.modules.decode import decode_min_context, decode_states

__all__ = ["graphable", "GraphedPrefill", "GraphedDecoder", "DecodingRule"]


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
        self.static_ids = input_ids.clone()
        hint = ("seerattn_cuda_graphs: capturing the forward failed; the sparse path must not sync with the host "
                "(use the fused gate / TopK with nz_ratio or threshold, or turn the switch off)")  # fmt: skip
        graph, out = capture(lambda: run(self.static_ids), hint)
        self.graph, self.static_out, self.key = graph, out, key


def capture(fn, hint: str, after_warmup=None) -> tuple[torch.cuda.CUDAGraph, object]:
    """Capture `fn()` as a CUDA graph: two warm-up calls on a side stream first (autotuning, lazy
    allocations, compilation happen there), `after_warmup()` after each (to undo their side effects),
    then the capture. Returns the graph and `fn`'s output of the captured call (its static buffers).
    A failed capture raises RuntimeError starting with `hint`."""
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
            if after_warmup is not None:
                after_warmup()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            out = fn()
    except RuntimeError as e:
        raise RuntimeError(f"{hint}: {e}") from e
    return graph, out


def _slot_counters(cache) -> list[torch.Tensor]:
    # a StaticCache layer counts its filled slots in a device tensor (`cumulative_length`) that every
    # update advances: warm-up runs before a capture advance it too and must be undone
    counters = [getattr(layer, "cumulative_length", None) for layer in getattr(cache, "layers", [])]
    if not counters or any(not isinstance(c, torch.Tensor) for c in counters):
        raise RuntimeError(
            "GraphedDecoder needs transformers' StaticCache with per-layer device slot counters "
            "(`cache.layers[i].cumulative_length`); this transformers version lays its cache out differently"
        )
    return counters


@dataclass(frozen=True)
class DecodingRule:
    """How `GraphedDecoder` picks each next token (fixed inside a captured graph; a new rule recaptures).

    `do_sample=False`: greedy. Otherwise a sample from `softmax(logits / temperature)` restricted to the
    `top_k` most likely tokens and to the smallest set whose probability reaches `top_p` (Gumbel-max on
    the device, no host sync). After `eos_token_id` a sequence emits `pad_token_id` (default: EOS).
    """

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None

    def __post_init__(self):
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0 (use do_sample=False for greedy), got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    def pick(self, logits: torch.Tensor) -> torch.Tensor:
        """`[B, V]` logits -> `[B]` token ids."""
        if not self.do_sample:
            return logits.argmax(-1)
        logits = logits.float() / self.temperature
        if self.top_k is not None and self.top_k < logits.shape[-1]:
            kth = logits.topk(self.top_k, dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if self.top_p is not None and self.top_p < 1:
            sorted_logits, order = logits.sort(dim=-1, descending=True)
            probs = sorted_logits.softmax(-1)
            # drop a token when the tokens more likely than it already reach top_p (the most likely always stays)
            drop = (probs.cumsum(-1) - probs) >= self.top_p
            logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
        # Gumbel-max: argmax(logits + Gumbel noise) is a sample of softmax(logits)
        u = torch.rand_like(logits).clamp_(min=1e-20, max=1.0 - 1e-7)
        return (logits - torch.log(-torch.log(u))).argmax(-1)


class GraphedDecoder:
    """Decoding on a preallocated KV cache, one CUDA graph replay per generated token.

    Args:
        model: a Seer causal LM (`eval()`, no grad needed); dense or sparse decoding as its config says.
        max_cache_len (int): cache slots (prompt + generated tokens).
        graphs (bool): capture and replay the one-token step (CUDA only). `False` runs the very same
            step eagerly (the CPU form the tests check against `generate()`). Default: `True`.

    Usage::

        dec = GraphedDecoder(model, max_cache_len=S + n)
        tokens = dec.generate(input_ids, n)                                  # greedy, [B, S + n]
        tokens = dec.generate(input_ids, n, do_sample=True, top_p=0.95, eos_token_id=tok.eos_token_id)
        # or, to time decoding alone: dec.prefill(input_ids); then dec.step() n times

    A graph is captured on the first step after each prefill whose batch size differs from the last
    one's, per :class:`DecodingRule`, and per side of `seerattn_decode_min_context` (the rule is
    decided on the host, where the filled length is known without a sync). Changing `seerattn_*` fields
    after a capture needs :meth:`reset`.
    """

    def __init__(self, model, max_cache_len: int, graphs: bool = True):
        if model.training:
            raise ValueError("GraphedDecoder decodes with a model in eval() mode")
        self.model, self.max_cache_len, self.graphs = model, int(max_cache_len), graphs
        self.reset()

    def reset(self) -> None:
        """Drop the cache, the buffers and every captured graph."""
        self.cache = self.tokens = self.pos = self.out = self.finished = None
        self.rule = DecodingRule()
        self.length = 0  # filled slots, on the host
        self._graphs: dict[tuple, torch.cuda.CUDAGraph] = {}

    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor, rule: DecodingRule | None = None) -> torch.Tensor:
        """Fill a fresh cache with the prompt `[B, S]` (eagerly); returns the first generated token `[B, 1]`."""
        from transformers import StaticCache

        from seer_attn.models.modeling_seer import CACHE_NAME

        B, S = input_ids.shape
        if S >= self.max_cache_len:
            raise ValueError(f"a prompt of {S} tokens leaves no slot of max_cache_len={self.max_cache_len} to generate into")
        self.rule = rule or DecodingRule()
        same_batch = self.out is not None and self.out.shape[0] == B
        if not same_batch:
            self._graphs = {}
            self.tokens = torch.zeros(B, 1, dtype=torch.long, device=input_ids.device)
            self.pos = torch.zeros(1, 1, dtype=torch.long, device=input_ids.device)
            self.out = torch.zeros(B, self.max_cache_len, dtype=torch.long, device=input_ids.device)
            self.finished = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
            self.cache = StaticCache(config=self.model.config, max_cache_len=self.max_cache_len)
        else:
            # keep the buffers (the graphs point at them): zero the slot counters and the decode-gate states
            self.cache.reset()
            for state in decode_states(self.cache).values():
                for t in (state.keys, state.block):
                    if t is not None:
                        t.zero_()
        positions = torch.arange(S, device=input_ids.device)[None]
        out = self.model(input_ids=input_ids, position_ids=positions, use_cache=True, logits_to_keep=1,
                         **{CACHE_NAME: self.cache})  # fmt: skip
        first = self.rule.pick(out.logits[:, -1])[:, None]
        self.finished.zero_()
        if self.rule.eos_token_id is not None:
            self.finished |= first[:, 0] == self.rule.eos_token_id
        self.out[:, :S] = input_ids
        self.out[:, S : S + 1] = first
        self.tokens.copy_(first)
        self.pos.fill_(S)  # the position of the token the next step feeds
        self.length = S
        return first

    def _run(self) -> None:
        from seer_attn.models.modeling_seer import CACHE_NAME

        hidden = self.model.model(input_ids=self.tokens, position_ids=self.pos, use_cache=True,
                                  **{CACHE_NAME: self.cache}).last_hidden_state  # fmt: skip
        nxt = self.rule.pick(self.model.lm_head(hidden[:, -1]))  # [B]
        eos, pad = self.rule.eos_token_id, self.rule.pad_token_id
        if eos is not None:
            nxt = torch.where(self.finished, eos if pad is None else pad, nxt)
            self.finished |= nxt == eos
        self.pos.add_(1)
        self.out.scatter_(1, self.pos.expand(nxt.shape[0], 1), nxt[:, None])
        self.tokens.copy_(nxt[:, None])

    @torch.no_grad()
    def step(self) -> None:
        """Feed the last token, write the next one into the output buffer (no host sync when graphed)."""
        if self.out is None:
            raise RuntimeError("GraphedDecoder.step before prefill")
        if self.length + 1 >= self.max_cache_len:
            raise ValueError(f"the cache's {self.max_cache_len} slots are full")
        self.length += 1  # slots filled once this step's token is in
        self.cache._seer_host_length = self.length
        if not self.graphs:
            self._run()
            return
        min_context = decode_min_context(getattr(self.model.config, "seerattn_decode_min_context", 0), self.out.shape[0])
        key = (self.length >= min_context, self.rule)
        graph = self._graphs.get(key)
        if graph is None:
            graph = self._graphs[key] = self._capture()
        graph.replay()

    def _capture(self) -> torch.cuda.CUDAGraph:
        # warm-up runs advance the cache's slot counters and the step buffers: snapshot them and put them
        # back before the captured step replays for real
        live = (*_slot_counters(self.cache), self.tokens, self.pos, self.finished)
        saved = [t.clone() for t in live]

        def restore():
            for t, v in zip(live, saved):
                t.copy_(v)

        hint = "GraphedDecoder: capturing the decoding step failed (a host sync in the step?)"
        return capture(self._run, hint, after_warmup=restore)[0]

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        max_new_tokens: int,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        eos_token_id: int | None = None,
        pad_token_id: int | None = None,
        check_every: int = 32,
    ) -> torch.Tensor:
        """Continue `input_ids` `[B, S]` by up to `max_new_tokens`; returns `[B, S + n]`, prompt included.

        With `eos_token_id`, every `check_every` steps the host asks (one sync) whether every sequence
        has ended and stops if so; `n` is then the steps taken, and ended sequences are padded.
        """
        rule = DecodingRule(do_sample, temperature, top_k, top_p, eos_token_id, pad_token_id)
        S = input_ids.shape[1]
        self.prefill(input_ids, rule)
        n = 1
        while n < max_new_tokens:
            if eos_token_id is not None and n % check_every == 1 and bool(self.finished.all()):
                break
            self.step()
            n += 1
        return self.out[:, : S + n].clone()
