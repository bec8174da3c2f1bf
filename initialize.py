"""Command-line flags, distributed set-up, and model + tokenizer construction (the original's initialize.py).

Accepts the original's model flags so configs/model_glm_130b*.sh work unchanged; runs single-process with no
launcher, under torchrun, or under the DeepSpeed launcher (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT).
"""
import argparse
import os
import random
import sys
import time
from typing import Callable, Optional

import numpy as np
import torch
import torch.distributed as dist

from model import GLM130B, GLMConfig, mpu
from model.checkpoint import load_checkpoint
from model.errors import UserError
from model.offload import GIB, LayerStreamer, plan_offload
from quantization import checkpoint_preparer, quantize


def add_model_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("model")
    g.add_argument("--model-parallel-size", type=int, default=1)
    g.add_argument("--num-layers", type=int, default=24)
    g.add_argument("--hidden-size", type=int, default=1024)
    g.add_argument("--inner-hidden-size", type=int, default=None)
    g.add_argument("--vocab-size", type=int, default=0)
    g.add_argument("--num-attention-heads", type=int, default=16)
    g.add_argument("--max-sequence-length", type=int, default=512)
    g.add_argument("--layernorm-epsilon", type=float, default=1e-5)
    g.add_argument("--layernorm-order", default="post", choices=["post", "pre", "sandwich"],
                   help="accepted for compatibility; GLM-130B is always DeepNorm post-LN")
    g.add_argument("--tokenizer-type", default="icetk-glm-130B")
    g.add_argument("--tokenizer-path", default=None,
                   help="ice_text.model (or its folder); default $ICETK_MODELS or ~/.icetk_models")
    g.add_argument("--load", default=None, help="SAT checkpoint folder (holds `latest`)")
    g.add_argument("--skip-init", action="store_true", help="accepted for compatibility (weights are never initialised)")
    g.add_argument("--mode", default="inference", choices=["inference", "pretrain", "finetune"])
    g.add_argument("--seed", type=int, default=1234)
    prec = g.add_mutually_exclusive_group()
    prec.add_argument("--fp16", action="store_true")
    prec.add_argument("--bf16", action="store_true")
    prec.add_argument("--fp32", action="store_true")
    g.add_argument("--exact-rope", action="store_true",
                   help="exact fp32 RoPE tables instead of SAT 0.2.x's fp16-rounded ones")
    g.add_argument("--attention", default="auto", choices=["auto", "plain", "sdpa"],
                   help="plain = SAT's exact op order; sdpa = fused kernel; auto = sdpa for bf16")
    g.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: this rank's GPU if any, else cpu)")
    g.add_argument("--local_rank", "--local-rank", type=int, default=None, help="set by the DeepSpeed launcher")
    q = parser.add_argument_group("quantization")
    q.add_argument("--quantization-bit-width", type=int, default=None, choices=[4, 8])
    q.add_argument("--from-quantized-checkpoint", action="store_true")
    o = parser.add_argument_group("offload (the original's BMInf flags)")
    o.add_argument("--bminf", action="store_true",
                   help="weight offload for small GPUs or little RAM: the layers that do not fit "
                        "--bminf-memory-limit are streamed from host memory (CPU: from the checkpoint file) per forward")
    o.add_argument("--bminf-memory-limit", type=float, default=20,
                   help="GB (GiB) of weights held per device with --bminf, swap buffers included (default 20)")
    i = parser.add_argument_group("initialization")
    i.add_argument("--sequential-initialization", action="store_true",
                   help="load the model-parallel shards one rank at a time (lower peak host RAM)")
    i.add_argument("--allow-non-finite-weights", action="store_true",
                   help="load a checkpoint holding NaN/Inf weights anyway (by default it is refused, naming the keys)")
    i.add_argument("--random-init", action="store_true",
                   help="no checkpoint: random weights created directly on --device, already INT8/INT4 with "
                        "--quantization-bit-width (speed measurements at full size; the outputs are meaningless)")


