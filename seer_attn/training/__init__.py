"""Gate distillation (`distill`: a Trainer whose loss is the gate loss) and YaRN fine-tuning (`finetune`).

Data loading and packing live in `seer_attn.data` (`seer_attn.training.data` re-exports them).

The CLI is `python -m seer_attn.training.distill`; import `seer_attn.training.distill` for the
Trainer classes (not imported here, so that `-m` runs the module once).
"""
