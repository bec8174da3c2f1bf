"""Decoding without per-token host work: a static KV cache, static shapes for the one-token step, that step (all
layers, the logits and BaseStrategy's choice of token) captured once as a CUDA graph and replayed per token.

The same code runs eagerly on CPU (and is tested there against generation/decoding.py's loop); only the capture is
CUDA-specific. Pieces:
- `StaticKVCache`: a KVCache whose keys/values live in one zeroed block [layers, rows, heads, max_length, d] at fixed
  addresses, with the next position also on the device (`index`, advanced by the step itself). Beams reorder it in
  place (the filled positions of each layer are gathered and copied back), never by swapping in new tensors.
- `OneTokenStep`: the step over static buffers. Each row's position id and attention-mask row for the next column
  are read on the device from the decoding layout at `index`; keys/values are written at `index` with index_copy_;
  attention runs over the first `slots` slots (the cache length rounded up to SLOT_BUCKET: one graph per bucket)
  with the unwritten ones masked (their zeros get probability 0).
- `DeviceSampler`: BaseStrategy's choice on the device: fp32 logits / temperature, invalid ids, the min-length ban
  of end tokens, then argmax (top_k == 1) or top_k_logits' top-k/top-p filter and one inverse-CDF sample; rows that
  produced an end token are done (-1 afterwards). Only the chosen ids (and the done flags) are read by the host.
- `StepRunner`: eager call, or a CUDA graph per slot bucket, captured after two warm-up runs whose side effects are
  undone. A capture that fails (of any cause) is reported once per device, and the step runs eagerly there from then
  on. A seeded strategy's generator is the sampler's (on the device, seeded from it) and is registered with the
  graph, so a seed gives the same ids run after run, graph or not.
- `static_filling_sequence`: the decoding loop over these (BaseStrategy on the device, or any host strategy such as
  BeamSearchStrategy fed with the step's logits), with batch_filling_sequence's inputs and results.
Tensor parallelism is not supported here (collectives inside a captured graph): model-parallel size 1 only.
"""
import warnings
from typing import Callable, Dict, List, Optional, Sequence

import torch

from generation.decoding import _selected_rows, _start
from generation.strategies import FILTER_VALUE, BaseStrategy, _categorical, _invalid_mask, top_k_logits
from model import KVCache, mpu


class StaticKVCache(KVCache):
    """Preallocated zeroed keys/values for up to `rows` rows at fixed addresses; `index` [1] (device) is the next
    position, `length` its host-side count (the loops advance it after each step without reading the device).
    Prefill may use fewer rows than allocated (the first ones); reorder() then fills all of them."""

    def __init__(self, model, rows: int, max_length: int):
        attn = model.transformer.layers[0].attention
        param = model.transformer.final_layernorm.weight
        shape = (len(model.transformer.layers), rows, attn.heads_local, max_length, attn.head_dim)
        self.k_all = torch.zeros(shape, dtype=param.dtype, device=param.device)
        self.v_all = torch.zeros(shape, dtype=param.dtype, device=param.device)
        self.k, self.v = list(self.k_all.unbind(0)), list(self.v_all.unbind(0))
        self.length, self.max_length, self._pending = 0, max_length, 0
        self.index = torch.zeros(1, dtype=torch.long, device=param.device)

    def update(self, layer_id, k, v):
        start = self.reserve(k.shape[2])
        end, b = start + k.shape[2], k.shape[0]
        self.k[layer_id][:b, :, start:end] = k
        self.v[layer_id][:b, :, start:end] = v
        return self.k[layer_id][:b, :, :end], self.v[layer_id][:b, :, :end]

    def advance(self) -> None:
        super().advance()
        self.index.fill_(self.length)

    def reorder(self, index: torch.Tensor) -> None:
        """Rows 0..len(index)-1 become the previous rows `index`, in place (one layer's live part at a time)."""
        index = index.to(self.k_all.device)
        n, rows = self.length, index.numel()
        for buf in self.k + self.v:
            buf[:rows, :, :n].copy_(buf[:, :, :n].index_select(0, index))


SLOT_BUCKET = 256  # attention reads the first multiple of this many slots that holds every written position


