"""Gate-only distillation (post-training) of a frozen model (any supported family) with the HF `Trainer`.

The base model runs in `distill` mode: exact attention that also yields the pooled attention map,
which every layer's AttnGate learns to predict. Only `*.attn_gate.*` weights train; the model's
`loss` is the gate loss (`seerattn_gate_loss_scale * sum of per-layer losses`).

What the Trainer gives for free, and what is specific here:

- AdamW, lr / warmup / cosine, weight decay, bf16 autocast, gradient accumulation, checkpoints and
  `--resume_from_checkpoint` (a path, or `last` for the newest `checkpoint-*` in `output_dir`);
- `GateDistillTrainer.compute_loss` asks for no logits (`logits_to_keep=1`) and no labels, and keeps
  `loss_is_scaled_for_ga = False`: the gate loss is a per-batch mean, so the Trainer divides it by
  the accumulation steps and an accumulated step averages its micro-batches;
- checkpoints and the final save are gate-only (a few MB), reloaded with `load_gates`;
- `GateLossLogger` writes `gate_loss.jsonl`: the total gate loss and lr of every optimizer step and
  the per-layer losses every `layer_log_steps` steps;
- the frozen base is bf16 on CUDA (`--dtype auto`) and fp32 on CPU; gate weights and their Adam
  state stay fp32 and the gate computes in fp32, so no autocast is needed (`--bf16` would only
  downcast the gate's matmuls).

Tiny CPU run (about a minute plus the model load):

    python -m seer_attn.training.distill --model smollm2-135m --dataset builtin:python-stdlib \
        --max_documents 64 --train_length 256 --max_steps 20 --output_dir outputs/distill

Upstream's Llama-3.1-8B recipe: `--config configs/llama31_8b_post_training.yaml`; Qwen2.5-7B-Instruct
and Qwen3-8B: `configs/qwen25_7b_instruct_post_training.yaml`, `configs/qwen3_8b_post_training.yaml`
(command-line flags override the file).
"""

from __future__ import annotations

import json
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml
from transformers import HfArgumentParser, Trainer, TrainerCallback, TrainingArguments, default_data_collator, set_seed
from transformers.trainer_utils import SchedulerType, get_last_checkpoint

from seer_attn.data import build_sequences, check_context_length
from seer_attn.models import AutoSeerForCausalLM, load_tokenizer
from seer_attn.training.profiling import ProfileCallback
from seer_attn.training.throughput import ThroughputCallback

__all__ = [
    "ModelArguments",
    "DataArguments",
    "DistillTrainingArguments",
    "GateDistillTrainer",
    "GateLossLogger",
    "build_train_dataset",
    "load_distill_model",
    "parse_args",
    "main",
]

logger = logging.getLogger(__name__)
GATE_LOG_NAME = "gate_loss.jsonl"