def parse_args(extra_args_provider: Optional[Callable] = None, argv=None, known_only=False) -> argparse.Namespace:
    """known_only: flags this parser does not know are kept, in order, in `args.unparsed` (for another program's
    parser; abbreviations are then off, so none of them is taken for one of these flags)."""
    parser = argparse.ArgumentParser(allow_abbrev=not known_only)
    add_model_args(parser)
    if extra_args_provider is not None:
        extra_args_provider(parser)
    if known_only:
        args, unparsed = parser.parse_known_args(argv)
        args.unparsed = unparsed
    else:
        args = parser.parse_args(argv)
    args.rank = int(os.environ.get("RANK", "0"))
    args.world_size = int(os.environ.get("WORLD_SIZE", "1"))
    args.local_rank = int(os.environ.get("LOCAL_RANK", args.local_rank if args.local_rank is not None else 0))
    args.local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", args.world_size))
    validate_args(args)
    args.device = resolve_device(args.device, args.local_rank)
    args.params_dtype = torch.float16 if args.fp16 else torch.bfloat16 if args.bf16 else torch.float32
    return args


def validate_args(args) -> None:
    mp = args.model_parallel_size
    if mp < 1:
        raise UserError(f"--model-parallel-size must be at least 1, got {mp}")
    if args.world_size % mp:
        raise UserError(f"--model-parallel-size {mp} needs a multiple of {mp} processes but {args.world_size} "
                        f"process(es) were started: launch with torchrun --nproc_per_node {mp} (scripts/*.sh do), "
                        f"or convert the checkpoint with tools/convert_tp.py --target-tp {args.world_size}")
    if args.vocab_size <= 0:
        raise UserError("--vocab-size is required (150528 for GLM-130B)")
    for flag, value in [("--num-attention-heads", args.num_attention_heads), ("--hidden-size", args.hidden_size),
                        ("--inner-hidden-size", args.inner_hidden_size or 4 * args.hidden_size * 2 // 3),
                        ("--vocab-size", args.vocab_size)]:
        if value % mp:
            raise UserError(f"{flag} {value} is not divisible by --model-parallel-size {mp}")
    if args.hidden_size % args.num_attention_heads:
        raise UserError(f"--hidden-size {args.hidden_size} is not divisible by --num-attention-heads "
                        f"{args.num_attention_heads}")
    if args.bminf and not args.bminf_memory_limit >= 0:
        raise UserError(f"--bminf-memory-limit must be a number of GB >= 0, got {args.bminf_memory_limit}")
    if args.quantization_bit_width is None and args.from_quantized_checkpoint:
        raise UserError("--from-quantized-checkpoint needs --quantization-bit-width 4 or 8")


def resolve_device(device: Optional[str], local_rank: int) -> torch.device:
    if device is None or device in ("-1", ""):
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    if device.isdigit():
        device = f"cuda:{device}"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {device} was asked for but no CUDA GPU is available; use --device cpu")
    if device == "cuda":
        device = f"cuda:{local_rank}"
    return torch.device(device)


def initialize_distributed(args) -> None:
    if args.device.type == "cuda":
        torch.cuda.set_device(args.device)
    elif args.local_world_size > 1:  # share the cores between the ranks of this machine
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // args.local_world_size))
    if args.world_size > 1 and not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "localhost")
        os.environ.setdefault("MASTER_PORT", "6000")
        backend = "nccl" if args.device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, rank=args.rank, world_size=args.world_size)
    mpu.initialize_model_parallel(args.model_parallel_size)


def set_random_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


def initialize(extra_args_provider: Optional[Callable] = None, argv=None, known_only=False) -> argparse.Namespace:
    args = parse_args(extra_args_provider, argv, known_only)
    args.do_train = False
    initialize_distributed(args)
    set_random_seed(args.seed)
    return args


