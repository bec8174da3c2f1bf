"""The CUDA code paths, run on a CUDA device that does not exist (tests/fake_cuda.py): generate.py's fill_blanks_batch
(greedy, beam search, seeded sampling), the evaluation's ModelForEvaluation, the server's Engine and graph decoding,
with the SAT fixture model loaded by initialize.build_model on "cuda". Every operation mixing devices (or indexing a
CPU tensor with CUDA indices, or sampling with a generator of another device) raises as on a GPU; the values are
real, so the results must equal the same runs on the CPU."""
import numpy as np
import pytest
import torch

from evaluation.configs import GenerationTaskConfig, LanguageModelTaskConfig, MultiChoiceTaskConfig, TaskType
from evaluation.dataset import GenerationTaskDataset, LanguageModelTaskDataset, MultiChoiceTaskDataset
from evaluation.model import ModelForEvaluation
from generation import (BaseStrategy, BeamSearchStrategy, batch_filling_sequence, fill_blanks_batch,
                        generation_invalid_slices, generation_layout)
from generation.engine import Engine, SequenceSpec
from generation.graph_decode import static_filling_sequence
from tests.eval_helpers import EVAL_DATA
from tests.fake_cuda import fake_gpu  # noqa: F401  (fixture)
from tests.helpers import load_fixture_model
from tests.test_generation_decoding import END, TEXT_ONLY, TEXTS, RecordingGreedy, _prompts, _word_tok

LIMITS = dict(out_seq_length=22, max_sequence_length=128)


@pytest.fixture(scope="module")
def cpu_model():
    return load_fixture_model()


def _strategies(tok):
    invalid = generation_invalid_slices(tok)
    return {
        "greedy": lambda: BaseStrategy(top_k=1, end_tokens=END, invalid_slices=invalid),
        "beam": lambda: BeamSearchStrategy(1, 2, length_penalty=1.0, consider_end=True, end_tokens=END,
                                           invalid_slices=invalid, no_repeat_ngram_size=3, deterministic=True),
        "seeded": lambda: BaseStrategy(top_k=0, temperature=1.5, end_tokens=END, invalid_slices=invalid,
                                       generator=torch.Generator().manual_seed(7)),
    }


@pytest.mark.parametrize("kind", ["greedy", "beam", "seeded"])
def test_fill_blanks_batch_on_the_gpu_equals_the_cpu(kind, fake_gpu, cpu_model):
    """generate.py's path: one batch of prompts with [MASK]/[sMASK]/[gMASK], several rounds; a seeded sampler draws
    the same numbers on both devices (its generator is a CPU one)."""
    tok = _word_tok()
    strategy = _strategies(tok)[kind]
    expected = fill_blanks_batch(TEXTS, cpu_model, tok, strategy(), **LIMITS)
    model = fake_gpu.build_fixture_model()
    assert next(model.parameters()).device.type == "cuda"
    got = fill_blanks_batch(TEXTS, model, tok, strategy(), **LIMITS)
    assert [r.answers for r in got] == [r.answers for r in expected]
    assert [r.blanks for r in got] == [r.blanks for r in expected]


def test_quantized_fp16_model_decodes_through_the_fused_kernels(fake_gpu, cpu_model):
    """INT4 and INT8 weights, fp16 activations: every linear of the layers goes through the Triton kernels' launch
    (all pointers on the device), and the logits agree with the CPU's dequantize-then-GEMM path."""
    tok = _word_tok()
    tokens = torch.tensor([[20100, 20200, 20300, 150001, 150004]])
    positions = torch.arange(5)[None]
    mask = torch.zeros(1, 1, 5, 5, dtype=torch.bool)
    for bits in (4, 8):
        flags = ["--quantization-bit-width", str(bits)]
        launches = fake_gpu.triton_launches
        model = fake_gpu.build_fixture_model("--fp16", flags)
        result = fill_blanks_batch(TEXTS[:2], model, tok, _strategies(tok)["greedy"](), **LIMITS)
        assert all(len(b) > 0 for r in result for b in r.blanks[0])
        assert fake_gpu.triton_launches - launches >= 4 * 2  # four linears per layer, two layers, every step
        on_gpu = model.logits(tokens.cuda(), positions.cuda(), mask.cuda()).float().cpu()
        on_cpu = fake_gpu.build_fixture_model("--fp16", flags, "cpu").logits(tokens, positions, mask).float()
        assert torch.allclose(on_gpu, on_cpu, rtol=0, atol=0.05 * on_cpu.abs().max().item())


