"""Long-context fine-tuning with YaRN: the dense baseline, and SeerAttention with sparse attention.

Both runs extend the context `--yarn_factor`-fold (transformers' YaRN with the *original* length
for the correction range; the gates' block RoPE follows, being built from the same config) and
train the whole model with the LM loss at the extended length.

- `--seerattn_mode dense`: the family's plain attention (dense mode equals e.g. `LlamaForCausalLM`).
- `--seerattn_mode sparse`: every layer's output is block-sparse attention at `--nz_ratio`, chosen
  by the current gates, with gradients through the CSR kernel (CUDA) or the PyTorch twin (CPU);
  each gate learns from the dense pooled ground truth computed without gradients. The loss is
  `LM + seerattn_gate_loss_scale * gate loss`; the gates see detached inputs and the mask is not
  differentiable, so the two terms train disjoint parameters (as upstream).
  The ground truth costs a dense attention pass per layer: `--gt_every_n_steps` and
  `--gt_layers_per_step` compute it on a subset of forwards / layers only
  (`seer_attn.modules.gt_schedule`); the others skip that pass and their gate loss.

Start the sparse run from gates distilled at the original length (`--model` a gate-only folder,
see `scripts/run_seerattn_yarn_finetuning.sh`). Weights stay fp32 with bf16 autocast on CUDA
(`--bf16`): lr 1e-5 updates vanish in bf16 weights. Gradient checkpointing (non-reentrant, so the
gate losses computed inside checkpointed layers keep their graph) and a chunked cross-entropy keep
32k sequences in memory. Checkpoints are full models (base weights change) plus the tokenizer,
loadable by `AutoSeerForCausalLM.from_pretrained` and the evaluator.

Tiny CPU run:

    python -m seer_attn.training.finetune --model smollm2-135m --dataset builtin:python-stdlib \
        --yarn_factor 2 --train_length 512 --max_steps 4 --seerattn_mode sparse --output_dir outputs/ft
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments, default_data_collator, set_seed
from transformers.trainer_utils import SchedulerType, get_last_checkpoint

from seer_attn.data import check_context_length
from seer_attn.models import AutoSeerForCausalLM, apply_yarn, load_tokenizer
from seer_attn.training.distill import DataArguments, build_train_dataset, parse_with_config, refuse_data_parallel, sum_over_ranks
from seer_attn.training.profiling import ProfileCallback
from seer_attn.training.throughput import ThroughputCallback

__all__ = ["FinetuneModelArguments", "FinetuneTrainingArguments", "FinetuneTrainer", "load_finetune_model", "main"]

logger = logging.getLogger(__name__)
LOG_NAME = "train_loss.jsonl"


@dataclass
class FinetuneModelArguments:
    model: str = field(
        default="smollm2-135m",
        metadata={"help": "start point: a gate-only checkpoint (sparse runs), a plain model of a supported family, or 'smollm2-135m'"},
    )
    seerattn_mode: str = field(default="sparse", metadata={"help": "dense (YaRN baseline) or sparse (SeerAttention)"})
    nz_ratio: float = field(default=0.5, metadata={"help": "target block density of the sparse attention while training"})
    yarn_factor: float = field(default=4.0, metadata={"help": "context extension factor (YaRN); <= 1 disables"})
    original_max_position_embeddings: int | None = field(
        default=None, metadata={"help": "pretraining context length (default: the model's max_position_embeddings)"}
    )
    seerattn_loss: str = field(default="kl", metadata={"help": "gate loss: kl, kl_top or mse"})
    seerattn_distill_target: str = field(default="mass", metadata={"help": "gate ground truth: max or mass"})
    seerattn_gate_loss_scale: float = field(default=10.0, metadata={"help": "loss = LM + scale * sum of layer gate losses"})
    seerattn_kernel_implementation: str = field(default="auto", metadata={"help": "auto (CSR on CUDA, twins on CPU), CSR or naive"})
    seerattn_compile_gate: bool = field(
        default=False, metadata={"help": "torch.compile the gates' scoring + loss (fewer launches per step; not yet measured on a GPU)"}
    )
    gt_every_n_steps: int = field(
        default=1, metadata={"help": "cheaper ground truth: dense pooled map (and gate loss) only every n-th training forward"}
    )
    gt_layers_per_step: int = field(
        default=0, metadata={"help": "cheaper ground truth: only this many layers (rotating) per forward compute it; 0 = all"}
    )


@dataclass
class FinetuneTrainingArguments(TrainingArguments):
    """`TrainingArguments` with upstream's fine-tuning defaults (method-spec §6.2)."""

    output_dir: str | None = field(default="outputs/finetune", metadata={"help": "checkpoints, train_loss.jsonl, final model"})
    learning_rate: float = field(default=1e-5, metadata={"help": "AdamW peak learning rate"})
    lr_scheduler_type: SchedulerType | str = field(default="linear", metadata={"help": "schedule after warmup"})
    warmup_steps: float = field(default=20, metadata={"help": "warmup steps"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    per_device_train_batch_size: int = field(default=1, metadata={"help": "sequences per micro-batch (any size)"})
    max_steps: int = field(default=400, metadata={"help": "optimizer steps"})
    logging_steps: float = field(default=1, metadata={"help": "console log every n steps"})
    save_steps: float = field(default=200, metadata={"help": "full checkpoint every n steps"})
    save_total_limit: int | None = field(default=1, metadata={"help": "keep at most this many checkpoints"})
    gradient_checkpointing: bool = field(default=True, metadata={"help": "recompute layer activations in backward"})
    report_to: None | str | list[str] = field(default="none", metadata={"help": "trackers"})
    remove_unused_columns: bool = field(default=False, metadata={"help": "the packed dataset has input_ids only"})
    ddp_find_unused_parameters: bool | None = field(
        default=False, metadata={"help": "every trainable parameter gets a gradient each step: no unused-parameter search"}
    )
    profile_steps: int = field(
        default=0,
        metadata={"help": "profile this many optimizer steps after 5 warm-up steps (rank 0): profile.json / profile.txt in "
                          "output_dir, device busy vs wall time and the top ops (those steps run slower: time throughput separately)"},
    )
    reload_check_tokens: int = field(
        default=0,
        metadata={"help": "before the final save, record the loss on this many tokens of the first training sequence and "
                          "per-tensor checksums in reload_check.json (seer_attn.training.reload_check compares a reload)"},
    )
    config: str | None = field(default=None, metadata={"help": "YAML/JSON file of argument values; flags override it"})


class LossLogger(TrainerCallback):
    """One JSON line per optimizer step: `step`, `loss`, `lm_loss`, `gate_loss`, `density` (means over the
    step's micro-batches of every rank), `lr`, `step_time`."""

    def __init__(self, trainer: "FinetuneTrainer"):
        self.trainer, self._lr, self._t0 = trainer, None, None

    def on_step_begin(self, args, state, control, optimizer=None, **kwargs):
        import time

        self._t0 = time.perf_counter()
        if optimizer is not None:
            self._lr = float(optimizer.param_groups[0]["lr"])

    def on_step_end(self, args, state, control, **kwargs):
        import time

        if torch.cuda.is_available():
            torch.cuda.synchronize()
        sums, n = self.trainer.pop_losses()
        if n == 0:  # the same on every rank
            return
        keys = sorted(sums)  # the same keys on every rank
        n, *vals = sum_over_ranks([n] + [sums[k] for k in keys], args.device)
        if not state.is_world_process_zero:
            return
        record = {"step": state.global_step, "lr": self._lr, "step_time": time.perf_counter() - self._t0}
        record.update({k: v / n for k, v in zip(keys, vals)})
        with open(Path(args.output_dir) / LOG_NAME, "a") as f:
            f.write(json.dumps(record) + "\n")


class FinetuneTrainer(Trainer):
    """`Trainer` on the model's own loss (LM, plus the scaled gate loss in sparse mode); full saves."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.loss_is_scaled_for_ga = False  # per-batch means: let the Trainer average micro-batches
        self._sums, self._n = {}, 0
        self.reload_check: dict | None = None  # set right before the final save: written beside it

    def pop_losses(self) -> tuple[dict[str, float], int]:
        out = (self._sums, self._n)
        self._sums, self._n = {}, 0
        return out

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        ids = inputs["input_ids"]
        outputs = model(input_ids=ids, attention_mask=inputs.get("attention_mask"), labels=ids, logits_to_keep=1)
        if model.training:
            parts = {"loss": outputs.loss, "lm_loss": outputs.lm_loss, "gate_loss": outputs.gate_loss}
            for k, v in parts.items():
                if v is not None:
                    self._sums[k] = self._sums.get(k, 0.0) + float(v.detach())
            if outputs.density is not None:
                self._sums["density"] = self._sums.get("density", 0.0) + outputs.density
            self._n += 1
        return (outputs.loss, outputs) if return_outputs else outputs.loss

    def _clip_grad_norm(self, model):
        # base weights (LM loss) and gates (gate loss) get disjoint gradients of very different
        # size: one global clip would let the gate gradients shrink every LM update, so clip each
        # group to max_grad_norm on its own; the reported norm is the base model's
        params = [p for p in model.parameters() if p.grad is not None]
        gates = [p for n, p in model.named_parameters() if p.grad is not None and ".attn_gate." in n]
        gate_ids = {id(p) for p in gates}
        base = [p for p in params if id(p) not in gate_ids]
        if gates:
            self.accelerator.clip_grad_norm_(gates, self.args.max_grad_norm)
        return self.accelerator.clip_grad_norm_(base, self.args.max_grad_norm)

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        output_dir = output_dir or self.args.output_dir
        if not self.args.should_save:
            return
        model = self.accelerator.unwrap_model(self.model)
        # under FSDP the Trainer passes the gathered full state dict: the unwrapped module holds shards only
        kwargs = {"state_dict": state_dict} if state_dict is not None else {}
        if self.reload_check is not None:
            from seer_attn.training.reload_check import checksums

            # before saving: transformers' save_pretrained pops the tensors out of the dict it writes
            saved_sums = checksums(state_dict if state_dict is not None else model.state_dict())
        model.save_pretrained(output_dir, save_base=True, **kwargs)
        if self.reload_check is not None:
            from seer_attn.training.reload_check import RELOAD_CHECK_NAME

            Path(output_dir, RELOAD_CHECK_NAME).write_text(json.dumps({**self.reload_check, "checksums": saved_sums}))
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, "training_args.bin"))


def load_finetune_model(margs: FinetuneModelArguments):
    """The model with YaRN applied, in `dense` or `sparse` mode, everything trainable, fp32 weights."""
    if margs.seerattn_mode not in ("dense", "sparse"):
        raise ValueError(f"--seerattn_mode must be dense or sparse, got {margs.seerattn_mode!r}")
    config = AutoSeerForCausalLM.config_from(
        margs.model,
        seerattn_mode=margs.seerattn_mode,
        seerattn_sparsity_method="nz_ratio",
        seerattn_nz_ratio=margs.nz_ratio,
        seerattn_selector="gate",
        seerattn_loss=margs.seerattn_loss,
        seerattn_distill_target=margs.seerattn_distill_target,
        seerattn_gate_loss_scale=margs.seerattn_gate_loss_scale,
        seerattn_kernel_implementation=margs.seerattn_kernel_implementation,
        seerattn_min_sparse_length=0,
        seerattn_gt_every_n_steps=margs.gt_every_n_steps,
        seerattn_gt_layers_per_step=margs.gt_layers_per_step,
        seerattn_compile_gate=margs.seerattn_compile_gate,
    )
    if margs.yarn_factor and margs.yarn_factor > 1:
        apply_yarn(config, margs.yarn_factor, margs.original_max_position_embeddings)
    config.use_cache = False
    model = AutoSeerForCausalLM.from_pretrained(margs.model, config=config, dtype=torch.float32)
    for name, p in model.named_parameters():
        # dense mode never calls the gates: leave them frozen so no data-parallel engine waits for their gradients
        p.requires_grad_(margs.seerattn_mode == "sparse" or ".attn_gate." not in name)
    return model


def parse_args(argv: list[str] | None = None):
    """Parse flags; `--config FILE` supplies defaults that explicit flags override."""
    return parse_with_config((FinetuneModelArguments, DataArguments, FinetuneTrainingArguments), argv, train_length=32768)


def fsdp_keep_fp32_reduce_and_outputs(plugin) -> None:
    """Under FSDP2 with bf16, reduce gradients and return outputs in fp32 (parameters stay bf16).

    accelerate's default FSDP2 policy is bf16 for parameters, gradient reduction *and* outputs: every
    micro-batch's loss leaves the model rounded to bf16 (a gate loss of ~200 to steps of 1.0) and
    gradients are summed over ranks in bf16, where one GPU (autocast, fp32 master weights) sums in
    fp32; on two H200s the logged gate losses of 1 and 2 GPUs differed by up to 2.1% (docs/RESULTS.md).
    A policy the user set (not accelerate's default) is left alone.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy

    pol = getattr(plugin, "mixed_precision_policy", None)
    if getattr(plugin, "fsdp_version", 1) != 2 or not isinstance(pol, MixedPrecisionPolicy):
        return
    # accelerate's default: output_dtype bf16 (accelerate 1.1x) or None (later: outputs stay in the bf16 compute dtype)
    if pol.param_dtype == torch.bfloat16 and pol.reduce_dtype == torch.bfloat16 and pol.output_dtype in (torch.bfloat16, None):
        plugin.mixed_precision_policy = MixedPrecisionPolicy(
            param_dtype=torch.bfloat16, reduce_dtype=torch.float32, output_dtype=torch.float32,
            cast_forward_inputs=pol.cast_forward_inputs,
        )
        logger.info("FSDP2 mixed precision: bf16 parameters, fp32 gradient reduction and outputs")


def main(argv: list[str] | None = None) -> str:
    """Fine-tune; returns the folder of the final full checkpoint (`output_dir`)."""
    margs, dargs, targs = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    refuse_data_parallel(targs)
    set_seed(targs.seed)
    if targs.gradient_checkpointing and not targs.gradient_checkpointing_kwargs:
        targs.gradient_checkpointing_kwargs = {"use_reentrant": False}
    if margs.gt_every_n_steps > 1 or margs.gt_layers_per_step > 0:
        # gates of layers without ground truth in a step get no gradient: let DDP expect that
        targs.ddp_find_unused_parameters = True
    tokenizer = load_tokenizer(margs.model)
    model = load_finetune_model(margs)
    check_context_length(model.config, dargs.train_length)
    if dargs.min_doc_tokens == 0:
        dargs.min_doc_tokens = dargs.train_length  # train on documents that really are long
    train = build_train_dataset(dargs, tokenizer, targs.seed, targs.max_steps)

    resume = targs.resume_from_checkpoint
    if resume == "last":
        resume = get_last_checkpoint(targs.output_dir)
    Path(targs.output_dir).mkdir(parents=True, exist_ok=True)
    trainer = FinetuneTrainer(
        model=model, args=targs, train_dataset=train, data_collator=default_data_collator, processing_class=tokenizer
    )
    trainer.add_callback(LossLogger(trainer))
    if getattr(trainer, "is_fsdp_enabled", False):
        fsdp_keep_fp32_reduce_and_outputs(trainer.accelerator.state.fsdp_plugin)
    if targs.fsdp and not getattr(trainer, "is_fsdp_enabled", False):
        # accelerate shards only on GPUs: without one the Trainer silently trains data parallel instead
        logger.warning(
            "--fsdp %r was requested but the Trainer will not shard (accelerate enables FSDP on GPUs only): "
            "this run is data parallel (DDP) over %d process(es), every rank holding the whole model",
            targs.fsdp, targs.world_size,
        )
    trainer.add_callback(ThroughputCallback(dargs.train_length))  # <output_dir>/throughput.json
    if targs.profile_steps > 0:
        trainer.add_callback(ProfileCallback(targs.profile_steps))  # <output_dir>/profile.{json,txt}
    trainer.train(resume_from_checkpoint=resume)
    logger.info("trained as %s on %d process(es)", type(trainer.model_wrapped).__name__, targs.world_size)
    if targs.reload_check_tokens > 0:
        from seer_attn.training.reload_check import CHECK_FIELDS, model_loss, parameter_checksums

        ids = [int(t) for t in train[0]["input_ids"][: targs.reload_check_tokens]]  # (a torch-formatted dataset gives tensors)
        inner = trainer.accelerator.unwrap_model(trainer.model)
        # every rank sums its shards and runs the (sharded) forward; rank 0 writes the record with the checkpoint
        sums = parameter_checksums(inner)
        loss = model_loss(trainer.model_wrapped, ids, targs.device)
        trainer.reload_check = {"input_ids": ids, "loss": loss, "settings": {k: getattr(inner.config, k) for k in CHECK_FIELDS},
                                "precision": "bf16" if targs.bf16 else "fp16" if targs.fp16 else "fp32",
                                "param_checksums": sums,
                                "trained_as": type(trainer.model_wrapped).__name__, "world_size": targs.world_size}
        logger.info("loss before saving on %d tokens: %.6f", len(ids), loss)
    trainer.save_model(targs.output_dir)
    with open(Path(targs.output_dir) / "finetune_args.json", "w") as f:
        json.dump({"model": vars(margs), "data": vars(dargs), "train": targs.to_dict()}, f, indent=2, default=str)
    logger.info("fine-tuned model written to %s", targs.output_dir)
    return targs.output_dir


if __name__ == "__main__":
    main()
