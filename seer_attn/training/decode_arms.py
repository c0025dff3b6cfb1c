"""Study arms for the decode gate: several decode-gate designs distilled in one run.

Distillation's cost is the frozen model's forward and the per-token ground truth (an attention pass
per layer); a decode gate itself is a few small matmuls. So designs that differ only in the decode
gate (key summaries, pools, query form, norm, initialisation) can train side by side in one run, on
the same batches against the same target: each arm is a separate `DecodeGate` per layer
(`layer.self_attn.decode_arms[name]`), its loss is added to the layer's gate loss, and its weights get
only their own loss's gradient. Adam is per parameter, and a global gradient-norm clip scales every
arm alike, so an arm with the main decode gate's design trains exactly as the main gate does
(a test checks it). The logged gate loss is then the sum over the prefill gate, the decode gate and
the arms.

Arms live outside `attn_gate`, so the run's own checkpoints hold the main gates only; after training
:func:`export_decode_arms` writes one ordinary gate-only checkpoint per arm (the prefill gate and
that arm as the decode gate), which `decode_ppl` and `from_pretrained` take as they are.

    python -m seer_attn.training.distill ... --seerattn_decode_gate_type Kmaxminavg \\
        --decode_arms "k2:k_summaries=2;k4:k_summaries=4;proj:q_pooling=proj"
    # -> <output_dir> (main gates), <output_dir>/arms/k2, .../k4, .../proj
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

import torch
import yaml

from seer_attn.models.configuration_seer import check_seerattn_field
from seer_attn.modules.decode import build_decode_gate

__all__ = ["ARM_FIELDS", "parse_decode_arms", "attach_decode_arms", "export_decode_arms"]

# the fields an arm may set (short names: without the `seerattn_decode_` prefix)
ARM_FIELDS = ("gate_type", "q_pooling", "k_summaries", "gate_norm", "gate_init")
ARMS_DIR = "arms"


def parse_decode_arms(spec: str) -> dict[str, dict[str, object]]:
    """`"name:field=value,field=value;name2:..."` -> {name: {`seerattn_decode_<field>`: value}}.

    Values are read as YAML scalars (`2`, `true`, `Kmaxavg`); fields are those of `ARM_FIELDS`.
    """
    arms: dict[str, dict[str, object]] = {}
    for part in (p.strip() for p in spec.split(";")):
        if not part:
            continue
        name, sep, body = part.partition(":")
        name = name.strip()
        if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name) or name in arms:
            raise ValueError(f"--decode_arms: each arm is 'name:field=value,...' with a new identifier name, got {part!r}")
        fields = {}
        for item in (i.strip() for i in body.split(",")):
            if not item:
                continue
            key, eq, value = item.partition("=")
            key = key.strip().removeprefix("seerattn_decode_")
            if not eq or key not in ARM_FIELDS:
                raise ValueError(f"--decode_arms: arm {name!r}: fields are {ARM_FIELDS} as field=value, got {item!r}")
            fields[f"seerattn_decode_{key}"] = yaml.safe_load(value.strip())
        for field, value in fields.items():
            check_seerattn_field(field, value)
        arms[name] = fields
    if not arms:
        raise ValueError(f"--decode_arms: no arm in {spec!r}")
    return arms


def _arm_config(config, fields: dict[str, object]):
    cfg = copy.deepcopy(config)
    for field, value in fields.items():
        setattr(cfg, field, value)
    return cfg


@torch.no_grad()
def attach_decode_arms(model, arms: dict[str, dict[str, object]]) -> int:
    """Give every layer's attention a `decode_arms` ModuleDict of fresh, trainable decode gates.

    Each arm starts as a fresh decode gate of its own config does (`seerattn_decode_gate_init`), on the
    device and in the dtype of the layer's decode gate. Returns the number of arm parameters.
    """
    if model.config.seerattn_decode_gate_type is None:
        raise ValueError("--decode_arms trains arms beside the decode gate: set --seerattn_decode_gate_type too")
    n = 0
    for layer in model.model.layers:
        attn = layer.self_attn
        main = attn.attn_gate.decode_gate
        p = next(main.parameters())
        arms_here = torch.nn.ModuleDict()
        for name, fields in arms.items():
            cfg = _arm_config(model.config, fields)
            gate = build_decode_gate(cfg, attn.attn_gate.hidden_size, main.head_dim)
            gate.reset_parameters(model.config.initializer_range)
            if cfg.seerattn_decode_gate_init == "pooled":
                gate.init_from_pooled()
            gate.to(device=p.device, dtype=p.dtype).requires_grad_(True)
            arms_here[name] = gate
            n += sum(q.numel() for q in gate.parameters())
        attn.decode_arms = arms_here
    return n


@torch.no_grad()
def export_decode_arms(model, output_dir: str | Path, arms: dict[str, dict[str, object]]) -> list[Path]:
    """Write `<output_dir>/arms/<name>`: a gate-only checkpoint per arm (prefill gate + the arm as decode gate)."""
    layers = [layer.self_attn for layer in model.model.layers]
    mains = [attn.attn_gate.decode_gate for attn in layers]
    config = model.config
    written = []
    try:
        for name, fields in arms.items():
            for attn in layers:
                attn.attn_gate.decode_gate = attn.decode_arms[name]
            model.config = _arm_config(config, fields)
            out = Path(output_dir) / ARMS_DIR / name
            model.save_pretrained(out, save_base=False)
            written.append(out)
    finally:
        model.config = config
        for attn, main in zip(layers, mains):
            attn.attn_gate.decode_gate = main
    return written
