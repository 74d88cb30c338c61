"""`ParallelPlan`: how one run's processes are laid out, built and checked once, then read-only.

Every part of a training run (process groups, model build, schedule, checkpoints, logs) reads the
same frozen plan. What is known only later (e.g. a forward-only pass over a different number of
micro-batches) is passed next to it, never written into it.
"""

from __future__ import annotations

from dataclasses import dataclass

from mtrain.errors import ConfigError


def data_parallel_size(tp: int, pp: int, world_size: int, cp: int = 1) -> int:
    """The DP size of a tp x pp (x cp) layout on `world_size` processes; refuses one that does
    not fit, naming the keys. The one place this rule and its message live."""
    model_parallel = tp * pp * cp
    if world_size % model_parallel:
        sizes = f"parallel.tp={tp} x parallel.pp={pp}" + (f" x parallel.cp={cp}" if cp > 1 else "")
        raise ConfigError(
            f"{sizes} = {model_parallel} does not divide the "
            f"{world_size} processes started; launch a multiple of {model_parallel} processes"
        )
    return world_size // model_parallel


def check_virtual_stages(pp: int, vpp: int, prefix: str = "parallel.") -> None:
    """Virtual pipeline chunks interleave pipeline stages: they need more than one. `prefix`
    names the keys as the command spells them (parallel.vpp, or a converter's vpp)."""
    if vpp < 1:
        raise ConfigError(f"{prefix}vpp={vpp} must be >= 1")
    if vpp > 1 and pp == 1:
        raise ConfigError(
            f"{prefix}vpp={vpp} needs {prefix}pp > 1 (virtual chunks interleave pipeline stages)"
        )


def check_experts_layout(tp: int, pp: int, dp: int, ep: int, etp: int | None) -> None:
    """megatron-core lays the experts out as etp x ep x pp x (expert DP) over the same processes
    as tp x pp x dp: EP takes its ranks from DP (and, with etp < tp, from TP)."""
    etp = tp if etp is None else etp
    if ep < 1 or etp < 1:
        raise ConfigError(f"parallel.ep={ep} and parallel.etp={etp} must be >= 1")
    if (tp * dp) % (etp * ep):
        raise ConfigError(
            f"parallel.ep={ep} x parallel.etp={etp} must divide parallel.tp={tp} x the "
            f"data-parallel size {dp}: expert parallelism splits the experts over data-parallel "
            "ranks; launch more processes or lower parallel.ep"
        )


@dataclass(frozen=True)
class ParallelPlan:
    """The layout of one run. `dp` = world_size / (tp * pp * cp); expert parallelism (`ep`)
    divides the data-parallel ranks of the expert layers and leaves the rest unchanged."""

    tp: int  # tensor-parallel size
    pp: int  # pipeline-parallel size
    vpp: int  # virtual pipeline chunks per stage; 1 = plain 1F1B
    dp: int  # data-parallel size
    world_size: int  # processes in the job
    micro_batches: int  # micro-batches per optimizer step on each DP rank
    micro_batch_size: int = 1  # samples per micro-batch
    sequence_parallel: bool = False  # activations split along the sequence within TP
    distributed_optimizer: bool = False  # optimizer state sharded over DP
    ep: int = 1  # expert-parallel size (MoE); 1 for dense models
    etp: int | None = None  # tensor-parallel size of the experts (MoE); None = tp
    cp: int = 1  # context-parallel size (long sequences)

    @classmethod
    def build(
        cls,
        tp: int,
        pp: int,
        world_size: int,
        vpp: int = 1,
        micro_batch_size: int = 1,
        global_batch_size: int | None = None,
        sequence_parallel: bool = False,
        distributed_optimizer: bool = False,
        cp: int = 1,
        ep: int = 1,
        etp: int | None = None,
    ) -> ParallelPlan:
        """Check the layout rules that need only the sizes (the model's own divisibility rules
        are `ModelSpec.check_parallel`)."""
        if cp < 1:
            raise ConfigError(f"parallel.cp={cp} must be >= 1")
        dp = data_parallel_size(tp, pp, world_size, cp)
        check_virtual_stages(pp, vpp)
        if sequence_parallel and tp == 1:
            raise ConfigError("parallel.sequence_parallel=true needs parallel.tp > 1")
        check_experts_layout(tp, pp, dp, ep, etp)
        global_batch_size = global_batch_size or micro_batch_size * dp
        if global_batch_size % (micro_batch_size * dp):
            raise ConfigError(
                f"train.global_batch_size={global_batch_size} must be a multiple of "
                f"train.micro_batch_size={micro_batch_size} x data-parallel size {dp}"
            )
        micro_batches = global_batch_size // (micro_batch_size * dp)
        if vpp > 1 and micro_batches % pp:
            raise ConfigError(
                f"the interleaved schedule (parallel.vpp={vpp}) needs the number of "
                f"micro-batches per step ({micro_batches}) to be a multiple of "
                f"parallel.pp={pp}"
            )
        return cls(
            tp=tp,
            pp=pp,
            vpp=vpp,
            dp=dp,
            world_size=world_size,
            micro_batches=micro_batches,
            micro_batch_size=micro_batch_size,
            sequence_parallel=sequence_parallel,
            distributed_optimizer=distributed_optimizer,
            cp=cp,
            ep=ep,
            etp=etp,
        )

    def describe(self) -> str:
        """`16 devices = tp 8 x pp 2 [x cp 2] x dp 1[, vpp 2][, sequence parallel]...`"""
        return (
            f"{self.world_size} devices = tp {self.tp} x pp {self.pp}"
            + (f" x cp {self.cp}" if self.cp > 1 else "")
            + f" x dp {self.dp}"
            + (f", vpp {self.vpp}" if self.vpp > 1 else "")
            + (f", ep {self.ep}" if self.ep > 1 else "")
            + (f", etp {self.etp}" if self.etp not in (None, self.tp) else "")
            + (", sequence parallel" if self.sequence_parallel else "")
            + (", distributed optimizer" if self.distributed_optimizer else "")
        )
