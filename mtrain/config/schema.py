"""The structured configs of the training commands (pt, and later sft and dpo).

Every key has a type, a default and a one-line comment; `conf/*.yaml` only sets values. All
checks that can be made before a process group exists are made by `validate`, and each error
names the keys involved.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

from mtrain.checkpoint.layout import TRACKER
from mtrain.config.data import DataConfig
from mtrain.config.kernels import KERNELS, NpuConfig
from mtrain.config.lora import LoraConfig
from mtrain.config.model import ModelConfig
from mtrain.config.moe import MoeConfig
from mtrain.context_parallel import check_context_parallel
from mtrain.dtypes import parse_dtype
from mtrain.errors import ConfigError
from mtrain.models.spec import ModelSpec
from mtrain.plan import ParallelPlan

PRECISIONS = ("bf16", "fp16", "fp32")
FINETUNING_TYPES = ("full", "freeze", "lora")
DECAY_STYLES = ("cosine", "linear", "constant")
RECOMPUTE = (None, "selective", "full")
ON_NAN = ("stop", "skip")
CHECKPOINT_FORMATS = ("legacy", "torch_dist")


def check_positive(group: str, config: Any, *keys: str) -> None:
    """Each of `keys` of `config` is null (where allowed) or positive; errors name `group.key`."""
    for key in keys:
        value = getattr(config, key)
        if value is not None and value <= 0:
            raise ConfigError(f"{group}.{key}={value} must be positive")


@dataclass
class ParallelConfig:
    tp: int | None = None  # tensor-parallel size; default: the model preset's recommended_tp
    pp: int | None = None  # pipeline-parallel size; default: the model preset's recommended_pp
    vpp: int = 1  # virtual pipeline chunks per stage (interleaved 1F1B); 1 = plain 1F1B
    sequence_parallel: bool = False  # split activations along the sequence within TP (needs tp > 1)
    distributed_optimizer: bool = False  # shard optimizer state across data-parallel ranks
    overlap_grad_reduce: bool = False  # overlap the DP gradient all-reduce with backward
    cp: int = 1  # context-parallel size: every sequence split over cp ranks (long context)
    # MindSpeed's CP with kernels=mindspeed: ulysses_cp_algo | megatron_cp_algo (ring); the other
    # kernels run mtrain's Ulysses (te: megatron-core's own CP)
    cp_algo: str = "ulysses_cp_algo"
    ep: int | None = (
        None  # MoE: expert-parallel size (splits the experts over DP ranks); default: recommended_ep
    )
    etp: int | None = (
        None  # MoE: tensor-parallel size of the experts; default: tp (megatron-core's)
    )


@dataclass
class TrainConfig:
    iters: int | None = None  # optimizer steps to train for (or give train.epochs)
    epochs: float | None = None  # passes over the data; sets iters once the data size is known
    micro_batch_size: int = 1  # sequences per forward pass per data-parallel rank
    global_batch_size: int = 8  # sequences per optimizer step, over all DP ranks and micro-batches
    seq_length: int = 2048  # tokens per sequence
    lr: float = 1e-5  # peak learning rate
    min_lr: float = 0.0  # learning rate at the end of the decay
    warmup_iters: int = 0  # linear warm-up steps from 0 to lr
    decay_style: str = "cosine"  # cosine | linear | constant, from the end of warm-up to `iters`
    weight_decay: float = 0.0  # decoupled (AdamW) weight decay
    adam_beta1: float = 0.9  # Adam first-moment decay
    adam_beta2: float = 0.95  # Adam second-moment decay
    adam_eps: float = 1e-8  # Adam denominator epsilon
    clip_grad: float = 1.0  # max global gradient norm; 0 disables clipping
    precision: str = "bf16"  # bf16 | fp16 (dynamic loss scaling) | fp32
    seed: int = 1234  # model init, dropout and data order
    recompute: str | None = None  # activation recomputation: null | selective | full
    on_nan: str = "stop"  # a NaN/Inf loss or grad norm: stop (naming the iteration) | skip the step
    init_std: float = 0.02  # std of the random init when training from scratch
    exit_after_iters: int | None = None  # stop (saving a checkpoint) after N iterations of this run

    def validate(self) -> TrainConfig:
        for key, allowed in (
            ("precision", PRECISIONS),
            ("decay_style", DECAY_STYLES),
            ("recompute", RECOMPUTE),
            ("on_nan", ON_NAN),
        ):
            if getattr(self, key) not in allowed:
                names = ", ".join("null" if a is None else a for a in allowed)
                raise ConfigError(f"train.{key}={getattr(self, key)} is not one of {names}")
        if (self.iters is None) == (self.epochs is None):
            raise ConfigError("give exactly one of train.iters and train.epochs")
        if self.epochs is not None and self.epochs <= 0:
            raise ConfigError(f"train.epochs={self.epochs} must be positive")
        check_positive(
            "train", self, "iters", "micro_batch_size", "global_batch_size", "seq_length"
        )
        for key in ("lr", "min_lr", "weight_decay", "clip_grad", "warmup_iters"):
            if getattr(self, key) < 0:
                raise ConfigError(f"train.{key}={getattr(self, key)} must be >= 0")
        for key in ("adam_eps", "init_std"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"train.{key}={getattr(self, key)} must be positive")
        for key in ("adam_beta1", "adam_beta2"):
            if not 0.0 <= getattr(self, key) < 1.0:
                raise ConfigError(f"train.{key}={getattr(self, key)} must be in [0, 1)")
        check_iters(self)
        check_positive("train", self, "exit_after_iters")
        if self.min_lr > self.lr:
            raise ConfigError(f"train.min_lr={self.min_lr} exceeds train.lr={self.lr}")
        return self


@dataclass
class CheckpointConfig:
    save_interval: int | None = None  # save every N iterations (and always at the end)
    keep_last: int | None = None  # keep only the N newest checkpoints in `save`; null keeps all
    finetune: bool = False  # `load` gives weights only: iteration, optimizer and data restart
    format: str = "legacy"  # legacy (a file per TP x PP rank) | torch_dist (reshards on resume)
    save_hf: bool = False  # at the end of training also write an HF model: <save>/iter_N/hf
    save_hf_every_save: bool = False  # with save_hf: export at every save, not only the last
    save_hf_lora: str = "merged"  # LoRA runs: merged (base + adapters) | adapter (PEFT adapter)
    save_hf_dtype: str | None = None  # bf16 | fp16 | fp32 for the HF model; default: training's

    def validate(self) -> CheckpointConfig:
        check_positive("checkpoint", self, "save_interval", "keep_last")
        if self.format not in CHECKPOINT_FORMATS:
            raise ConfigError(
                f"checkpoint.format={self.format} is not one of {', '.join(CHECKPOINT_FORMATS)}"
            )
        if self.save_hf_lora not in ("merged", "adapter"):
            raise ConfigError(
                f"checkpoint.save_hf_lora={self.save_hf_lora} is not one of merged, adapter"
            )
        parse_dtype(self.save_hf_dtype, "checkpoint.save_hf_dtype")
        if self.save_hf_every_save and not self.save_hf:
            raise ConfigError("checkpoint.save_hf_every_save=true needs checkpoint.save_hf=true")
        return self


@dataclass
class LogConfig:
    interval: int = 1  # iterations between progress lines
    tensorboard_dir: str | None = None  # write tensorboard scalars here
    metrics_file: str | None = None  # append every iteration's metrics here as JSON lines
    wandb_project: str | None = None  # also log to Weights & Biases (needs `pip install wandb`)
    peak_tflops: float | None = None  # per-device peak for MFU; default from the device table
    all_ranks: bool = False  # log from every rank, not just rank 0

    def validate(self) -> LogConfig:
        check_positive("log", self, "interval")
        return self


@dataclass
class EvalConfig:
    interval: int | None = None  # validate every N iterations and at the end; null = never
    max_batches: int | None = None  # global batches per validation; null = the whole set

    def validate(self) -> EvalConfig:
        check_positive("eval", self, "interval", "max_batches")
        return self


@dataclass
class FreezeConfig:
    trainable: list[str] = field(
        default_factory=list
    )  # patterns of what trains, see mtrain/freeze.py


@dataclass
class TrainingCommandConfig:
    """Top level of `python -m mtrain.pt` (and the base of sft/dpo)."""

    model: ModelConfig = field(default_factory=ModelConfig)  # model.hf_dir=DIR or +model=<preset>
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    finetuning_type: str = "full"  # full | freeze (only freeze.trainable trains) | lora
    freeze: FreezeConfig = field(default_factory=FreezeConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)  # adapters for finetuning_type=lora
    device: str = "auto"  # auto | cpu | cuda | npu
    # GiB per device that dry_run checks its memory estimate against; default by device: 64
    # (Ascend 910B, an A3 die; also for auto), 80 (cuda)
    device_memory_gib: float | None = None
    kernels: str = "auto"  # layers: auto | local | sdpa | te | torch_npu | mindspeed
    npu: NpuConfig = field(default_factory=NpuConfig)  # Ascend fused kernels and MindSpeed flags
    moe: MoeConfig = field(default_factory=MoeConfig)  # MoE routing and balancing in training
    load: str | None = (
        None  # checkpoint to start from (Megatron legacy format); default: resume `save`
    )
    save: str | None = None  # where checkpoints go
    dry_run: bool = False  # validate the config and print the plan, then exit


def check_iters(tr: TrainConfig) -> None:
    """The checks that need `train.iters` (known late when set through train.epochs)."""
    if tr.iters is not None and tr.warmup_iters > tr.iters:
        raise ConfigError(f"train.warmup_iters={tr.warmup_iters} exceeds train.iters={tr.iters}")


def iters_for_epochs(tr: TrainConfig, samples_per_epoch: int) -> int:
    """Resolve train.epochs into train.iters (whole global batches, at least one)."""
    if samples_per_epoch < tr.global_batch_size:
        raise ConfigError(
            f"the data holds {samples_per_epoch} samples of train.seq_length="
            f"{tr.seq_length}, fewer than one global batch "
            f"({tr.global_batch_size}); add data or lower the batch size"
        )
    tr.iters = max(1, math.floor(tr.epochs * samples_per_epoch / tr.global_batch_size))
    check_iters(tr)
    return tr.iters


def resolve_layout(cfg: TrainingCommandConfig) -> tuple[int, int]:
    tp = cfg.parallel.tp if cfg.parallel.tp is not None else cfg.model.recommended_tp
    pp = cfg.parallel.pp if cfg.parallel.pp is not None else cfg.model.recommended_pp
    return tp, pp


def check_combinations(cfg: TrainingCommandConfig, spec: ModelSpec) -> None:
    """The rules that involve more than one config group (each group checks its own keys)."""
    if cfg.kernels not in KERNELS:
        raise ConfigError(f"kernels={cfg.kernels} is not one of {', '.join(KERNELS)}")
    if cfg.train.seq_length > spec.max_position_embeddings:
        raise ConfigError(
            f"train.seq_length={cfg.train.seq_length} exceeds the model's "
            f"max_position_embeddings={spec.max_position_embeddings}"
        )
    ck = cfg.checkpoint
    if ck.save_interval is not None and cfg.save is None:
        raise ConfigError("checkpoint.save_interval is set but save is not; pass save=DIR")
    if ck.save_hf and cfg.save is None:
        raise ConfigError(
            "checkpoint.save_hf=true needs save=DIR: the HF model is written from the saved "
            "checkpoint into DIR/iter_N/hf"
        )
    if ck.format == "torch_dist" and cfg.finetuning_type == "lora":
        raise ConfigError(
            "checkpoint.format=torch_dist is for full and freeze runs; LoRA saves its adapters "
            "in the legacy format (drop checkpoint.format)"
        )
    if ck.finetune and cfg.load is None:
        raise ConfigError("checkpoint.finetune=true needs load=CKPT_DIR")
    if cfg.finetuning_type not in FINETUNING_TYPES:
        raise ConfigError(
            f"finetuning_type={cfg.finetuning_type} is not one of {', '.join(FINETUNING_TYPES)}"
        )
    if cfg.finetuning_type == "lora":
        cfg.lora.validate()
        if cfg.load is None and not (cfg.save and (Path(cfg.save) / TRACKER).is_file()):
            raise ConfigError(
                "finetuning_type=lora needs load=CKPT_DIR: the base model the adapters train on "
                "(e.g. the output of converters.hf2mcore)"
            )
    if cfg.finetuning_type == "freeze" and not cfg.freeze.trainable:
        raise ConfigError(
            "finetuning_type=freeze needs freeze.trainable, e.g. "
            "freeze.trainable=[layers.-4:,output_layer]"
        )


def _groups(cfg: Any) -> list[Any]:
    """The config groups of a command config that check themselves (`validate()`), in order.
    The model is checked by `ModelConfig.spec()`, the `lora` group only when LoRA is on (see
    check_combinations)."""
    values = [getattr(cfg, f.name) for f in fields(cfg) if f.name not in ("model", "lora")]
    return [v for v in values if is_dataclass(v) and callable(getattr(v, "validate", None))]


def validate(
    cfg: TrainingCommandConfig, world_size: int, spec: ModelSpec | None = None
) -> ParallelPlan:
    """Every check that needs no process group, once; returns the run's parallel plan."""
    for group in _groups(cfg):
        group.validate()
    spec = cfg.model.spec() if spec is None else spec
    tp, pp = resolve_layout(cfg)
    par, tr = cfg.parallel, cfg.train
    ep = par.ep if par.ep is not None else (cfg.model.recommended_ep if spec.is_moe else 1)
    try:
        spec.check_parallel(tp, pp, par.vpp)
        spec.check_experts(ep, par.etp or tp)
    except ConfigError as err:
        raise ConfigError(f"parallel: {err}") from None
    if spec.is_moe and par.etp not in (None, tp) and (cfg.load or cfg.save):
        raise ConfigError(
            f"parallel.etp={par.etp} with parallel.tp={tp}: checkpoints and HF weights are "
            "read and written with the experts split like the rest of the model (etp = tp, "
            "megatron-core 0.12's default); leave parallel.etp unset to load= or save="
        )
    if spec.is_moe and cfg.checkpoint.format == "torch_dist":
        raise ConfigError(
            "checkpoint.format=torch_dist is not supported for MoE models yet; use the legacy "
            "format (one file per TP x PP x EP rank, as Megatron-LM writes it)"
        )
    if spec.is_moe and par.cp > 1:
        raise ConfigError(
            f"parallel.cp={par.cp} with an MoE model is not supported yet (its router losses "
            "and token dispatch are verified without context parallelism); use parallel.cp=1"
        )
    lora_mlp = {"linear_fc1", "linear_fc2"} & set(cfg.lora.target_modules)
    if spec.is_moe and cfg.moe.grouped_gemm and cfg.finetuning_type == "lora" and lora_mlp:
        raise ConfigError(
            f"moe.grouped_gemm=true with LoRA on {sorted(lora_mlp)}: a grouped GEMM runs each "
            "rank's experts as one matmul, with no per-expert linear for an adapter; set "
            "moe.grouped_gemm=false, or lora.target_modules=[linear_qkv,linear_proj]"
        )
    if spec.is_moe and tp > 1 and tr.seq_length % tp:
        raise ConfigError(
            f"train.seq_length={tr.seq_length} must be a multiple of parallel.tp={tp}: an MoE "
            "model with TP runs sequence-parallel (megatron-core needs it for its experts)"
        )
    plan = ParallelPlan.build(
        tp,
        pp,
        world_size,
        vpp=par.vpp,
        micro_batch_size=tr.micro_batch_size,
        global_batch_size=tr.global_batch_size,
        sequence_parallel=par.sequence_parallel,
        distributed_optimizer=par.distributed_optimizer,
        cp=par.cp,
        ep=ep,
        etp=par.etp,
    )
    check_combinations(cfg, spec)
    check_context_parallel(cfg, spec, tp, cfg.kernels)
    return plan
