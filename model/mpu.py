"""All tensor-/data-parallel communication lives here (Megatron's 2019 `mpu`).

Model-parallel groups are consecutive ranks [k*MP, (k+1)*MP); data-parallel groups are the ranks with equal
`rank % MP`. Every function is a no-op (or the identity) when torch.distributed is not initialised or the group
has one rank, so TP=1, gloo and NCCL share one code path.
"""
import contextlib
from typing import Any, Iterator, List, Optional

import torch
import torch.distributed as dist

_MP_GROUP = None
_DP_GROUP = None
_MP_SIZE = 1


def initialize_model_parallel(model_parallel_size: int) -> None:
    """Create the model- and data-parallel groups (every rank must call this, in the same order)."""
    global _MP_GROUP, _DP_GROUP, _MP_SIZE
    _MP_SIZE = model_parallel_size
    if not dist.is_initialized():
        return
    world, rank = dist.get_world_size(), dist.get_rank()
    for start in range(0, world, model_parallel_size):
        ranks = list(range(start, start + model_parallel_size))
        group = dist.new_group(ranks)
        if rank in ranks:
            _MP_GROUP = group
    for offset in range(model_parallel_size):
        ranks = list(range(offset, world, model_parallel_size))
        group = dist.new_group(ranks)
        if rank in ranks:
            _DP_GROUP = group


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def destroy_model_parallel(barrier: bool = True) -> None:
    """Tear torch.distributed down before the interpreter exits (a no-op when it was never initialised).

    Every process that initialised torch.distributed must call this at exit: gloo's worker threads drop their last
    reference to a finished collective (and to its tensors) a moment after the collective returns, and dropping a
    tensor that still has a Python object takes the GIL. If the interpreter is already finalising by then, Python
    ends that thread with pthread_exit inside a C++ destructor and the process dies with "terminate called without
    an active exception" (SIGABRT), at random, more often on a loaded machine. destroy_process_group, with no
    Python references to the groups left, destroys the process groups and joins their threads while the interpreter
    is still whole. `barrier` first waits for every rank to get here (the normal end of a run, so no rank tears down
    its connections while another still uses them); pass False on an error path, where the other ranks may never
    reach a barrier.
    """
    global _MP_GROUP, _DP_GROUP, _MP_SIZE
    _MP_GROUP = _DP_GROUP = None  # the last Python references to the subgroups: their destructors run below
    _MP_SIZE = 1
    if not _distributed():
        return
    try:
        if barrier:
            dist.barrier()
    finally:
        dist.destroy_process_group()


@contextlib.contextmanager
def destroy_model_parallel_at_exit() -> Iterator[None]:
    """`with` body runs an entry point; on the way out torch.distributed is destroyed (see destroy_model_parallel):
    after a final barrier when the body returned, without one when it raised (the exception then propagates)."""
    try:
        yield
    except BaseException:
        destroy_model_parallel(barrier=False)
        raise
    destroy_model_parallel(barrier=True)


def get_model_parallel_group():
    return _MP_GROUP


def get_data_parallel_group():
    return _DP_GROUP


def get_model_parallel_world_size() -> int:
    return _MP_SIZE if _distributed() else 1


def get_model_parallel_rank() -> int:
    return dist.get_rank() % _MP_SIZE if _distributed() else 0


def get_model_parallel_src_rank() -> int:
    """Global rank of model-parallel rank 0 in this rank's group."""
    return dist.get_rank() - get_model_parallel_rank() if _distributed() else 0


def get_data_parallel_world_size() -> int:
    return dist.get_world_size() // _MP_SIZE if _distributed() else 1


def get_data_parallel_rank() -> int:
    return dist.get_rank() // _MP_SIZE if _distributed() else 0


def get_rank() -> int:
    return dist.get_rank() if _distributed() else 0


def barrier(group=None) -> None:
    if _distributed():
        dist.barrier(group=group)


def _all_reduce_sum(x: torch.Tensor, group) -> torch.Tensor:
    # gloo has no reliable half/bfloat16 reductions: sum those in fp32 (it is also more accurate).
    if x.dtype in (torch.float16, torch.bfloat16) and dist.get_backend(group) == "gloo":
        y = x.float()
        dist.all_reduce(y, group=group)
        return y.to(x.dtype)
    dist.all_reduce(x, group=group)
    return x


def reduce_from_model_parallel_region(x: torch.Tensor) -> torch.Tensor:
    """Sum of the partial results of all model-parallel ranks (row-parallel output)."""
    if get_model_parallel_world_size() == 1:
        return x
    return _all_reduce_sum(x.contiguous(), _MP_GROUP)


def gather_from_model_parallel_region(x: torch.Tensor) -> torch.Tensor:
    """Concatenate the ranks' slices of the last dimension (column-parallel output, vocab logits)."""
    world = get_model_parallel_world_size()
    if world == 1:
        return x
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x, group=_MP_GROUP)
    return torch.cat(parts, dim=-1)