def test_decoding_layout_is_built_on_the_decoding_device(fake_gpu, cpu_model):
    """The layout crash of issue 22: a layout built on the CPU and one built on the device both serve device seqs."""
    rows, mask_positions, gmask = _prompts()
    seqs, lengths, cpu_layout = generation_layout(rows, mask_positions, gmask, 4)
    expected = [t.tolist() for t in cpu_layout(seqs)]
    _, _, gpu_layout = generation_layout(rows, mask_positions, gmask, 4, "cuda")
    for layout in (cpu_layout, gpu_layout):
        out = layout(seqs.cuda())
        assert all(t.device.type == "cuda" for t in out)
        assert [t.tolist() for t in out] == expected


def _eval_batches(tokenizer):
    def config(cls, type_, **kw):
        return cls(name="t", type=type_, path=str(EVAL_DATA), **kw)
    mc = MultiChoiceTaskDataset(str(EVAL_DATA / "bloom/glue_cola/prompt_a/validation.jsonl"),
                                config(MultiChoiceTaskConfig, TaskType.MULTICHOICE), tokenizer)
    gen = GenerationTaskDataset(str(EVAL_DATA / "bloom/mc_taco/prompt_a/validation_pp.jsonl"),
                                config(GenerationTaskConfig, TaskType.GENERATION, use_task_mask=True,
                                       max_gen_length=4), tokenizer)
    lm = LanguageModelTaskDataset(str(EVAL_DATA / "wikitext-2/wiki.test.tokens"),
                                  config(LanguageModelTaskConfig, TaskType.LANGUAGE_MODEL, max_seq_length=24,
                                         generation_length=8, use_task_mask=True), tokenizer)
    return mc.collate(list(range(len(mc)))), gen.collate([0, 1, 2]), lm.collate(list(range(len(lm))))


def _evaluate(model, batches):
    mc, gen, lm = batches
    greedy = BaseStrategy(3, top_k=1, end_tokens=END)
    beams = BeamSearchStrategy(3, 2, consider_end=True, end_tokens=END, deterministic=True)
    return (model.cond_log_prob(mc), model.generate_text(gen, greedy), model.generate_text(gen, beams),
            model.calculate_loss(lm))


def test_evaluation_scoring_and_generation_on_the_gpu_equal_the_cpu(fake_gpu, cpu_model, test_tokenizer):
    batches = _eval_batches(test_tokenizer)
    expected = _evaluate(ModelForEvaluation(cpu_model), batches)
    got = _evaluate(ModelForEvaluation(fake_gpu.build_fixture_model()), batches)
    assert np.allclose(got[0], expected[0], rtol=0, atol=1e-4)
    assert got[1] == expected[1] and got[2] == expected[2]
    assert np.allclose(got[3], expected[3], rtol=1e-5)


# logprobs=0: the chosen tokens' log-probs only (the fixture model's top alternatives include ids that the test
# tokenizer cannot show)
SPECS = [SequenceSpec(0, "The capital of France is [MASK].", 6, temperature=0),
         SequenceSpec(1, "Tell me a story about a cat.", 5, temperature=0.9, top_k=40, seed=3, logprobs=0),
         SequenceSpec(2, "hello world", 0, echo=True, logprobs=0),
         SequenceSpec(3, "A [MASK] B", 4, num_beams=2)]