@dataclass
class ModelArguments:
    model: str = field(
        default="smollm2-135m",
        metadata={"help": "base model: 'smollm2-135m' (embedded), a local folder or hub id of a supported family (Llama, Qwen2/2.5, Qwen3, Mistral, Phi-3/4), a .gguf, or a gate-only checkpoint to continue from"},
    )
    seerattn_gate_type: str | None = field(default=None, metadata={"help": "gate pooling recipe, e.g. Qavg_Kmaxminavg (default: the config's)"})
    seerattn_decode_gate_type: str | None = field(
        default=None, metadata={"help": "also distill a decode gate, e.g. Kmaxminavg (default: the config's; None = none)"}
    )
    seerattn_loss: str = field(default="kl", metadata={"help": "gate loss: kl (upstream 2025), kl_top (top blocks one by one, the rest as one bin) or mse (upstream 2024)"})
    seerattn_distill_target: str = field(default="mass", metadata={"help": "ground truth: max (2D max-pool, upstream) or mass (block attention mass)"})
    seerattn_gate_loss_scale: float = field(default=10.0, metadata={"help": "loss = scale * sum of per-layer gate losses"})
    seerattn_gate_q_summaries: int | None = field(default=None, metadata={"help": "query summaries per block (default: the config's)"})
    seerattn_gate_k_summaries: int | None = field(default=None, metadata={"help": "key summaries per block (default: the config's)"})
    seerattn_gate_hidden_size: int | None = field(default=None, metadata={"help": "gate width (default: head_dim)"})
    seerattn_gate_init: str | None = field(default=None, metadata={"help": "fresh gates: random or pooled (default: the config's)"})
    seerattn_decode_q_pooling: str | None = field(
        default=None, metadata={"help": "decode gate query: proj, avg or heads (mixture over the group's heads) (default: the config's)"}
    )
    seerattn_decode_gate_init: str | None = field(default=None, metadata={"help": "fresh decode gates: random or pooled (default: the config's)"})
    seerattn_decode_k_summaries: int | None = field(default=None, metadata={"help": "decode gate: compressed keys per block (default: the config's)"})
    decode_arms: str | None = field(
        default=None,
        metadata={"help": "decode-gate designs trained beside the decode gate, on the same batches and target "
                  "(seer_attn.training.decode_arms): 'name:field=value,...;name2:...' with fields gate_type, q_pooling, "
                  "k_summaries, gate_norm, gate_init; each is written to <output_dir>/arms/<name> as a gate-only checkpoint"},
    )
    seerattn_gate_loss_row_start: float | None = field(
        default=None, metadata={"help": "gate loss over query-block rows from this fraction of the sequence on (default: the config's)"}
    )
    seerattn_sparsity_method: str | None = field(
        default=None, metadata={"help": "sparsity method saved with the gates for inference (default: the config's)"}
    )
    seerattn_nz_ratio: float | None = field(default=None, metadata={"help": "density saved with the gates for inference"})
    seerattn_compile_gate: bool = field(
        default=False, metadata={"help": "torch.compile the gates' scoring + loss (fewer launches per step; not yet measured on a GPU)"}
    )
    dtype: str = field(default="auto", metadata={"help": "base weights: auto (bf16 on CUDA, fp32 on CPU), bfloat16, float16 or float32"})
    gates_fp32: bool = field(default=True, metadata={"help": "keep gate weights (and their Adam state) in fp32 while the base is bf16"})


@dataclass
class DataArguments:
    dataset: str = field(
        default="builtin:python-stdlib",
        metadata={"help": "comma-separated sources: hub dataset, local .jsonl/.jsonl.gz/.txt file, folder of shards, glob, "
                          "or builtin:python-stdlib / builtin:pydoc-topics"},
    )
    dataset_weights: str | None = field(
        default=None,
        metadata={"help": "comma-separated mixture weights, one per --dataset source (shares of training tokens); "
                          "default: concatenate the sources"},
    )
    streaming: bool = field(
        default=False,
        metadata={"help": "read the data lazily (datasets streaming: no cache, no up-front tokenisation) for corpora "
                          "larger than memory; needs --max_steps"},
    )
    shuffle_buffer: int = field(default=256, metadata={"help": "with --streaming: sequences in the shuffle buffer"})
    dataset_subset: str | None = field(default=None, metadata={"help": "hub dataset config name"})
    dataset_split: str = field(default="train", metadata={"help": "hub dataset split"})
    text_field: str = field(default="text", metadata={"help": "field holding the document text"})
    train_length: int = field(default=8192, metadata={"help": "tokens per training sequence (BOS + train_length-1 stream tokens)"})
    min_doc_tokens: int = field(default=0, metadata={"help": "drop documents shorter than this many tokens before packing"})
    max_documents: int | None = field(default=None, metadata={"help": "use at most this many (shuffled) documents of each source"})
    preprocessing_num_workers: int | None = field(default=None, metadata={"help": "processes for tokenisation (datasets.map num_proc)"})
    layer_budget_docs: int = field(
        default=0,
        metadata={"help": "after training, measure per-layer budget curves (loss objective) on this many documents of train_length tokens "
                          "and save them with the gates (seerattn_layer_budget_curves: every requested density is then "
                          "spread over the layers; seer_attn.evaluation.layer_budgets); 0 = uniform density"},
    )
    layer_budget_dataset: str | None = field(
        default=None, metadata={"help": "calibration source of the layer budgets (default: the first --dataset source)"}
    )


