"""Generation: the original's strategies, its batched decoding loop over a KV cache, and blank filling."""
from generation.blank_filling import (BlankFillingResult, EncodedPrompt, check_prompt, encode_prompt, fill_blanks,
                                      fill_blanks_batch, generation_invalid_slices, generation_layout,
                                      get_masks_and_position_ids, round_budget)
from generation.decoding import batch_filling_sequence
from generation.strategies import BaseStrategy, BeamSearchStrategy, top_k_logits

__all__ = ["BaseStrategy", "BeamSearchStrategy", "top_k_logits", "batch_filling_sequence", "BlankFillingResult",
           "EncodedPrompt", "check_prompt", "encode_prompt", "fill_blanks", "fill_blanks_batch",
           "generation_invalid_slices", "generation_layout", "get_masks_and_position_ids", "round_budget"]