def all_reduce_model_parallel(x: torch.Tensor, op=None) -> torch.Tensor:
    """In-place all-reduce over the model-parallel group (op defaults to SUM)."""
    if get_model_parallel_world_size() > 1:
        if op is None or op == dist.ReduceOp.SUM:
            x.copy_(_all_reduce_sum(x, _MP_GROUP))
        else:
            dist.all_reduce(x, op=op, group=_MP_GROUP)
    return x


def broadcast_from_model_parallel_src(x: torch.Tensor) -> torch.Tensor:
    """Make every model-parallel rank hold model-parallel rank 0's `x` (in place)."""
    if get_model_parallel_world_size() > 1:
        dist.broadcast(x, get_model_parallel_src_rank(), group=_MP_GROUP)
    return x


def broadcast_object_from_model_parallel_src(obj: Any) -> Any:
    if get_model_parallel_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, get_model_parallel_src_rank(), group=_MP_GROUP)
    return box[0]


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Every rank gets global rank `src`'s object."""
    if not _distributed() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src)
    return box[0]


def all_gather_object_data_parallel(obj: Any) -> List[Any]:
    """One object per data-parallel rank, in data-parallel rank order."""
    if get_data_parallel_world_size() == 1:
        return [obj]
    out: List[Optional[Any]] = [None] * get_data_parallel_world_size()
    dist.all_gather_object(out, obj, group=_DP_GROUP)
    return out


def _vocab_parallel_log_z(logits: torch.Tensor) -> torch.Tensor:
    """log Σ exp over the whole (sharded) vocabulary of each row of fp32 `logits` [..., V/mp]."""
    row_max = logits.max(dim=-1).values
    all_reduce_model_parallel(row_max, dist.ReduceOp.MAX if get_model_parallel_world_size() > 1 else None)
    # Terms below e^-80 cannot change an fp32 sum that is at least 1 (the max term); clamping keeps exp out of
    # subnormal results, which x86 computes many times slower (a random model's logits span hundreds of nats).
    sum_exp = (logits - row_max.unsqueeze(-1)).clamp_(min=-80.0).exp_().sum(dim=-1)
    all_reduce_model_parallel(sum_exp)
    return row_max + sum_exp.log()


def _vocab_parallel_pick(logits: torch.Tensor, ids: torch.Tensor, rows: Optional[torch.Tensor] = None) -> torch.Tensor:
    """logits[..., ids] (or logits[rows, ids] for 2-D logits) where ids are global vocabulary ids (each rank holds
    V/mp of them)."""
    part = logits.shape[-1]
    start = get_model_parallel_rank() * part
    local_ids = (ids - start).clamp(0, part - 1)
    if rows is None:
        picked = logits.gather(-1, local_ids.unsqueeze(-1)).squeeze(-1)
    else:
        picked = logits[rows, local_ids]
    return all_reduce_model_parallel(picked * ((ids >= start) & (ids < start + part)))


def vocab_parallel_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-token cross entropy from vocab-sharded logits [..., V/mp] (fp32), without gathering the vocabulary."""
    logits = logits.float()
    return _vocab_parallel_log_z(logits) - _vocab_parallel_pick(logits, targets)


def vocab_parallel_log_probs(logits: torch.Tensor, rows: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """log softmax(logits[rows[n]])[ids[n]] for each n, from vocab-sharded rows `logits` [R, V/mp] (fp32)."""
    logits = logits.float()
    return _vocab_parallel_pick(logits, ids, rows) - _vocab_parallel_log_z(logits)[rows]


def vocab_parallel_scores(logits: torch.Tensor, ids: torch.Tensor, k: int):
    """For each row n of vocab-sharded `logits` [N, V/mp]: log softmax[ids[n]], and the k largest log softmax values
    with their global ids ([N, k] each; k may be 0), without gathering the vocabulary: each rank's k best,
    gathered, then the best k of those."""
    logits = logits.float()
    log_z = _vocab_parallel_log_z(logits)
    chosen = _vocab_parallel_pick(logits, ids) - log_z
    if k == 0:
        empty = logits.new_zeros((logits.shape[0], 0))
        return chosen, empty, empty.long()
    values, top = torch.topk(logits, k, dim=-1)
    values = gather_from_model_parallel_region(values - log_z.unsqueeze(-1))
    top = gather_from_model_parallel_region(top + get_model_parallel_rank() * logits.shape[-1])
    best, where = torch.topk(values, k, dim=-1)
    return chosen, best, top.gather(-1, where)


def vocab_parallel_is_argmax(logits: torch.Tensor, rows: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Whether ids[n] has the largest logit of row rows[n] of vocab-sharded `logits` [R, V/mp] (bool [N])."""
    logits = logits.float()
    row_max = logits.max(dim=-1).values
    all_reduce_model_parallel(row_max, dist.ReduceOp.MAX if get_model_parallel_world_size() > 1 else None)
    return _vocab_parallel_pick(logits, ids, rows) >= row_max[rows]


def print_rank_0(*args, **kwargs) -> None:
    if get_rank() == 0:
        print(*args, **kwargs, flush=True)