@dataclass
class DistillTrainingArguments(TrainingArguments):
    """`TrainingArguments` with upstream's post-training defaults (method-spec §6.1, §6.3)."""

    output_dir: str | None = field(default="outputs/distill", metadata={"help": "checkpoints, gate_loss.jsonl and the final gate-only checkpoint"})
    learning_rate: float = field(default=1e-3, metadata={"help": "AdamW peak learning rate"})
    lr_scheduler_type: SchedulerType | str = field(default="cosine", metadata={"help": "learning-rate schedule after warmup"})
    warmup_steps: float = field(default=20, metadata={"help": "warmup steps (a float < 1 is a fraction of max_steps)"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    per_device_train_batch_size: int = field(default=1, metadata={"help": "sequences per device per micro-batch"})
    max_steps: int = field(default=500, metadata={"help": "optimizer steps"})
    logging_steps: float = field(
        default=10, metadata={"help": "log to the console every n steps (each log reads the loss on the host: a GPU sync; "
                                      "gate_loss.jsonl has every step either way)"}
    )
    logging_nan_inf_filter: bool = field(
        default=False, metadata={"help": "the Trainer's NaN/inf filter of the console loss reads every micro-batch's loss on the "
                                         "host (a GPU sync per micro-batch): off, the logs show a NaN as it is"}
    )
    save_steps: float = field(default=100, metadata={"help": "gate-only checkpoint every n steps"})
    save_total_limit: int | None = field(default=2, metadata={"help": "keep at most this many checkpoints"})
    report_to: None | str | list[str] = field(default="none", metadata={"help": "trackers (none, tensorboard, wandb, ...)"})
    remove_unused_columns: bool = field(default=False, metadata={"help": "the packed dataset has input_ids only"})
    ddp_find_unused_parameters: bool | None = field(
        default=False, metadata={"help": "every trainable parameter gets a gradient each step: no unused-parameter search"}
    )
    profile_steps: int = field(
        default=0,
        metadata={"help": "profile this many optimizer steps after 5 warm-up steps (rank 0): profile.json / profile.txt in "
                          "output_dir, device busy vs wall time and the top ops (those steps run slower: time throughput separately)"},
    )
    layer_log_steps: int = field(default=10, metadata={"help": "write per-layer gate losses to gate_loss.jsonl every n steps"})
    config: str | None = field(default=None, metadata={"help": "YAML or JSON file of argument values; command-line flags override it"})


def refuse_data_parallel(targs) -> None:
    """Raise when one process sees several GPUs: the HF Trainer would wrap the model in
    `torch.nn.DataParallel`, whose replicas run in threads (Triton's autotuner is not thread-safe:
    on two H200s a plain `python -m seer_attn.training.distill` died in it with
    `TypeError: 'NoneType' object is not a mapping`) and whose global batch is per-device batch x GPUs."""
    n_gpu = getattr(targs, "n_gpu", 1)
    if n_gpu > 1 and getattr(targs, "world_size", 1) == 1:
        raise RuntimeError(
            f"{n_gpu} GPUs are visible to this single process, so the Trainer would run torch.nn.DataParallel "
            f"(replicas in threads, which Triton's autotuner does not survive; global batch {n_gpu} x "
            f"per_device_train_batch_size). Start one process per GPU (NPROC={n_gpu} in scripts/*.sh, or "
            f"`torchrun --nproc_per_node {n_gpu} -m ...`), or pick one GPU with CUDA_VISIBLE_DEVICES=0"
        )


def sum_over_ranks(values: list[float], device) -> list[float]:
    """Sum `values` over the data-parallel ranks (every rank must call it); unchanged in one process.

    Loss logs use it so that a 2-GPU run logs the mean over the global batch, as a 1-GPU run does,
    and not rank 0's half of it.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return list(values)
    return sum_over_ranks_tensor(torch.tensor(values, dtype=torch.float64, device=device)).tolist()


def sum_over_ranks_tensor(t: torch.Tensor) -> torch.Tensor:
    """`t` summed over the data-parallel ranks (every rank must call it); unchanged in one process."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return t
    t = t.clone()
    dist.all_reduce(t)
    return t


class GateLossLogger(TrainerCallback):
    """Append one JSON line per optimizer step to `<output_dir>/gate_loss.jsonl`.

    Fields: `step`, `gate_loss` (the scaled total, mean over the step's micro-batches of every
    rank), `lr`, and every `layer_log_steps` steps `layer_losses` (unscaled, one per layer).

    The sums stay on the GPU: each step's are kept as a device tensor and brought to the host (one
    all-reduce over ranks, one copy) every `flush_steps` steps, at checkpoints and at the end, so
    the training loop does not wait for the GPU after every step to log (distillation of a small
    model is bound by the host: a sync per step stops it queueing the next step's kernels).
    """

    def __init__(self, trainer: "GateDistillTrainer", layer_log_steps: int, flush_steps: int = 50):
        self.trainer = trainer
        self.layer_log_steps = max(1, layer_log_steps)
        self.flush_steps = max(1, flush_steps)
        self._lr = None
        self._pending: list[tuple[int, float | None, torch.Tensor]] = []  # (step, lr, [1 + layers] sums / n)

    def on_step_begin(self, args, state, control, optimizer=None, **kwargs):
        if optimizer is not None:
            lr = optimizer.param_groups[0]["lr"]
            self._lr = lr if not torch.is_tensor(lr) else lr.detach()  # the lr this step uses, read at flush

    def on_step_end(self, args, state, control, **kwargs):
        sums, n = self.trainer.pop_gate_losses()
        if n == 0:  # the same on every rank: each runs the same number of micro-batches
            return
        self._pending.append((state.global_step, self._lr, torch.cat([sums.new_tensor([n]), sums])))
        if len(self._pending) >= self.flush_steps:
            self.flush(args, state)

    def on_save(self, args, state, control, **kwargs):
        self.flush(args, state)

    def on_train_end(self, args, state, control, **kwargs):
        self.flush(args, state)

    def flush(self, args, state) -> None:
        """Write the pending steps (every rank must call it: the sums are all-reduced)."""
        if not self._pending:
            return
        rows = sum_over_ranks_tensor(torch.stack([r[2] for r in self._pending]).double()).tolist()
        pending, self._pending = self._pending, []
        if not state.is_world_process_zero:
            return
        with open(Path(args.output_dir) / GATE_LOG_NAME, "a") as f:
            for (step, lr, _), (n, total, *layers) in zip(pending, rows):
                record = {"step": step, "gate_loss": total / n, "lr": float(lr) if lr is not None else None}
                if step % self.layer_log_steps == 0 or step == state.max_steps:
                    record["layer_losses"] = [round(x / n, 6) for x in layers]
                f.write(json.dumps(record) + "\n")


class GateDistillTrainer(Trainer):
    """`Trainer` whose loss is the model's gate loss and whose checkpoints hold the gates only."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.loss_is_scaled_for_ga = False  # per-batch mean: the Trainer divides by the accumulation steps
        self._gate_sums, self._gate_n = None, 0

    def pop_gate_losses(self) -> tuple[torch.Tensor | None, int]:
        """`[total, *per layer]` gate-loss sums since the last call (fp32, on the model's device), and the
        micro-batch count."""
        out = (self._gate_sums, self._gate_n)
        self._gate_sums, self._gate_n = None, 0
        return out

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs.get("attention_mask"), logits_to_keep=1)
        if outputs.loss is None or outputs.gate_losses is None:
            raise RuntimeError("the model returned no gate loss: distillation needs seerattn_mode='distill'")
        if model.training:  # summed on the device: no host sync per micro-batch
            sums = torch.cat([outputs.loss.detach().float().reshape(1), outputs.gate_losses.detach().float()])
            self._gate_sums = sums if self._gate_sums is None else self._gate_sums + sums
            self._gate_n += 1
        return (outputs.loss, outputs) if return_outputs else outputs.loss

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        output_dir = output_dir or self.args.output_dir
        if not self.args.should_save:
            return
        self.accelerator.unwrap_model(self.model).save_pretrained(output_dir, save_base=False)
        torch.save(self.args, os.path.join(output_dir, "training_args.bin"))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        model = model or self.accelerator.unwrap_model(self.model)
        model.load_gates(resume_from_checkpoint)


def _resolve_dtype(name: str) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    if name not in ("bfloat16", "float16", "float32"):
        raise ValueError(f"dtype must be auto, bfloat16, float16 or float32, got {name!r}")
    return getattr(torch, name)


def load_distill_model(margs: ModelArguments):
    """The model in `distill` mode with a frozen base and trainable (fp32) gates."""
    overrides = {
        "seerattn_mode": "distill",
        "seerattn_loss": margs.seerattn_loss,
        "seerattn_distill_target": margs.seerattn_distill_target,
        "seerattn_gate_loss_scale": margs.seerattn_gate_loss_scale,
    }
    for name in (
        "seerattn_gate_type", "seerattn_gate_q_summaries", "seerattn_gate_k_summaries", "seerattn_gate_hidden_size",
        "seerattn_gate_init", "seerattn_gate_loss_row_start", "seerattn_sparsity_method", "seerattn_nz_ratio", "seerattn_decode_gate_type",
        "seerattn_decode_q_pooling", "seerattn_decode_gate_init", "seerattn_decode_k_summaries", "seerattn_compile_gate",
    ):
        if getattr(margs, name) is not None:
            overrides[name] = getattr(margs, name)
    model = AutoSeerForCausalLM.from_pretrained(margs.model, dtype=_resolve_dtype(margs.dtype), **overrides)
    model.config.use_cache = False
    n = model.freeze_base()
    if margs.gates_fp32:
        for gate in model.gate_modules():
            gate.float()
    logger.info("trainable gate parameters: %d (%.3f%% of the model)", n, 100 * n / sum(p.numel() for p in model.parameters()))
    return model


def build_train_dataset(dargs: DataArguments, tokenizer, seed: int, max_steps: int | None = None):
    """Tokenised, packed training sequences `[N, train_length]`, one source or a weighted mixture.

    See `seer_attn.data.build_sequences`. With `--streaming` the result has no length, so the
    Trainer cannot count epochs: `max_steps` (the run's `--max_steps`) must be > 0.
    """
    if dargs.streaming and max_steps is not None and max_steps <= 0:
        raise ValueError(
            "--streaming needs --max_steps > 0: a streamed dataset has no length, so the number of steps "
            "cannot be derived from --num_train_epochs"
        )
    return build_sequences(
        dargs.dataset,
        tokenizer,
        dargs.train_length,
        weights=dargs.dataset_weights,
        split=dargs.dataset_split,
        text_field=dargs.text_field,
        subset=dargs.dataset_subset,
        max_documents=dargs.max_documents,
        min_doc_tokens=dargs.min_doc_tokens,
        seed=seed,
        streaming=dargs.streaming,
        num_proc=dargs.preprocessing_num_workers,
        shuffle_buffer=dargs.shuffle_buffer,
    )


def parse_with_config(classes: tuple, argv: list[str] | None = None, **defaults):
    """Parse flags into `classes`; `--config FILE` (YAML or JSON) supplies defaults that flags override."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = HfArgumentParser(classes)
    if defaults:
        parser.set_defaults(**defaults)
    config_path = None
    for i, a in enumerate(argv):
        if a == "--config" and i + 1 < len(argv):
            config_path = argv[i + 1]
        elif a.startswith("--config="):
            config_path = a.split("=", 1)[1]
    if config_path:
        values = yaml.safe_load(Path(config_path).read_text())
        if not isinstance(values, dict):
            raise ValueError(f"{config_path} must hold a mapping of argument names to values")
        known = {f for dc in classes for f in dc.__dataclass_fields__}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"{config_path}: unknown arguments {unknown}")
        parser.set_defaults(**values)
    return parser.parse_args_into_dataclasses(args=argv)


def parse_args(argv: list[str] | None = None) -> tuple[ModelArguments, DataArguments, DistillTrainingArguments]:
    """Parse flags; `--config FILE` (YAML or JSON) supplies defaults that explicit flags override."""
    return parse_with_config((ModelArguments, DataArguments, DistillTrainingArguments), argv)


def main(argv: list[str] | None = None) -> str:
    """Run distillation; returns the folder of the final gate-only checkpoint (`output_dir`)."""
    margs, dargs, targs = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    refuse_data_parallel(targs)
    set_seed(targs.seed)
    tokenizer = load_tokenizer(margs.model)
    model = load_distill_model(margs)
    check_context_length(model.config, dargs.train_length)
    train = build_train_dataset(dargs, tokenizer, targs.seed, targs.max_steps)

    resume = targs.resume_from_checkpoint
    if resume == "last":
        resume = get_last_checkpoint(targs.output_dir)
        if resume is None:
            logger.info("no checkpoint in %s: starting from scratch", targs.output_dir)
    arms = None
    if margs.decode_arms:
        from seer_attn.training.decode_arms import attach_decode_arms, parse_decode_arms

        if resume:
            raise ValueError("--decode_arms cannot resume a run: the run's checkpoints hold the main gates only")
        arms = parse_decode_arms(margs.decode_arms)
        n = attach_decode_arms(model, arms)
        logger.info("decode-gate arms %s: %d trainable parameters beside the gates", list(arms), n)
    Path(targs.output_dir).mkdir(parents=True, exist_ok=True)
    trainer = GateDistillTrainer(model=model, args=targs, train_dataset=train, data_collator=default_data_collator)
    trainer.add_callback(GateLossLogger(trainer, targs.layer_log_steps))
    trainer.add_callback(ThroughputCallback(dargs.train_length))  # <output_dir>/throughput.json
    if targs.profile_steps > 0:
        trainer.add_callback(ProfileCallback(targs.profile_steps))  # <output_dir>/profile.{json,txt}
    trainer.train(resume_from_checkpoint=resume)
    if dargs.layer_budget_docs > 0:
        from seer_attn.evaluation.layer_budgets import calibrate_layer_budgets

        source = dargs.layer_budget_dataset or dargs.dataset.split(",")[0].strip()
        calibrate_layer_budgets(model, tokenizer, source, dargs.train_length, dargs.layer_budget_docs,
                                split=dargs.dataset_split)
    trainer.save_model(targs.output_dir)
    if arms and trainer.args.should_save:
        from seer_attn.training.decode_arms import export_decode_arms

        for out in export_decode_arms(trainer.accelerator.unwrap_model(trainer.model), targs.output_dir, arms):
            logger.info("decode-gate arm written to %s", out)
    with open(Path(targs.output_dir) / "distill_args.json", "w") as f:
        json.dump({"model": vars(margs), "data": vars(dargs), "train": targs.to_dict()}, f, indent=2, default=str)
    logger.info("gate-only checkpoint written to %s", targs.output_dir)
    return targs.output_dir


if __name__ == "__main__":
    main()
