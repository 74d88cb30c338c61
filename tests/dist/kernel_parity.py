"""Worker: every kernel choice reproduces the HF model, for causal rows and packed rows.

    torchrun --nproc_per_node N tests/dist/kernel_parity.py RESULT.json HF_DIR CKPT CASE [CASE ...]

CASE is `kernels` or `kernels:switch=0,...` (npu.* switches off), e.g. `torch_npu:fused_rope=0`.
TP = N, PP = 1, on the device KERNEL_PARITY_DEVICE names (default cpu; e.g. cuda for `te`). For kernels=torch_npu, PYTHONPATH must hold tests/npu_emulation. Reports, per
case, the max |logits - HF| on causal rows and on packed rows (HF runs each packed segment
alone), and the max difference of the packed rows' parameter gradients from kernels=local.
"""

import json
import os
import sys
from pathlib import Path

import torch

from mtrain import accel, parallel
from mtrain.checkpoint import MegatronCheckpoint, load_model_weights
from mtrain.config.kernels import NpuConfig
from mtrain.data.packing import block_causal_mask
from mtrain.kernels.te import to_local_names
from mtrain.verify import hf_logits

SEQ = 32
CU = torch.tensor([[0, 7, 16, 32, 32], [0, 12, 25, 32, 32]], dtype=torch.int32)  # 2 rows


def case_options(case: str):
    kernels, _, switches = case.partition(":")
    npu = NpuConfig()
    for item in filter(None, switches.split(",")):
        key, value = item.split("=")
        setattr(npu, key, bool(int(value)))
    return kernels, npu


def main() -> None:
    result_path, hf_dir, ckpt_dir, *cases = sys.argv[1:]
    ckpt = MegatronCheckpoint.open(Path(ckpt_dir))
    generator = torch.Generator().manual_seed(0)
    plain = torch.randint(0, ckpt.spec.vocab_size, (2, SEQ), generator=generator)
    packed = torch.randint(0, ckpt.spec.vocab_size, (2, SEQ), generator=generator)
    # References before the CPU shim (see DESIGN.md): HF on whole rows, and on each segment.
    ref_plain = hf_logits(hf_dir, plain)
    ref_packed = torch.cat(
        [
            torch.cat(
                [
                    hf_logits(hf_dir, packed[r : r + 1, a:b])
                    for a, b in zip(CU[r, :-1].tolist(), CU[r, 1:].tolist())
                    if b > a
                ],
                dim=1,
            )
            for r in range(2)
        ]
    )
    accel.activate(os.environ.get("KERNEL_PARITY_DEVICE", "cpu"))
    device = accel.device()
    parallel.init(ckpt.tp, 1)
    from megatron.core import tensor_parallel

    from mtrain.models.provider import BuildOptions, build_model_chunks

    def logits(model, tokens, mask):
        tokens = tokens.to(device)
        positions = torch.arange(SEQ, device=device).expand_as(tokens)
        out = model(tokens, positions, attention_mask=None if mask is None else mask.to(device))
        full = tensor_parallel.gather_from_tensor_model_parallel_region(out)
        return full[..., : ckpt.spec.vocab_size].float().cpu()

    results, local_grads = {}, None
    for case in ["local", *cases]:
        kernels, npu = case_options(case)
        for packed_rows in (False, True):
            opts = BuildOptions(
                tp=ckpt.tp, kernels=kernels, npu=npu, explicit_attention_mask=packed_rows
            )
            (model,) = build_model_chunks(ckpt.spec, opts)
            model = model.to(device)
            load_model_weights([model], ckpt_dir, ckpt.spec, ckpt.tp, 1)
            if not packed_rows:
                with torch.no_grad():
                    diff_plain = (logits(model, plain, None) - ref_plain).abs().max().item()
                continue
            mask = CU if opts.cu_seqlens_masks else block_causal_mask(CU, SEQ)
            out = logits(model, packed, mask)
            diff_packed = (out.detach() - ref_packed).abs().max().item()
            out.float().pow(2).mean().backward()
            grads = {n: p.grad.float().cpu() for n, p in model.named_parameters()}
            to_local_names(grads)  # te's fused-norm parameters, by their local names
        if local_grads is None:
            local_grads = grads
        grad_diff = max((grads[n] - local_grads[n]).abs().max().item() for n in grads)
        results[case] = {"plain": diff_plain, "packed": diff_packed, "grad_vs_local": grad_diff}
    if torch.distributed.get_rank() == 0:
        Path(result_path).write_text(json.dumps(results))
    parallel.shutdown()


if __name__ == "__main__":
    main()
