"""ModelForEvaluation on the SAT parity fixture: log-probs, greedy ids and losses against independent references."""
import numpy as np
import pytest
import torch

from evaluation.configs import GenerationTaskConfig, LanguageModelTaskConfig, MultiChoiceTaskConfig, TaskType
from evaluation.dataset import GenerationTaskDataset, LanguageModelTaskDataset, MultiChoiceTaskDataset
from evaluation.model import ModelForEvaluation
from tests.eval_helpers import EVAL_DATA, write_jsonl
from tests.helpers import case_inputs, fixture_cases, load_fixture_model, reference

END_TOKENS = [150005, 20002]


@pytest.fixture(scope="module")
def model():
    return ModelForEvaluation(load_fixture_model(torch.float32))


def _config(cls, type_, path, **kw):
    return cls(name="t", type=type_, path=str(path), **kw)


def test_multichoice_long_layout_and_log_probs_match_sat(model, tmp_path, test_tokenizer):
    case = fixture_cases()["multichoice_long"]
    tokens, positions, mask = case_inputs(case)
    c1, c2 = [20311, 20542, 20777], [21001, 20420]
    context = tokens[0, :96].tolist()
    path = write_jsonl(tmp_path / "mc.jsonl", [{"inputs": context, "choices": [c1, c2], "label": 0}])
    ds = MultiChoiceTaskDataset(str(path), _config(MultiChoiceTaskConfig, TaskType.MULTICHOICE, tmp_path),
                                test_tokenizer)
    batch = ds.collate([0])
    assert torch.equal(batch["tokens"], tokens) and torch.equal(batch["position_ids"], positions)
    assert torch.equal(batch["attention_mask"], mask)
    log_probs = model.cond_log_prob(batch)[0]

    ref = reference("mp1_fp32")
    cols = ref["cols"].tolist()
    logits, lse = ref["multichoice_long.logits_cols"][0], ref["multichoice_long.logsumexp"][0]
    expected = [sum(logits[row, cols.index(t)] - lse[row] for row, t in zip(rows, choice))
                for rows, choice in [((97, 98, 99), c1), ((100, 101), c2)]]
    assert np.max(np.abs(np.array(log_probs) - expected)) < 2e-4


def test_greedy_generation_matches_sat_decoding_loop(model, tmp_path, test_tokenizer):
    from generation import BaseStrategy
    gen = fixture_cases()["gen"]
    path = write_jsonl(tmp_path / "g.jsonl", [{"inputs": gen["prompt"][:-2], "targets": [[20005]]}])
    config = _config(GenerationTaskConfig, TaskType.GENERATION, tmp_path, use_task_mask=True, max_gen_length=8)
    batch = GenerationTaskDataset(str(path), config, test_tokenizer).collate([0])
    assert batch["tokens"][0].tolist() == gen["prompt"]
    # SAT's run took the argmax over the text ids only and had no end tokens
    strategy = BaseStrategy(1, top_k=1, invalid_slices=[slice(0, 20000), slice(150000, 150528)], end_tokens=[])
    assert model.generate_text(batch, strategy) == [gen["generated"]]


def _greedy_without_cache(raw_model, tokens, positions, targets, mask, steps):
    """Recompute the whole sequence every step from a hand-built mask: context as given, generated tokens see the
    context row of the last context token plus the earlier generated tokens."""
    ids = tokens.tolist()
    ctx = len(ids)
    for t in range(steps):
        n = ctx + t
        full = torch.zeros(n, n, dtype=torch.bool)
        full[:ctx, :ctx] = mask
        full[ctx:, :ctx] = mask[ctx - 1]
        full[ctx:, ctx:] = ~torch.ones(t, t, dtype=torch.bool).tril()
        full[:ctx, ctx:] = True
        pos = torch.cat([positions, targets[:t]])
        logits = raw_model(torch.tensor([ids]), pos[None], full[None, None])[0]
        ids.append(int(logits[0, -1].argmax()))
        if ids[-1] in END_TOKENS:
            ids.pop()
            break
    return ids[ctx:]


@pytest.mark.parametrize("task_mask", [True, False])
def test_batched_generation_equals_one_by_one_and_a_cacheless_reference(model, test_tokenizer, task_mask):
    from generation import BaseStrategy
    config = _config(GenerationTaskConfig, TaskType.GENERATION, EVAL_DATA, use_task_mask=task_mask, max_gen_length=4)
    ds = GenerationTaskDataset(str(EVAL_DATA / "bloom/mc_taco/prompt_a/validation_pp.jsonl"), config, test_tokenizer)
    batched = model.generate_text(ds.collate([0, 1, 2]), BaseStrategy(3, top_k=1, end_tokens=END_TOKENS))
    single = [model.generate_text(ds.collate([i]), BaseStrategy(1, top_k=1, end_tokens=END_TOKENS))[0]
              for i in range(3)]
    assert batched == single
    for i in range(3):
        s = ds.build_sample(i)
        layout = s["layout"]
        one = ds.collate([i])
        reference_ids = _greedy_without_cache(model.model, torch.from_numpy(layout.tokens),
                                              torch.from_numpy(layout.position_ids),
                                              torch.from_numpy(s["target_position_ids"]),
                                              one["attention_mask"][0, 0], 4)
        assert single[i] == reference_ids


