"""LAMBADA: predict the last word of a passage; accuracy = exact match of the stripped first word."""
from functools import partial
from string import punctuation

from evaluation import GenerationTask, qa_evaluate
from evaluation.metrics import decode_text
from tasks.lambada.strategy import BeamSearchStrategyForLAMBADA


def exact_match_score(prediction: str, ground_truth: str) -> bool:
    return prediction.strip() == ground_truth.strip()


class LAMBADA(GenerationTask):
    @property
    def metrics(self):
        return {"Accuracy": partial(qa_evaluate, metric=exact_match_score)}

    def __init__(self, model, tokenizer, config, options=None):
        super().__init__(model, tokenizer, config, options)
        # Ids banned from the continuation: the original's hard-coded "'" / "``" pieces plus punctuation.
        self.banned_prefix = [[46010], [146337]]
        self.invalid_slices = [20068, 146010, 146337]
        for p in punctuation:
            ids = tokenizer.tokenize(p)
            if len(ids) == 1:
                self.invalid_slices.append(ids[0])
            self.banned_prefix.append(ids)

    def make_strategy(self, batch_size):
        c = self.config
        if c.sampling_strategy != "BeamSearchStrategy":
            return super().make_strategy(batch_size)
        return BeamSearchStrategyForLAMBADA(
            batch_size, c.num_beams, length_penalty=c.length_penalty, consider_end=True,
            end_tokens=self.end_tokens, invalid_slices=self.invalid_slices, banned_prefix=self.banned_prefix,
            no_repeat_ngram_size=c.no_repeat_ngram_size, min_gen_length=c.min_gen_length, deterministic=True)

    def first_word_tokens(self, ids):
        text = decode_text(self.tokenizer, ids).strip()
        return self.tokenizer.tokenize(text.split(" ")[0])

    def choose_beam(self, beams):
        """The first beam whose second space-separated piece is punctuation (the word is complete), else the best.
        As in the original, "is punctuation" is a substring test on string.punctuation (so "" counts)."""
        for beam in beams:
            pieces = decode_text(self.tokenizer, beam).strip().split(" ")
            if len(pieces) >= 2 and pieces[1] in punctuation:
                return beam
        return beams[0]

    def predict_batch(self, batch, indices, dataset):
        records = []
        for beams in self.generate(batch, return_all_beams=True):
            ids = self.first_word_tokens(self.choose_beam(beams))
            records.append({"prediction_ids": ids, "prediction_text": decode_text(self.tokenizer, ids)})
        return records
