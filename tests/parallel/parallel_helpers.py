"""Run diffusers' context and tensor parallelism in 2 CPU processes (gloo, loopback) for the parallel tests.

``launch(worker, *args)`` forks 2 processes with ``torch.multiprocessing``; each calls
``worker(rank, world, *args)`` after ``init`` set up the process group, and rank 0's return value comes back to the
caller (through a file). diffusers builds its device for a parallel config from ``torch.accelerator`` (0 devices on a
CPU-only machine, which it divides by): ``init`` makes it report 1, so the mesh is a CPU mesh and gloo carries it.

``register_cpu_lse_backend`` gives ring attention what it needs on a CPU: diffusers' ring templates call a backend
op that returns the log-sum-exp, and none of diffusers' backends does so on a CPU. It registers PyTorch's CPU flash
kernel (``aten._scaled_dot_product_flash_attention_for_cpu``, which returns the LSE) under the ``_native_flash``
backend name, in the test processes only.
"""

from __future__ import annotations

import os
import socket
import tempfile
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD = 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init(rank: int, world: int, port: int) -> None:
    """Process group on gloo over 127.0.0.1, and ``torch.accelerator.device_count`` reporting 1 (see above)."""
    torch.accelerator.device_count = lambda: 1
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)


def _entry(rank: int, world: int, port: int, path: str, worker, args) -> None:
    init(rank, world, port)
    try:
        result = worker(rank, world, *args)
        # The ranks end together: a rank that returns early (its forward failed before any collective) must not tear
        # the group down while the other is still setting up a collective of its own.
        dist.barrier()
        if rank == 0:
            torch.save({"result": result}, path)
    except BaseException:
        if rank == 0:
            torch.save({"error": traceback.format_exc()}, path)
        raise
    finally:
        dist.destroy_process_group()


def launch(worker, *args, world: int = WORLD):
    """Run ``worker(rank, world, *args)`` in ``world`` processes; returns rank 0's result (or raises its error)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "result.pt")
        try:
            # fork: the children inherit the imported torch/diffusers (a spawned child re-imports them, ~10 s each)
            mp.start_processes(
                _entry, args=(world, free_port(), path, worker, args), nprocs=world, join=True, start_method="fork"
            )
        except mp.ProcessRaisedException as err:
            if os.path.exists(path):
                raise RuntimeError(torch.load(path, weights_only=False).get("error", str(err))) from None
            raise
        return torch.load(path, weights_only=False)["result"]


def cp_config(kind: str, world: int = WORLD):
    """A ``ParallelConfig`` for ``kind`` ``"ulysses"`` or ``"ring"`` of degree ``world`` on a CPU mesh built by hand
    (mesh dims ``("ring", "ulysses")``)."""
    from diffusers import ContextParallelConfig
    from torch.distributed.device_mesh import init_device_mesh

    shape = (1, world) if kind == "ulysses" else (world, 1)
    mesh = init_device_mesh("cpu", shape, mesh_dim_names=("ring", "ulysses"))
    degrees = {"ulysses_degree": world} if kind == "ulysses" else {"ring_degree": world}
    return ContextParallelConfig(**degrees, mesh=mesh)


def tp_config(world: int = WORLD):
    """A ``TensorParallelConfig`` of degree ``world`` on a CPU mesh, with diffusers' device gate opened for "cpu"."""
    from diffusers import TensorParallelConfig
    from diffusers.hooks import tensor_parallel
    from torch.distributed.device_mesh import init_device_mesh

    if "cpu" not in tensor_parallel._SUPPORTED_TP_DEVICES:
        tensor_parallel._SUPPORTED_TP_DEVICES = (*tensor_parallel._SUPPORTED_TP_DEVICES, "cpu")
    return TensorParallelConfig(mesh=init_device_mesh("cpu", (world,), mesh_dim_names=("tp",)))


def _cpu_flash_forward_op(
    ctx, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False,
    return_lse=False, _save_ctx=True, _parallel_config=None,
):
    """diffusers' forward-op signature on PyTorch's CPU flash kernel: ``[B, S, H, D]`` in, ``(out [B, S, H, D],
    lse [B, S, H])`` out (inference only: nothing saved for backward)."""
    if attn_mask is not None:
        raise ValueError("the CPU LSE test backend takes no attn_mask")
    q, k, v = (x.transpose(1, 2) for x in (query, key, value))
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q, k, v, dropout_p, is_causal, attn_mask=None, scale=scale
    )
    out, lse = out.transpose(1, 2).contiguous(), lse.transpose(1, 2).contiguous()
    return (out, lse) if return_lse else out


def _cpu_flash_attention(
    query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False,
    return_lse=False, _parallel_config=None,
):
    from diffusers.models.attention_dispatch import _templated_context_parallel_attention

    if _parallel_config is None:
        return _cpu_flash_forward_op(None, query, key, value, attn_mask, dropout_p, is_causal, scale, False, return_lse)
    return _templated_context_parallel_attention(
        query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, return_lse,
        forward_op=_cpu_flash_forward_op, backward_op=None, _parallel_config=_parallel_config,
    )


def register_cpu_lse_backend() -> str:
    """Register ``_cpu_flash_attention`` as diffusers' ``_native_flash`` backend (context parallel, LSE) in this
    process; returns the backend name to pass to ``set_attention_backend``."""
    from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry

    name = AttentionBackendName._NATIVE_FLASH
    _AttentionBackendRegistry.register(name, constraints=[], supports_context_parallel=True)(_cpu_flash_attention)
    return name.value
