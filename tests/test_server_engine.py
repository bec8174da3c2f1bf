"""generation/engine.py in-process on the demo model: continuous batching gives fill_blanks' greedy output whatever
joins or leaves the batch, across cache rebases; echo log-probs are the evaluation's, alone or packed in a batch, and
an echo's completion continues the scored reading."""
import pytest
import torch

from generation import BaseStrategy, fill_blanks, generation_invalid_slices
from generation.engine import Engine, SequenceSpec
from generation.scoring import echo_layout, score_texts
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
    (scored, _), = score_texts(model, tokenizer, [ids], [3], [False])
    layout, targets = language_model_window([], ids, tokenizer.get_command("[gMASK]"), tokenizer.get_command("sop"))
    batch = collate_layouts([layout])
    batch["targets"] = torch.from_numpy(targets)[None]
    loss_mask = torch.zeros(1, len(layout))
    loss_mask[0, 1:] = 1
    batch["loss_mask"] = loss_mask
    loss = ModelForEvaluation(model).calculate_loss(batch)[0]
    assert abs(sum(t.logprob for t in scored) + loss) <= 1e-4
    assert "".join(t.token for t in scored) == tokenizer.detokenize(ids) and scored[1].token.startswith(" ")
    assert all(len(t.top) == 3 and max(t.top.values()) >= t.logprob - 1e-6 for t in scored)


ECHO_TEXTS = ["The quick brown fox jumps over the lazy dog.", "Hello", "清华大学位于北京。 And a longer English tail."]


def test_packed_echo_scoring_equals_one_at_a_time_and_a_leading_sop_is_the_window_own(demo, monkeypatch):
    """Texts in one forward; those that begin alike (one question's answers) share one row."""
    import generation.scoring
    model, tokenizer = demo
    sop = tokenizer.get_command("sop")
    question = tokenizer.tokenize("Question: which animal says moo? Answer:")
    answers = [question + tokenizer.tokenize(a) for a in (" the cow", " a cat", " the small green frog")]
    texts = [tokenizer.tokenize(t) for t in ECHO_TEXTS] + [[sop] + tokenizer.tokenize(ECHO_TEXTS[0])] + answers
    rows = []
    collate = generation.scoring.collate_layouts
    monkeypatch.setattr(generation.scoring, "collate_layouts", lambda layouts: (rows.append(len(layouts)),
                                                                                collate(layouts))[1])
    packed = score_texts(model, tokenizer, texts, [2, 0, 1, 0, 1, 1, 0], [True, False, True, False, True, False, True])
    assert rows == [4]  # the three answers in one row (the sop-led text shares the first one's)
    for ids, (logprobs, nxt) in zip(texts, packed):
        (alone, alone_next), = score_texts(model, tokenizer, [ids], [2], [True])
        assert max(abs(a.logprob - b.logprob) for a, b in zip(logprobs, alone) if a.logprob is not None) <= 1e-5
        assert "".join(t.token for t in logprobs) == tokenizer.detokenize(ids)
        if nxt is not None:
            assert torch.allclose(nxt, alone_next, atol=1e-4)
    with_sop = packed[3][0]
    assert with_sop[0].token == "[sop]" and with_sop[0].logprob is None
    assert [t.logprob for t in with_sop[1:]] == pytest.approx([t.logprob for t in packed[0][0]], abs=1e-5)


def causal_greedy(model, tokenizer, ids, n):
    """The reference: the echo window ([gMASK] sop text) run whole after each token, greedy over generation's ids."""
    from generation import generation_invalid_slices
    from model.layout import collate_layouts
    end = [tokenizer.get_command("eop"), tokenizer.get_command("eos")]
    ids, out = list(ids), []
    for _ in range(n):
        batch = collate_layouts([echo_layout(ids, tokenizer, next_token=True)])
        logits = model.logits(batch["tokens"], batch["position_ids"], batch["attention_mask"])[0, -1].clone()
        for banned in generation_invalid_slices(tokenizer, end):
            logits[banned] = -float("inf")
        out.append(int(logits.argmax()))
        if out[-1] in end:
            break
        ids.append(out[-1])
    return out


