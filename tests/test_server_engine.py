"""generation/engine.py in-process on the demo model: continuous batching gives fill_blanks' greedy output whatever
joins or leaves the batch, across cache rebases; echo log-probs are the evaluation's."""
import pytest
import torch

from generation import BaseStrategy, fill_blanks, generation_invalid_slices
from generation.engine import Engine, SequenceSpec, score_tokens
from tests.test_generation_cli import demo_model_args

PROMPTS = ["Who is the greatest artist? The greatest artist is [MASK].", "Tell me a story about a cat.",
           "The capital of France is [MASK], and the capital of Japan is [MASK].", "清华大学位于[MASK]。",
           "A B [sMASK] C", "hello " * 12, "x [MASK] y [MASK] z [MASK]", "One more prompt without a mask"]


@pytest.fixture(scope="module")
def demo(demo_dir):
    from initialize import initialize, initialize_model_and_tokenizer
    args = initialize(None, demo_model_args(demo_dir))
    return initialize_model_and_tokenizer(args)


def reference(model, tokenizer, text, max_tokens, max_sequence_length):
    end = [tokenizer.get_command("eop"), tokenizer.get_command("eos")]
    strategy = BaseStrategy(top_k=1, end_tokens=end, invalid_slices=generation_invalid_slices(tokenizer, end))
    return fill_blanks(text, model, tokenizer, strategy, out_seq_length=1 << 30, max_new_tokens=max_tokens,
                       max_sequence_length=max_sequence_length)


def run(engine, specs, admit_every=1, cancel=None):
    """Apply until every spec is done, admitting one spec every `admit_every` iterations; per seq id the
    concatenated streamed text and the final result."""
    pending, streamed, results, iteration = list(specs), {}, {}, 0
    while pending or engine.live():
        work = {}
        if pending and iteration % admit_every == 0 and engine.can_admit():
            work["admit"] = [pending.pop(0)]
        if cancel and iteration == cancel[0]:
            work["cancel"] = [cancel[1]]
        for event in engine.apply(work):
            streamed[event.seq_id] = streamed.get(event.seq_id, "") + event.text
            if event.finish_reason is not None:
                results[event.seq_id] = (event.finish_reason, event.result)
        iteration += 1
        assert iteration < 10000
    return streamed, results


def test_greedy_equals_fill_blanks_while_sequences_join_leave_and_the_cache_rebases(demo, monkeypatch):
    model, tokenizer = demo
    max_len, max_tokens = 64, 30  # a short context: the shared column reaches the cache's end and rebases
    rebases = []
    original = Engine._rebase
    monkeypatch.setattr(Engine, "_rebase", lambda self, n: (rebases.append(n), original(self, n)))
    engine = Engine(model, tokenizer, slots=3, max_sequence_length=max_len)
    specs = [SequenceSpec(i, text, max_tokens, temperature=0) for i, text in enumerate(PROMPTS)]
    streamed, results = run(engine, specs, admit_every=4)
    assert len(rebases) > 0 and engine.live() == 0
    for i, text in enumerate(PROMPTS):
        ref = reference(model, tokenizer, text, max_tokens, max_len)
        reason, result = results[i]
        assert result["blanks"] == ref.blanks[0], text
        expected = ref.blanks[0][0] if "MASK]" not in text else ref.answers[0]
        assert result["text"] == expected and streamed[i] == expected, text
        assert reason in ("stop", "length")


def test_columns_no_sequence_wrote_never_reach_the_output(demo, monkeypatch):
    """The batch cache is allocated uninitialised; a row's masked columns (other rows' spans, never written for it)
    still meet its attention (weight 0 x a garbage NaN is NaN). Garbage is made NaN here: output must not change."""
    import model.glm
    model_, tokenizer = demo
    real_empty = torch.empty
    monkeypatch.setattr(model.glm.torch, "empty", lambda *a, **k: real_empty(*a, **k).fill_(float("nan")))
    engine = Engine(model_, tokenizer, slots=3)
    monkeypatch.setattr(model.glm.torch, "empty", real_empty)
    specs = [SequenceSpec(i, text, 10, temperature=0) for i, text in enumerate(PROMPTS[:3])]
    _, results = run(engine, specs, admit_every=3)
    for i, text in enumerate(PROMPTS[:3]):
        assert results[i][1]["blanks"] == reference(model_, tokenizer, text, 10, 512).blanks[0], text