def slots_for(length: int, max_length: int) -> int:
    """Slots a step at host-side cache length `length` attends over (one captured graph per bucket)."""
    return min(max_length, -(-(length + 1) // SLOT_BUCKET) * SLOT_BUCKET)


class _StaticPast:
    """The attention's past for OneTokenStep: write the new key/value at `index`, attend over the first `slots`."""

    def __init__(self, cache: StaticKVCache, slots: int):
        self.cache, self.slots = cache, slots

    def update(self, layer_id, k, v):
        self.cache.k[layer_id].index_copy_(2, self.cache.index, k)
        self.cache.v[layer_id].index_copy_(2, self.cache.index, v)
        return self.cache.k[layer_id][:, :, :self.slots], self.cache.v[layer_id][:, :, :self.slots]


class DeviceSampler:
    """BaseStrategy's token choice for `rows` rows, on the logits' device, with no host synchronisation."""

    def __init__(self, rows: int, vocab: int, device, top_k: int = 200, top_p: float = 0.0,
                 temperature: float = 1.0, invalid_slices: Sequence = (), end_tokens: Sequence[int] = (),
                 min_gen_length: int = 0, generator: Optional[torch.Generator] = None):
        self.top_k, self.top_p, self.temperature = top_k, top_p, temperature
        self.generator = device_generator(generator, device)
        self.invalid = _invalid_mask(list(invalid_slices or []), vocab, device)
        self.end = torch.tensor(list(end_tokens or []), dtype=torch.long, device=device)
        self.min_gen_length = min_gen_length
        self.done = torch.zeros(rows, dtype=torch.bool, device=device)
        self.generated = torch.zeros((), dtype=torch.long, device=device)

    @classmethod
    def from_strategy(cls, strategy: BaseStrategy, rows: int, vocab: int, device) -> "DeviceSampler":
        return cls(rows, vocab, device, strategy.top_k, strategy.top_p, strategy.temperature,
                   strategy.invalid.invalid_slices, strategy.end_tokens, strategy.min_gen_length, strategy.generator)

    def state(self) -> List[torch.Tensor]:
        return [self.done, self.generated]

    def filter_logits(self, logits: torch.Tensor) -> torch.Tensor:
        x = logits.to(torch.float32, copy=True)
        if self.temperature != 1.0:
            x.div_(self.temperature)
        if self.invalid is not None:
            x.masked_fill_(self.invalid, FILTER_VALUE)
        if self.min_gen_length > 0 and self.end.numel():
            banned = (self.generated < self.min_gen_length).expand(x.shape[0], self.end.numel())
            x[:, self.end] = torch.where(banned, torch.full_like(x[:, self.end], FILTER_VALUE), x[:, self.end])
        return x

    def probabilities(self, x: torch.Tensor) -> torch.Tensor:
        """softmax(top_k_logits(x)): the distribution BaseStrategy samples from (ties with the k-th id kept)."""
        return torch.softmax(top_k_logits(x, self.top_k, self.top_p), dim=-1)

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """logits [rows, V] -> ids [rows] (-1 for done rows); updates the done flags and the step count."""
        x = self.filter_logits(logits)
        pred = x.argmax(dim=-1) if self.top_k == 1 else _categorical(self.probabilities(x), self.generator)
        pred = pred.masked_fill(self.done, -1)
        if self.end.numel():
            self.done |= (pred[:, None] == self.end[None, :]).any(dim=-1)
        self.generated += 1
        return pred


def device_generator(generator: Optional[torch.Generator], device) -> Optional[torch.Generator]:
    """A generator on `device` for sampling inside the step: `generator` itself when it is there, else one seeded
    from it (a seed drawn from `generator`: the same seed gives the same numbers run after run)."""
    device = torch.device(device)
    if generator is None or generator.device.type == device.type:
        return generator
    seed = int(torch.randint(0, 1 << 62, (1,), generator=generator))
    return torch.Generator(device=device).manual_seed(seed)


def _row_buffer(t: torch.Tensor, rows: int) -> torch.Tensor:
    """A [rows, ...] copy of t: its rows first (a single row is repeated), zeros after (filled by a reorder)."""
    buf = torch.zeros((rows, *t.shape[1:]), dtype=t.dtype, device=t.device)
    if t.shape[0] == 1:
        buf[:] = t
    else:
        buf[:t.shape[0]] = t
    return buf


class OneTokenStep:
    """One token per row against a StaticKVCache, on static buffers: `tokens` [rows, 1] in, `logits` [rows, 1, V]
    out (and, with a sampler, the chosen ids in `ids`, fed back into `tokens`); advances `cache.index`."""

    def __init__(self, model, cache: StaticKVCache, position_ids: torch.Tensor, attention_mask: torch.Tensor,
                 sampler: Optional[DeviceSampler] = None):
        rows = cache.batch_size
        device = cache.index.device
        self.model, self.cache, self.sampler = model, cache, sampler
        self.tokens = torch.zeros(rows, 1, dtype=torch.long, device=device)
        self.positions = _row_buffer(position_ids.to(device), rows)
        mask = attention_mask.to(device).bool()
        self.mask = mask.clone() if mask.shape[0] == 1 else _row_buffer(mask, rows)
        self.slots = torch.arange(cache.max_length, device=device)
        self.ids = None
        model.rotary._table(model.dtype, device, cache.max_length)  # tables built now, never during a capture

    def state(self) -> List[torch.Tensor]:
        """Tensors the step changes (saved and restored around warm-up runs)."""
        return [self.tokens, self.cache.index] + (self.sampler.state() if self.sampler else [])

    def reorder(self, index: torch.Tensor) -> None:
        """Rows follow beams: the cache, each row's layout and its next token, in place."""
        self.cache.reorder(index)
        self.positions.copy_(self.positions.index_select(0, index))
        if self.mask.shape[0] > 1:
            self.mask.copy_(self.mask.index_select(0, index))

    def __call__(self, slots: Optional[int] = None) -> torch.Tensor:
        """One token per row, attending over the first `slots` cache slots (default all; see slots_for)."""
        slots = slots or self.cache.max_length
        index = self.cache.index
        positions = self.positions.index_select(1, index)
        mask = self.mask[..., :slots].index_select(2, index) | (self.slots[:slots] > index)  # [rows|1, 1, 1, slots]
        logits, _ = self.model._run(self.tokens, positions, mask, _StaticPast(self.cache, slots), keep_kv=False)
        index.add_(1)
        if self.sampler is not None:
            self.ids = self.sampler(logits[:, -1])
            self.tokens.copy_(self.ids.clamp_min(0)[:, None])
        return logits


_CAPTURE_FAILED: Dict[str, str] = {}  # device -> why graph capture failed there (warned once; eager from then on)


class StepRunner:
    """Runs step(key) eagerly, or (CUDA, use_graph) replays it from a CUDA graph captured on first use of each key
    (the slot bucket: static shapes per graph).

    Capture needs every lazy allocation and kernel compilation done first: two warm-up runs on a side stream, whose
    effects on `state` tensors (and `generators`) are undone before capturing (capturing itself executes nothing).
    When a capture fails, the state is restored, one warning names the cause, and the step runs eagerly on that
    device from then on (an error of the step itself then surfaces from the eager run)."""

    def __init__(self, step: Callable[..., torch.Tensor], state: List[torch.Tensor], device, use_graph: bool,
                 generators: Sequence[Optional[torch.Generator]] = ()):
        self.step, self.state, self.device = step, state, torch.device(device)
        self.generators = [g for g in generators if g is not None]
        self.use_graph = use_graph and self.device.type == "cuda" and str(self.device) not in _CAPTURE_FAILED
        self.graphs = {}  # key -> (graph, its output tensor)

    def _capture(self, key):
        saved = [t.clone() for t in self.state]
        saved_generators = [g.get_state() for g in self.generators]

        def restore():
            for t, s in zip(self.state, saved):
                t.copy_(s)
            for g, s in zip(self.generators, saved_generators):
                g.set_state(s)
        try:
            stream = torch.cuda.Stream(self.device)
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):
                for _ in range(2):
                    self.step(key)
            torch.cuda.current_stream(self.device).wait_stream(stream)
            restore()
            graph = torch.cuda.CUDAGraph()
            for g in self.generators:
                graph.register_generator_state(g)
            with torch.cuda.graph(graph):
                output = self.step(key)
            return graph, output
        except Exception as error:
            torch.cuda.synchronize(self.device)
            restore()
            self._give_up(error)
            return None

    def _give_up(self, error: Exception) -> None:
        self.use_graph = False
        key = str(self.device)
        if key not in _CAPTURE_FAILED:
            _CAPTURE_FAILED[key] = f"{type(error).__name__}: {str(error).strip()[:300]}"
            warnings.warn(f"CUDA graph capture of the decode step failed on {key} ({_CAPTURE_FAILED[key]}); the step "
                          f"runs eagerly on {key} from now on", RuntimeWarning, stacklevel=4)

    def __call__(self, key=None) -> torch.Tensor:
        if self.use_graph and key not in self.graphs:
            captured = self._capture(key)
            if captured is not None:
                self.graphs[key] = captured
        if not self.use_graph:
            return self.step(key)
        graph, output = self.graphs[key]
        graph.replay()
        return output


def default_use_graph(device) -> bool:
    return torch.device(device).type == "cuda"


def _prefill(model, seqs, context_lengths, position_ids, attention_mask, cache: StaticKVCache) -> torch.Tensor:
    ctx = seqs.shape[1]
    first = (context_lengths - 1).to(seqs.device)
    return model.forward_with_cache(seqs, position_ids[:, :ctx], attention_mask[:, :, :ctx, :ctx], cache,
                                    logits_index=first)


def _generate_on_device(model, seqs, context_lengths, strategy: BaseStrategy, position_ids, attention_mask,
                        use_graph: bool):
    """BaseStrategy with the choice inside the step: per token one replay and one read of [ids | done]."""
    rows, ctx = seqs.shape
    max_gen = position_ids.shape[-1] - ctx
    cache = StaticKVCache(model, rows, position_ids.shape[-1])
    sampler = DeviceSampler.from_strategy(strategy, rows, model.config.vocab_size, seqs.device)
    step = OneTokenStep(model, cache, position_ids, attention_mask, sampler)
    logits = _prefill(model, seqs, context_lengths, position_ids, attention_mask, cache)
    ids = sampler(logits[:, -1])
    step.tokens.copy_(ids.clamp_min(0)[:, None])
    runner = StepRunner(step, step.state(), seqs.device, use_graph, [sampler.generator])
    columns = []
    while True:
        host = torch.cat([ids, sampler.done.long()]).cpu()  # the one host read per token
        columns.append(host[:rows])
        if bool(host[rows:].all()) or len(columns) >= max_gen:
            break
        runner(slots_for(cache.length, cache.max_length))
        cache.length += 1
        ids = step.ids
    tokens = torch.cat([seqs.cpu(), torch.stack(columns, dim=1)], dim=1).to(seqs.device)
    return strategy.finalize(tokens.view(rows, 1, -1), None)


def _generate_with_host_strategy(model, seqs, context_lengths, strategy, position_ids, attention_mask,
                                 use_graph: bool):
    """Any strategy with the original's interface (e.g. BeamSearchStrategy) on the step's logits; beams reorder
    the static cache and layout in place."""
    batch, ctx = seqs.shape
    max_gen = position_ids.shape[-1] - ctx
    rows = batch * getattr(strategy, "num_beams", 1)
    cache = StaticKVCache(model, rows, position_ids.shape[-1])
    step = OneTokenStep(model, cache, position_ids, attention_mask)
    runner = StepRunner(step, step.state(), seqs.device, use_graph)
    _start(strategy, batch, context_lengths, 1, None, None, False)
    tokens = seqs.view(batch, 1, ctx)
    logits = _prefill(model, seqs, context_lengths, position_ids, attention_mask, cache)
    beams = 1
    step.reorder(torch.arange(rows, device=seqs.device) // (rows // batch))  # rows as final beams, same history
    for n in range(1, max_gen + 1):
        tokens, _ = strategy.forward(logits.view(batch, beams, -1), tokens, None)
        new_beams = tokens.shape[1]
        flat = _selected_rows(strategy, batch, beams, new_beams, seqs.device)
        if flat is not None:
            if new_beams != beams:  # flat indexes the prefill's rows; they were spread to rows // batch each
                flat = flat // beams * (rows // batch) + flat % beams
            step.reorder(flat)
        beams = new_beams
        if strategy.is_done or n >= max_gen:
            break
        step.tokens.copy_(tokens[..., -1].reshape(-1, 1).clamp_min(0))
        logits = runner(slots_for(cache.length, cache.max_length))[: batch * beams]
        cache.length += 1  # host bookkeeping of the filled positions (reorder copies those)
    return strategy.finalize(tokens, None)


@torch.inference_mode()
def static_filling_sequence(model, seqs: torch.Tensor, context_lengths, strategy,
                            get_masks_and_position_ids: Callable, use_graph: Optional[bool] = None,
                            device_sampling: Optional[bool] = None):
    """batch_filling_sequence (no budgets, no continued beams) over the static cache and the captured step.

    device_sampling (default: for a plain BaseStrategy) makes the choice part of the step; otherwise `strategy`
    runs on the host on each step's logits. use_graph: capture the step (default on CUDA)."""
    if mpu.get_model_parallel_world_size() != 1:
        raise ValueError("static/graph decoding runs at model-parallel size 1 only")
    context_lengths = torch.as_tensor(context_lengths, dtype=torch.long).view(-1)
    _, attention_mask, position_ids = get_masks_and_position_ids(seqs)
    use_graph = default_use_graph(seqs.device) if use_graph is None else use_graph
    use_graph = use_graph and not model.offload.streams  # a graph would replay without the layers' copies
    if position_ids.shape[-1] <= seqs.shape[1]:
        return strategy.finalize(seqs.view(seqs.shape[0], 1, -1), None)
    if device_sampling is None:
        device_sampling = type(strategy) is BaseStrategy
    run = _generate_on_device if device_sampling else _generate_with_host_strategy
    return run(model, seqs, context_lengths, strategy, position_ids.to(seqs.device), attention_mask.to(seqs.device),
               use_graph)