def test_echo_completions_continue_the_scored_reading_in_a_batch_or_from_one_forward(demo, monkeypatch):
    """max_tokens 1: the token comes from the scoring forward itself (one forward for the whole batch); longer
    completions prefill the window through the cache and decode in the batch beside a blank-filling sequence."""
    model, tokenizer = demo
    engine = Engine(model, tokenizer, slots=3)
    ids = [tokenizer.tokenize(t) for t in ECHO_TEXTS]
    calls = []
    original = type(model).logits
    monkeypatch.setattr(type(model), "logits", lambda self, *a, **k: (calls.append(1), original(self, *a, **k))[1])
    specs = [SequenceSpec(i, t, 1, temperature=0, echo=True, ids=tuple(x), logprobs=1)
             for i, (t, x) in enumerate(zip(ECHO_TEXTS, ids))]
    events = engine.apply({"score": specs})
    assert len(calls) == 1 and engine.live() == 0
    monkeypatch.setattr(type(model), "logits", original)
    for i, x in enumerate(ids):
        first = causal_greedy(model, tokenizer, x, 1)
        mine = [e for e in events if e.seq_id == i]
        assert [len(e.logprobs) for e in mine[:2]] == [len(x), 1] and mine[-1].finish_reason in ("length", "stop")
        assert mine[-1].result["completion_tokens"] == 1
        if first[0] not in (tokenizer.get_command("eop"), tokenizer.get_command("eos")):
            assert mine[-1].result["text"] == tokenizer.detokenize(first)
    echo = SequenceSpec(10, ECHO_TEXTS[0], 6, temperature=0, echo=True, ids=tuple(ids[0]), logprobs=0)
    other = SequenceSpec(11, PROMPTS[0], 6, temperature=0)
    _, results = run(engine, [other, echo])
    end = (tokenizer.get_command("eop"), tokenizer.get_command("eos"))
    expected = [t for t in causal_greedy(model, tokenizer, ids[0], 6) if t not in end]
    assert results[10][1]["text"] == tokenizer.detokenize(expected)
    assert results[11][1]["blanks"] == reference(model, tokenizer, PROMPTS[0], 6, 512).blanks[0]


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


def test_the_scheduler_packs_the_waiting_echo_requests_into_one_scoring_batch(demo):
    """Echo requests that need no decode step are taken from anywhere in the queue, in order, at most --max-slots
    of them and at most the sequence length in padded tokens; a generation request is admitted beside them."""
    from server.metrics import Metrics
    from server.scheduler import Scheduler
    model, tokenizer = demo
    engine = Engine(model, tokenizer, slots=4, max_sequence_length=64)
    scheduler = Scheduler(engine, max_queue=32, metrics=Metrics(), distributed=False)
    short = tuple(tokenizer.tokenize("The quick brown fox"))
    echo = [SequenceSpec(i, "", i % 2, echo=True, ids=short) for i in range(1, 7)]
    generation = SequenceSpec(0, PROMPTS[1], 4, temperature=0)
    scheduler.submit([echo[0], generation] + echo[1:], lambda event: None)
    work = scheduler._next_work()
    assert [s.seq_id for s in work["score"]] == [1, 2, 3, 4] and work["admit"] == [generation]
    assert [s.seq_id for s in scheduler._next_work()["score"]] == [5, 6]
    long = tuple(tokenizer.tokenize("hello " * 24))[:29]  # 29 + [gMASK] sop = 31 positions: two fit in 64
    scheduler.submit([SequenceSpec(i, "", 0, echo=True, ids=long) for i in range(10, 13)], lambda event: None)
    assert [s.seq_id for s in scheduler._next_work()["score"]] == [10, 11]