def test_one_slot_serves_sequences_one_after_another(demo):
    model, tokenizer = demo
    engine = Engine(model, tokenizer, slots=1)
    specs = [SequenceSpec(i, text, 8, temperature=0) for i, text in enumerate(PROMPTS[:3])]
    _, results = run(engine, specs)
    for i, text in enumerate(PROMPTS[:3]):
        assert results[i][1]["blanks"] == reference(model, tokenizer, text, 8, 512).blanks[0]


def test_cancel_frees_the_slot_and_others_go_on(demo):
    model, tokenizer = demo
    engine = Engine(model, tokenizer, slots=2)
    specs = [SequenceSpec(i, PROMPTS[1], 40, temperature=0) for i in range(3)]
    _, results = run(engine, specs, cancel=(5, 0))
    assert results[0][0] == "cancelled" and results[0][1] is None
    ref = reference(model, tokenizer, PROMPTS[1], 40, 512).blanks[0]
    assert results[1][1]["blanks"] == ref and results[2][1]["blanks"] == ref


def test_seeded_sampling_repeats_and_stop_strings_cut_the_text(demo):
    model, tokenizer = demo
    engine = Engine(model, tokenizer, slots=4)
    specs = [SequenceSpec(i, PROMPTS[1], 20, temperature=1.0, top_p=0.9, seed=7) for i in range(2)]
    specs.append(SequenceSpec(2, PROMPTS[1], 20, temperature=1.0, top_p=0.9, seed=8))
    _, results = run(engine, specs)
    assert results[0][1]["text"] == results[1][1]["text"]
    greedy = reference(model, tokenizer, PROMPTS[1], 20, 512).blanks[0][0]
    stop = greedy[3:5]
    cut = greedy[:greedy.index(stop)]
    _, results = run(engine, [SequenceSpec(3, PROMPTS[1], 20, temperature=0, stop=(stop,))])
    assert results[3][0] == "stop" and results[3][1]["text"] == cut


def test_echo_log_probs_equal_the_evaluation_loss(demo):
    from evaluation.model import ModelForEvaluation
    from model.layout import collate_layouts, language_model_window
    model, tokenizer = demo
    ids = tokenizer.tokenize("The quick brown fox jumps over the lazy dog.")
    scored = score_tokens(model, tokenizer, ids, top=3)
    layout, targets = language_model_window([], ids, tokenizer.get_command("[gMASK]"), tokenizer.get_command("sop"))
    batch = collate_layouts([layout])
    batch["targets"] = torch.from_numpy(targets)[None]
    loss_mask = torch.zeros(1, len(layout))
    loss_mask[0, 1:] = 1
    batch["loss_mask"] = loss_mask
    loss = ModelForEvaluation(model).calculate_loss(batch)[0]
    assert abs(sum(t.logprob for t in scored) + loss) <= 1e-4
    assert [t.token for t in scored] == [tokenizer.detokenize([i]) for i in ids]
    assert all(len(t.top) == 3 and max(t.top.values()) >= t.logprob - 1e-6 for t in scored)


def test_a_stop_string_in_a_filled_prompt_does_not_cut_its_text(demo):
    model, tokenizer = demo
    engine = Engine(model, tokenizer, slots=2)
    text = "A halt here [MASK] B"
    streamed, results = run(engine, [SequenceSpec(0, text, 8, temperature=0, stop=("halt",))])
    assert results[0][1]["text"].startswith("A halt here") and streamed[0] == results[0][1]["text"]


