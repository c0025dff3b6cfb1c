"""Evaluation: perplexity sweeps of SeerAttention against dense attention and reference selectors (`ppl`),
and selection diagnostics: attention recall and overlap with the oracle, per layer and head (`recall`).

The CLI is `python -m seer_attn.evaluation.ppl`; import `seer_attn.evaluation.ppl` or
`seer_attn.evaluation.recall` for the functions (not imported here, so that `-m` runs the module once).
"""