def build_model(args) -> GLM130B:
    """The model with this rank's shard loaded (and quantized when asked), or random with --random-init."""
    config = GLMConfig.from_args(args)
    model = GLM130B(config, dtype=args.params_dtype, device="meta", attention=args.attention)
    if args.quantization_bit_width:  # set up the int8 storage first; the loader fills (or quantizes) it
        quantize(model, args.quantization_bit_width)
    if getattr(args, "random_init", False):
        if args.bminf:
            raise UserError("--bminf streams weights from a checkpoint; it cannot be combined with --random-init")
        return random_init_(model, args.device, args.seed).eval()
    if args.load is None:
        raise UserError("no checkpoint given: pass --load <folder> (or source a configs/*.sh that sets it)")
    streamer = offload_streamer(model, args) if args.bminf else None
    load_checkpoint(model, args.load, mpu.get_model_parallel_rank(), args.model_parallel_size, args.device,
                    checkpoint_preparer(args.quantization_bit_width, args.from_quantized_checkpoint),
                    allow_non_finite=args.allow_non_finite_weights, offload=streamer)
    if streamer is not None:
        model.offload = streamer
    return model.eval()


def offload_streamer(model: GLM130B, args) -> Optional[LayerStreamer]:
    """--bminf, applied after quantization as in the original: the plan for --bminf-memory-limit (printed by rank 0
    with the original's line), and the streamer the loader hands the streamed layers to (None: all fit)."""
    limit = args.bminf_memory_limit
    plan = plan_offload(model, int(limit * GIB))
    mpu.print_rank_0(f"> BMInf activated, memory limit: {int(limit) if limit == int(limit) else limit} GB")
    mpu.print_rank_0(plan.describe())
    return LayerStreamer(model, plan, args.device) if plan.streamed else None


@torch.no_grad()
def random_init_(model: GLM130B, device, seed: int = 1234) -> GLM130B:
    """Materialise a meta model on `device` with random weights, in place: quantized linears get random int8 /
    packed int4 storage and per-row scales directly (no 16-bit copy of those weights ever exists), 16-bit linears
    std fan_in^-0.5, the embedding std 1, LayerNorms near 1, biases small: activations stay finite through every
    layer as with the benchmark checkpoints (tools/create_random_checkpoint.py)."""
    from quantization import QuantizedLinearMixin
    model.to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    quantized = {id(m.weight): m for m in model.modules() if isinstance(m, QuantizedLinearMixin)}
    for name, p in model.named_parameters():
        if id(p) in quantized:
            _random_quantized_(quantized[id(p)], gen)
        elif name.endswith("weight_scale"):
            continue  # set with its weight
        elif "layernorm.weight" in name:
            p.normal_(1.0, 0.1, generator=gen)
        elif name.endswith(".bias"):
            p.normal_(0.0, 0.02, generator=gen)
        else:
            p.normal_(0.0, 1.0 if "word_embeddings" in name else p.shape[1] ** -0.5, generator=gen)
    for m in quantized.values():
        m.after_load()
    return model


def _random_quantized_(module, gen) -> None:
    """Uniform random q (every int8 byte; packed INT4 bytes hold two uniform nibbles) and the row scale that gives
    the dequantized weight std fan_in^-0.5 (uniform q has std 256/sqrt(12) resp. 16/sqrt(12))."""
    module.weight.random_(-128, 128, generator=gen)
    q_std = (256 if module.bits == 8 else 16) / 12 ** 0.5
    module.weight_scale.fill_(module.in_features ** -0.5 / q_std)


def initialize_model_and_tokenizer(args):
    from model.tokenizer import get_tokenizer
    tokenizer = get_tokenizer(args)
    mpu.barrier()
    start = time.time()
    model = None
    for turn in range(args.model_parallel_size):
        if mpu.get_model_parallel_rank() == turn:
            model = build_model(args)
        if args.sequential_initialization:
            mpu.barrier(group=mpu.get_model_parallel_group())
    mpu.barrier()
    mpu.print_rank_0(f"> Model initialized in {time.time() - start:.1f}s")
    return model, tokenizer


if __name__ == "__main__":
    print("initialize.py is a library; run generate.py, evaluate.py or benchmark.py", file=sys.stderr)
    sys.exit(2)
