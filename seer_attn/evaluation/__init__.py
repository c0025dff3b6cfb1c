"""Evaluation: perplexity sweeps of SeerAttention against dense attention and reference selectors.

The CLI is `python -m seer_attn.evaluation.ppl`; import `seer_attn.evaluation.ppl` for the functions
(not imported here, so that `-m` runs the module once).
"""
