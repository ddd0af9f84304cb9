"""Process groups for the recipe: one process, DDP, or FSDP, set up from torchrun's environment.

    torchrun --nproc_per_node N -m training --config X.yaml   ->  RANK / WORLD_SIZE / LOCAL_RANK set here

Strategies:
    none  one process (or every rank alone, for debugging)
    ddp   DistributedDataParallel: every rank holds the whole model; gradients are averaged
    fsdp  FSDP2 ``fully_shard``: each LLM decoder layer is its own shard unit, then the root; parameters,
          gradients and optimiser state are sharded (the 13B LLM does not fit one 80 GB GPU with AdamW)

Checkpoint helpers return full (unsharded) tensors so every strategy writes the same FAVOR checkpoint.
"""

from __future__ import annotations

import faulthandler
import os
import signal
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import nn

Strategy = Literal["none", "ddp", "fsdp"]
STRATEGIES = ("none", "ddp", "fsdp")


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(backend: str | None = None) -> DistInfo:
    """Join the process group torchrun describes (env RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT).

    Without those variables (a plain ``favor-train``) this is one process on CUDA if present, else CPU.
    Backend: nccl on CUDA, gloo on CPU, unless given.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend or ("nccl" if cuda else "gloo"), rank=rank, world_size=world)
        # A rank stuck in a collective shows where: `kill -USR1 PID` prints every thread's stack to stderr.
        faulthandler.register(signal.SIGUSR1, all_threads=True)
    return DistInfo(rank, world, local, device)


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The LLM's transformer blocks (peft-wrapped or not): FSDP's shard units."""
    base = model.llm.base
    return list(base.model.layers)


def wrap_model(model: nn.Module, strategy: Strategy, info: DistInfo, *, find_unused: bool = True,
               bf16_params: bool = False) -> nn.Module:
    """Wrap for data parallelism. ``find_unused``: batches without a modality leave trainable
    parameters (e.g. the demo's visual encoder) without gradients, which plain DDP would reject."""
    if strategy not in STRATEGIES:
        raise ValueError(f"distributed strategy must be one of {STRATEGIES}, got {strategy!r}")
    if strategy == "none" or not info.enabled:
        return model
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [info.device.index] if info.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids, find_unused_parameters=find_unused)
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    # bf16 parameters for compute, fp32 gradient reduction: the usual FSDP mixed precision.
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16_params \
        else MixedPrecisionPolicy()
    for layer in decoder_layers(model):
        fully_shard(layer, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    return model


def unwrap(model: nn.Module) -> nn.Module:
    """The FavorModel inside a DDP wrapper (FSDP2 shards in place, so it is the model itself)."""
    return model.module if hasattr(model, "module") and isinstance(model.module, nn.Module) else model


def trainable_state(model: nn.Module, strategy: Strategy) -> dict[str, torch.Tensor]:
    """Full trainable tensors on CPU under FavorModel names. Collective under FSDP (call on all ranks);
    there only rank 0 gets the tensors, the others an empty dict."""
    inner = unwrap(model)
    names = [n for n, p in inner.named_parameters() if p.requires_grad]
    if strategy == "fsdp" and dist.is_initialized():
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return {n: full[n] for n in names if n in full}  # cpu_offload: only rank 0 receives the tensors
    params = dict(inner.named_parameters())
    return {n: params[n].detach().cpu().clone() for n in names}


def optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, strategy: Strategy) -> dict:
    if strategy == "fsdp" and dist.is_initialized():
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(model, optimizer,
                                        options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return optimizer.state_dict()


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict,
                         strategy: Strategy) -> None:
    if strategy == "fsdp" and dist.is_initialized():
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(model, optimizer, state,
                                 options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=False))
        return
    optimizer.load_state_dict(state)


def all_reduce_mean(values: torch.Tensor) -> torch.Tensor:
    """Mean over ranks (identity in one process)."""
    if not dist.is_initialized():
        return values
    out = values.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out / dist.get_world_size()


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    if not dist.is_initialized():
        return values
    out = values.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj`` on every rank (a one-element list in one process)."""
    if not dist.is_initialized():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def cleanup() -> None:
    """Leave the process group after a run that succeeded on this rank.

    A barrier first, so that no rank tears its connections down while a peer still waits in the last
    collective (destroy_process_group can hang otherwise, pytorch#75097). Not after a failure: destroying
    while a peer sits in a collective deadlocks, and torchrun stops the remaining ranks anyway."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