def test_batched_log_probs_equal_micro_batch_1(model, test_tokenizer):
    config = _config(MultiChoiceTaskConfig, TaskType.MULTICHOICE, EVAL_DATA)
    for name in ("bloom/glue_cola/prompt_a/validation.jsonl", "data/stereoset-dataset.jsonl"):
        ds = MultiChoiceTaskDataset(str(EVAL_DATA / name), config, test_tokenizer)
        n = len(ds)
        batched = model.cond_log_prob(ds.collate(list(range(n))))
        single = [model.cond_log_prob(ds.collate([i]))[0] for i in range(n)]
        assert np.allclose(batched, single, rtol=0, atol=1e-4)


def test_language_model_loss_matches_a_full_log_softmax(model, test_tokenizer):
    config = _config(LanguageModelTaskConfig, TaskType.LANGUAGE_MODEL, EVAL_DATA, max_seq_length=24,
                     generation_length=8, use_task_mask=True)
    ds = LanguageModelTaskDataset(str(EVAL_DATA / "wikitext-2/wiki.test.tokens"), config, test_tokenizer)
    assert len(ds) >= 2
    batch = ds.collate(list(range(len(ds))))
    losses = model.calculate_loss(batch)
    for i in range(len(ds)):
        one = ds.collate([i])
        logits = model.model(one["tokens"], one["position_ids"], one["attention_mask"])[0][0]
        logp = torch.log_softmax(logits.double(), dim=-1)
        nll = -logp[torch.arange(logp.shape[0]), one["targets"][0]]
        expected = float((nll * one["loss_mask"][0]).sum())
        assert losses[i] == pytest.approx(expected, rel=1e-5)


def test_lambada_beam_search_bans_punctuation_prefixes():
    import importlib
    lambada = importlib.import_module("tasks.lambada.strategy")
    strategy = lambada.BeamSearchStrategyForLAMBADA(1, 2, end_tokens=[9], banned_prefix=[[3], [5, 6]],
                                                    deterministic=True)
    logits = torch.zeros(1, 1, 10)
    logits[0, 0, [3, 5, 4]] = torch.tensor([10.0, 5.0, 4.0])  # 3 is banned as a first token
    tokens, _ = strategy.forward(logits, torch.tensor([[[1, 2]]]), None)
    assert sorted(tokens[0, :, -1].tolist()) == [4, 5]
    logits = torch.zeros(1, 2, 10)
    logits[0, :, 6] = 10.0  # 6 is banned only right after 5
    tokens, _ = strategy.forward(logits, tokens, None)
    assert [5, 6] not in [beam[-2:] for beam in tokens[0].tolist()]
    assert [4, 6] in [beam[-2:] for beam in tokens[0].tolist()]


@pytest.mark.parametrize("strategy", ["BaseStrategy", "BeamSearchStrategy"])
def test_task_results_do_not_depend_on_the_micro_batch_size(model, test_tokenizer, strategy):
    from evaluation.tasks import GenerationTask, MultiChoiceTask, RunOptions
    records = {}
    for mbs in (1, 3):
        config = _config(GenerationTaskConfig, TaskType.GENERATION, EVAL_DATA / "bloom/mc_taco",
                         sampling_strategy=strategy, num_beams=3, max_gen_length=4, micro_batch_size=mbs)
        task = GenerationTask(model, test_tokenizer, config, RunOptions(progress=False))
        file = "prompt_a/validation_pp.jsonl"
        records[mbs] = task.run_file(task.build_dataset(file), file)
        config = _config(MultiChoiceTaskConfig, TaskType.MULTICHOICE, EVAL_DATA / "data", micro_batch_size=mbs)
        task = MultiChoiceTask(model, test_tokenizer, config, RunOptions(progress=False))
        file = "stereoset-dataset.jsonl"
        records[mbs] += task.run_file(task.build_dataset(file), file)
    for one, three in zip(records[1], records[3]):
        assert one.keys() == three.keys() and one["index"] == three["index"]
        assert one.get("prediction_ids") == three.get("prediction_ids")
        assert np.allclose(one.get("choice_logprobs", 0), three.get("choice_logprobs", 0), atol=1e-4)
