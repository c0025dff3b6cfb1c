"""Does a saved checkpoint hold the model that trained? A before/after check for sharded saves.

Under FSDP the weights live in shards and the Trainer gathers them into one full state dict to
save; a wrong gather (a missed shard, a dtype change, a wrapper prefix) would write a checkpoint
that loads without complaint. `python -m seer_attn.training.finetune --reload_check_tokens n`
therefore records, right before saving:

- `loss`: the model's loss on the first `n` tokens of the first training sequence, computed by the
  (possibly sharded) training model in fp32, eval mode, with the training run's attention settings;
- `checksums`: per tensor of the saved state dict, its float64 sum and sum of squares;

in `<output_dir>/reload_check.json` (with the token ids). :func:`verify_reload` (CLI below) loads
the checkpoint on any device, recomputes both and reports the largest differences:

    python -m seer_attn.training.reload_check outputs/finetune --device cpu
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import torch

__all__ = ["RELOAD_CHECK_NAME", "checksums", "model_loss", "verify_reload", "main"]

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
def model_loss(model, input_ids: list[int], device) -> float:
    """Mean next-token loss of `model` on `input_ids` (one sequence), fp32, eval mode (restored)."""
    was_training = model.training
    model.eval()
    ids = torch.tensor([input_ids], device=device)
    with torch.autocast(device_type=torch.device(device).type, enabled=False):
        out = model(input_ids=ids, labels=ids, use_cache=False)
    model.train(was_training)
    return float(out.loss.float())


def verify_reload(folder: str, device: str = "cpu") -> dict:
    """Load the checkpoint in `folder` on `device` (fp32), recompute the recorded loss and checksums.

    Returns `{"device", "loss_before", "loss_after", "loss_rel_diff", "tensors", "missing",
    "max_rel_sum_diff", "max_rel_sq_diff"}`; relative differences are to the recorded values.
    """
    from seer_attn.models import AutoSeerForCausalLM

    rec = json.loads((Path(folder) / RELOAD_CHECK_NAME).read_text())
    model = AutoSeerForCausalLM.from_pretrained(folder, dtype=torch.float32, **rec["settings"]).to(device)
    after = checksums(model.state_dict())
    # tied weights appear under one name in a saved file and two in state_dict(): compare the recorded names
    missing = sorted(k for k in rec["checksums"] if k not in after)
    rel = lambda a, b: abs(a - b) / max(abs(b), 1e-12)  # noqa: E731
    d_sum = max((rel(after[k][0], v[0]) for k, v in rec["checksums"].items() if k in after), default=0.0)
    d_sq = max((rel(after[k][1], v[1]) for k, v in rec["checksums"].items() if k in after), default=0.0)
    loss = model_loss(model, rec["input_ids"], device)
    return {
        "device": device, "loss_before": rec["loss"], "loss_after": loss, "loss_rel_diff": rel(loss, rec["loss"]),
        "tensors": len(rec["checksums"]), "missing": missing, "max_rel_sum_diff": d_sum, "max_rel_sq_diff": d_sq,
    }


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