def test_each_iteration_runs_at_most_one_prefill_and_still_steps_the_others(demo, monkeypatch):
    """A newcomer (or a multi-mask prompt's next blank) stalls the running sequences by one prefill at most."""
    model, tokenizer = demo
    calls = []
    original = type(model).forward_with_cache
    monkeypatch.setattr(type(model), "forward_with_cache",
                        lambda self, tokens, *a, **k: (calls.append(tokens.shape), original(self, tokens, *a, **k))[1])
    engine = Engine(model, tokenizer, slots=4)
    specs = [SequenceSpec(i, PROMPTS[i % 3], 12, temperature=0) for i in range(6)]
    pending, iterations = list(specs), 0
    while pending or engine.live():
        running = engine.live() - sum(s is not None and s.needs_prefill for s in engine.slots)
        work = {"admit": [pending.pop(0)]} if pending and engine.can_admit() else {}
        calls.clear()
        engine.apply(work)
        prefills = [shape for shape in calls if shape[1] > 1]
        steps = [shape for shape in calls if shape[1] == 1]
        assert len(prefills) <= 1 and len(prefills) + len(steps) == len(calls)
        if running:
            assert len(steps) == 1  # the running sequences advanced in this iteration too
        iterations += 1
    assert iterations < 200


def test_a_failing_sequence_ends_alone_and_its_slot_serves_the_next_one(demo, monkeypatch):
    """GLM_TEST_FAULTS makes one sequence raise mid-decode and another get NaN logits (and NaN keys/values in its
    cache row); each ends with an error event, the others' text is fill_blanks' greedy text, and the sequences that
    take over the failed slots (whose rows held NaN) are not affected."""
    model, tokenizer = demo
    monkeypatch.setenv("GLM_TEST_FAULTS", "raise:RAISE-HERE,nan:NAN-HERE")
    engine = Engine(model, tokenizer, slots=2)
    texts = ["NAN-HERE " + PROMPTS[1], PROMPTS[0], "RAISE-HERE " + PROMPTS[1], PROMPTS[1], PROMPTS[2], PROMPTS[3]]
    specs = [SequenceSpec(i, text, 10, temperature=0) for i, text in enumerate(texts)]
    events = []
    real_apply = engine.apply
    engine.apply = lambda work: (lambda out: (events.extend(out), out)[1])(real_apply(work))
    streamed, results = run(engine, specs)
    errors = {e.seq_id: e.error for e in events if e.finish_reason == "error"}
    assert set(errors) == {0, 2} and results[0] == ("error", None) and results[2] == ("error", None)
    assert "non-finite logits" in errors[0] and "InjectedFault" in errors[2] and "\n" not in errors[2]
    for i in (1, 3, 4, 5):
        ref = reference(model, tokenizer, texts[i], 10, 512)
        assert results[i][1]["blanks"] == ref.blanks[0], texts[i]
    assert engine.live() == 0 and engine.free_slots() == 2


def test_non_finite_logits_and_impossible_tokens_end_the_sequence(demo, monkeypatch):
    """A sampled sequence whose probabilities are not finite (here: a temperature that overflows the logits) never
    emits the image/padding id such sampling lands on: it ends with an error, a greedy neighbour is unchanged."""
    model, tokenizer = demo
    engine = Engine(model, tokenizer, slots=2)
    specs = [SequenceSpec(0, PROMPTS[1], 8, temperature=1e-45), SequenceSpec(1, PROMPTS[0], 8, temperature=0)]
    events = []
    real_apply = engine.apply
    engine.apply = lambda work: (lambda out: (events.extend(out), out)[1])(real_apply(work))
    _, results = run(engine, specs)
    error = next(e.error for e in events if e.seq_id == 0 and e.finish_reason == "error")
    assert "which generation never picks" in error
    assert results[1][1]["blanks"] == reference(model, tokenizer, PROMPTS[0], 8, 512).blanks[0]
