"""Does a saved checkpoint hold the model that trained? A before/after check for sharded saves.

Under FSDP the weights live in shards and the Trainer gathers them into one full state dict to
save; a wrong gather (a missed shard, a dtype change, a wrapper prefix) would write a checkpoint
that loads without complaint. `python -m seer_attn.training.finetune --reload_check_tokens n`
therefore records, right before saving:

- `loss`: the model's loss on the first `n` tokens of the first training sequence, computed by the
  (possibly sharded) training model as it trains (`precision`: under `--bf16` the Trainer's
  autocast, or FSDP's bf16 parameters), eval mode, with the training run's attention settings; the
  cross entropy itself is taken in fp32 from the logits, so the loss is not rounded to bf16;
- `param_checksums`: per parameter, its float64 sum and sum of squares computed from each rank's
  *local shard* and summed over ranks (:func:`parameter_checksums`): independent of the gather
  that writes the checkpoint;
- `checksums`: the same of the state dict handed to `save_pretrained` (the gathered one under FSDP);

in `<output_dir>/reload_check.json` (with the token ids). :func:`verify_reload` (CLI below) loads
the checkpoint on any device in fp32, recomputes the checksums and the loss (in fp32) and reports
the largest differences:

    python -m seer_attn.training.reload_check outputs/finetune --device cpu
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import torch

__all__ = ["RELOAD_CHECK_NAME", "checksums", "parameter_checksums", "model_loss", "verify_reload", "main"]

logger = logging.getLogger(__name__)
RELOAD_CHECK_NAME = "reload_check.json"
# attention settings the check runs under (the training run's, so in-process and reloaded models match)
CHECK_FIELDS = ("seerattn_mode", "seerattn_sparsity_method", "seerattn_nz_ratio", "seerattn_min_sparse_length", "seerattn_selector")


def checksums(state_dict: dict[str, torch.Tensor]) -> dict[str, list[float]]:
    """Per tensor `[sum, sum of squares]` in float64 (floating tensors only)."""
    out = {}
    for k, v in state_dict.items():
        if torch.is_tensor(v) and v.is_floating_point():
            x = v.detach().to("cpu", torch.float64)
            out[k] = [float(x.sum()), float((x * x).sum())]
    return out


@torch.no_grad()
def parameter_checksums(module: torch.nn.Module) -> dict[str, list[float]]:
    """Per parameter `[sum, sum of squares]` in float64 of a module whose parameters may be sharded
    DTensors (FSDP2): each rank sums its local shard and the sums are added over ranks, so nothing is
    gathered. Call it on every rank (a collective when any parameter is sharded)."""
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    # after a forward FSDP2 leaves the root unsharded, its parameters swapped for the full (bf16 under
    # mixed precision) copies: reshard so every parameter is the fp32 shard the optimizer updates
    for m in module.modules():
        if isinstance(m, FSDPModule):
            m.reshard()
    names, sums, sharded = [], [], []
    for name, p in module.named_parameters():
        if not p.is_floating_point():
            continue
        t = p.detach()
        is_sharded = isinstance(t, DTensor) and any(pl.is_shard() for pl in t.placements)
        x = (t.to_local() if isinstance(t, DTensor) else t).to(torch.float64)
        names.append(name)
        sums.append(torch.stack([x.sum(), (x * x).sum()]))
        sharded.append(is_sharded)
    if not names:
        return {}
    vals = torch.stack(sums)  # (n, 2) on the parameters' device
    if any(sharded):
        mask = torch.tensor(sharded, device=vals.device)[:, None]
        part = torch.where(mask, vals, torch.zeros_like(vals))
        torch.distributed.all_reduce(part)  # a replicated tensor would be counted world_size times: kept local
        vals = torch.where(mask, part, vals)
    return {n: [float(a), float(b)] for n, (a, b) in zip(names, vals.cpu().tolist())}


@torch.no_grad()
def model_loss(model, input_ids: list[int], device, autocast_dtype: torch.dtype | None = None) -> float:
    """Mean next-token loss of `model` on `input_ids` (one sequence), eval mode (restored).

    The forward runs as `model` runs it (a training wrapper may apply bf16), under autocast to
    `autocast_dtype` when given; the cross entropy is taken in fp32 from the logits either way.
    """
    was_training = model.training
    model.eval()
    ids = torch.tensor([input_ids], device=device)
    dev = torch.device(device).type
    with torch.autocast(device_type=dev, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
        logits = model(input_ids=ids, use_cache=False).logits
    model.train(was_training)
    loss = torch.nn.functional.cross_entropy(logits[0, :-1].float(), ids[0, 1:])
    return float(loss)


def verify_reload(folder: str, device: str = "cpu") -> dict:
    """Load the checkpoint in `folder` on `device` (fp32), recompute the recorded loss and checksums.

    Returns `{"device", "precision", "loss_before", "loss_after", "loss_rel_diff", "tensors", "missing",
    "max_rel_sum_diff", "max_rel_sq_diff"}` and the same three for `param_checksums` (`param_tensors`,
    `param_missing`, `param_max_rel_diff`); relative differences are to the recorded values.
    `loss_after` is computed in fp32: after a bf16 run (`precision`) it differs from the recorded
    loss by bf16's rounding in the training forward (measured 7e-4 after FSDP on two H200s), so the
    checksums are the exact test and the loss the end-to-end one. For a bf16 run
    `loss_after_autocast` / `loss_rel_diff_autocast` add the reload's loss under bf16 autocast (not
    the same rounding as FSDP's bf16 parameters: a diagnostic).
    """
    from seer_attn.models import AutoSeerForCausalLM

    rec = json.loads((Path(folder) / RELOAD_CHECK_NAME).read_text())
    model = AutoSeerForCausalLM.from_pretrained(folder, dtype=torch.float32, **rec["settings"]).to(device)
    after = checksums(model.state_dict())
    rel = lambda a, b: abs(a - b) / max(abs(b), 1e-12)  # noqa: E731

    def compare(recorded: dict) -> tuple[list[str], float, float]:
        # tied weights appear under one name in a saved file and two in state_dict(): compare the recorded names
        missing = sorted(k for k in recorded if k not in after)
        d_sum = max((rel(after[k][0], v[0]) for k, v in recorded.items() if k in after), default=0.0)
        d_sq = max((rel(after[k][1], v[1]) for k, v in recorded.items() if k in after), default=0.0)
        return missing, d_sum, d_sq

    missing, d_sum, d_sq = compare(rec["checksums"])
    p_missing, p_sum, p_sq = compare(rec.get("param_checksums", {}))
    precision = rec.get("precision", "fp32")
    loss = model_loss(model, rec["input_ids"], device)
    res = {
        "device": device, "precision": precision, "loss_before": rec["loss"], "loss_after": loss, "loss_rel_diff": rel(loss, rec["loss"]),
        "tensors": len(rec["checksums"]), "missing": missing, "max_rel_sum_diff": d_sum, "max_rel_sq_diff": d_sq,
        "param_tensors": len(rec.get("param_checksums", {})), "param_missing": p_missing, "param_max_rel_diff": max(p_sum, p_sq),
    }
    if precision == "bf16":
        res["loss_after_autocast"] = model_loss(model, rec["input_ids"], device, torch.bfloat16)
        res["loss_rel_diff_autocast"] = rel(res["loss_after_autocast"], rec["loss"])
    return res


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description="Reload a checkpoint and compare it with what the training process recorded before saving.")
    p.add_argument("folder")
    p.add_argument("--device", default="cpu")
    p.add_argument("--output", default=None, help="write the result as JSON here (default: print only)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    res = verify_reload(args.folder, args.device)
    print(json.dumps(res, indent=2))
    if args.output:
        Path(args.output).write_text(json.dumps(res, indent=2))
    return res


if __name__ == "__main__":
    main()
