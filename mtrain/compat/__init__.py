"""Every workaround for a megatron-core (0.12.x) behaviour, in one place.

Each function below names the version it was seen on, the symptom without it, and the test that
shows it. A megatron-core or MindSpeed upgrade starts here: rerun those tests without the
workaround and delete what is no longer needed. The rest of mtrain reaches megatron-core only
through a few named seams: the model build (`mtrain/models/provider.py` and the layer specs in
`mtrain/kernels/`), LoRA's tensor-parallel linears (`mtrain/lora.py`), the pipeline schedule
(`mtrain/schedule.py`), the optimizer (`mtrain/optim.py`), process groups and their queries
(`mtrain/parallel.py`) and the CPU device backend (`mtrain/accel/cpu.py`).
"""

from mtrain.compat.megatron_core import (
    SequenceParallelRMSNorm,
    batch_p2p_comm,
    count_loss_tokens_over_context_parallel,
    forget_embedding_ranks,
    keep_frozen_tied_embedding_reducible,
    load_dist_optimizer_state,
    load_distributed_optimizer_state,
    mark_tensor_parallel_weights,
    optimizer_state_for_dist_load,
    pass_dcp_serialization_format,
    per_token_router_loss_coeff,
    tolerate_empty_fp8_quantization,
    tolerate_numpy2_in_dist_checkpointing,
    weigh_router_losses_per_loss_unit,
)

__all__ = [
    "SequenceParallelRMSNorm",
    "batch_p2p_comm",
    "count_loss_tokens_over_context_parallel",
    "forget_embedding_ranks",
    "keep_frozen_tied_embedding_reducible",
    "load_dist_optimizer_state",
    "load_distributed_optimizer_state",
    "mark_tensor_parallel_weights",
    "optimizer_state_for_dist_load",
    "pass_dcp_serialization_format",
    "per_token_router_loss_coeff",
    "tolerate_empty_fp8_quantization",
    "tolerate_numpy2_in_dist_checkpointing",
    "weigh_router_losses_per_loss_unit",
]