def _serve(model, tokenizer):
    """Engine.apply as the scheduler runs it (the beam job first, then one newcomer at a time) until all are done:
    per sequence its streamed text, its log-probs and its final (reason, result)."""
    engine = Engine(model, tokenizer, slots=2, max_sequence_length=128)
    pending, out = [s for s in SPECS if s.num_beams == 1], {}
    work = {"beam": [s for s in SPECS if s.num_beams > 1]}
    while work or pending or engine.live():
        for event in engine.apply(work):
            text, logprobs, final = out.setdefault(event.seq_id, ["", [], None])
            out[event.seq_id][0] += event.text
            logprobs.extend((p.token, round(p.logprob, 4), sorted(p.top)) for p in event.logprobs)
            if event.finish_reason is not None:
                out[event.seq_id][2] = (event.finish_reason, event.result)
        work = {"admit": [pending.pop(0)]} if pending and engine.can_admit() else {}
    return out


def test_server_engine_on_the_gpu_equals_the_cpu(fake_gpu, cpu_model, test_tokenizer):
    """Greedy and seeded sampling in the continuous batch, log-probs, echo scoring and a beam-search job."""
    expected = _serve(cpu_model, test_tokenizer)
    assert sorted(expected) == [0, 1, 2, 3] and all(final is not None for _, _, final in expected.values())
    assert _serve(fake_gpu.build_fixture_model(), test_tokenizer) == expected


@pytest.mark.parametrize("strategy", ["greedy", "recording", "beam"])
def test_graph_decode_captures_and_replays_the_step(strategy, fake_gpu, cpu_model):
    """static_filling_sequence on the device: the one-token step captured once per slot bucket and replayed (the
    emulated graph re-runs the recorded operations on the captured tensors). Greedy on the device reads the host once
    per token; a host strategy sees the loop's logits at every step (this model mostly repeats its input token, so ids
    alone say little); beam search keeps the loop's beams."""
    rows, mask_positions, gmask = _prompts()
    seqs, lengths, layout = generation_layout(rows, mask_positions, gmask, 6)

    def make():
        if strategy == "greedy":
            return BaseStrategy(top_k=1, end_tokens=END, invalid_slices=TEXT_ONLY)
        if strategy == "recording":
            return RecordingGreedy(invalid_slices=TEXT_ONLY)
        return BeamSearchStrategy(3, 2, consider_end=True, end_tokens=END, invalid_slices=TEXT_ONLY,
                                  deterministic=True)
    reference = make()
    expected, _ = batch_filling_sequence(cpu_model, seqs, lengths, reference, layout)
    model = fake_gpu.build_fixture_model()
    _, _, device_layout = generation_layout(rows, mask_positions, gmask, 6, "cuda")
    reads, tested = fake_gpu.host_reads, make()
    got, _ = static_filling_sequence(model, seqs.cuda(), lengths, tested, device_layout)
    reads = fake_gpu.host_reads - reads
    assert fake_gpu.captures == 1 and fake_gpu.replays >= 4
    if strategy == "beam":
        assert [[b.tolist() for b in per] for per in got] == [[b.tolist() for b in per] for per in expected]
        return
    assert got.tolist() == expected.tolist()
    if strategy == "greedy":
        assert reads == got.shape[-1] - seqs.shape[1] + 1  # one [ids | done] per token, one for the result
    else:
        assert len(tested.rows) == len(reference.rows) >= 5
        for on_gpu, on_cpu in zip(tested.rows, reference.rows):
            assert torch.allclose(on_gpu.cpu(), on_cpu, rtol=0, atol=1e-4)


def test_seeded_sampling_in_the_captured_step(fake_gpu):
    """A seeded BaseStrategy samples inside the graph with its own generator: the same seed gives the same ids, a
    different seed other ids, and the graph gives what the eager step gives."""
    rows, mask_positions, gmask = _prompts()
    model = fake_gpu.build_fixture_model()
    seqs, lengths, layout = generation_layout(rows, mask_positions, gmask, 8, "cuda")

    def run(seed, use_graph):
        strategy = BaseStrategy(top_k=0, temperature=20.0, end_tokens=END, invalid_slices=TEXT_ONLY,
                                generator=torch.Generator().manual_seed(seed))
        return static_filling_sequence(model, seqs.cuda(), lengths, strategy, layout, use_graph=use_graph)[0].tolist()
    first = run(1, True)
    assert run(1, True) == first and run(1, False) == first
    assert run(2, True) != first
