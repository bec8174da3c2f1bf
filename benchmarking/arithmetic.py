"""FLOPs and bytes of the model (docs/performance.md): the denominators of MFU and of the bandwidth roofline."""


def linear_params_per_layer(cfg) -> int:
    h, f = cfg.hidden_size, cfg.inner_hidden_size
    return 3 * h * h + h * h + 2 * f * h + f * h


def forward_flops(cfg, seq: int, logit_rows: int) -> float:
    """FLOPs of one sequence's forward: linears, attention over the full seq × seq matrix, logits rows."""
    h, layers = cfg.hidden_size, cfg.num_layers
    return (2.0 * seq * layers * linear_params_per_layer(cfg) + 4.0 * layers * seq * seq * h
            + 2.0 * logit_rows * h * cfg.vocab_size)


def weight_bytes(model) -> int:
    """Bytes of every parameter and buffer held by the model (what one decode step reads at least once)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + [b for b in model.buffers() if b is not None]:
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    if model.offload.streams:  # streamed layers share two swap slots: each is read once per step all the same
        plan = model.offload.plan
        total += plan.streamed_bytes - plan.slots * plan.layer_bytes
    return total
