"""Gate distillation (post-training): data packing (`data`) and a Trainer whose loss is the gate loss (`distill`).

The CLI is `python -m seer_attn.training.distill`; import `seer_attn.training.distill` for the
Trainer classes (not imported here, so that `-m` runs the module once).
"""
