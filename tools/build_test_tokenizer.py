"""Build a small test stand-in for icetk's ice_text.model (NOT the real GLM-130B tokenizer).

A unigram SentencePiece model is trained in-process on tools/data/bilingual_corpus.txt with icetk's control ids
(unk 0, <s> 1, </s> 2, <pad> 3, user symbol <n>), then padded with filler pieces to icetk's 130000 pieces so that
every text id 20000..149999 decodes to text and the special ids sit at 150000+ exactly as with the real file.
Usage: python tools/build_test_tokenizer.py OUT_PATH
"""
import argparse
import io
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import sentencepiece as spm  # noqa: E402
from sentencepiece import sentencepiece_model_pb2  # noqa: E402

from model.errors import UserError, main_entry  # noqa: E402
from model.tokenizer import TEXT_PIECE_COUNT, TOKENIZER_FILE  # noqa: E402

CORPUS_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "bilingual_corpus.txt")

TRAINER_OPTIONS = dict(
    model_type="unigram", vocab_size=4000, hard_vocab_limit=False,  # the corpus supports ~2200 pieces
    character_coverage=0.9995, num_threads=1, minloglevel=2,
    unk_id=0, bos_id=1, eos_id=2, pad_id=3, pad_piece="<pad>", user_defined_symbols=["<n>"],
)

# Full-width letters and digits: NFKC normalisation (SentencePiece's default nmt_nfkc) maps them to ASCII, so the
# normalised input never contains them and a filler piece can never be chosen when encoding; decoding still shows them.
_FULLWIDTH = str.maketrans("0123456789pad", "０１２３４５６７８９ｐａｄ")


def filler_piece(piece_id: int) -> str:
    return f"pad{piece_id}".translate(_FULLWIDTH)


def train_base_model(corpus_path: str = CORPUS_PATH) -> bytes:
    with open(corpus_path, encoding="utf-8") as f:
        lines = [line for line in f.read().splitlines() if line.strip()]
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=buf, **TRAINER_OPTIONS)
    return buf.getvalue()


def pad_model(model_bytes: bytes, piece_count: int = TEXT_PIECE_COUNT) -> bytes:
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(model_bytes)
    # The fillers get the lowest trained score: a lower one would lower the unknown-piece penalty
    # (min score - 10) and could change how text with unknown characters is segmented.
    min_score = min(p.score for p in proto.pieces if p.type == p.NORMAL)
    for piece_id in range(len(proto.pieces), piece_count):
        proto.pieces.add(piece=filler_piece(piece_id), score=min_score, type=proto.SentencePiece.NORMAL)
    return proto.SerializeToString()


def build_test_tokenizer(out_path: str) -> str:
    """Write the padded test model to out_path atomically (same bytes every time) and return out_path."""
    data = pad_model(train_base_model())
    out_dir = os.path.dirname(os.path.abspath(out_path))
    os.makedirs(out_dir, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out_dir, prefix=".ice_text.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, out_path)  # concurrent builders each rename a complete, identical file
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return out_path


def ensure_test_tokenizer(cache_dir: str) -> str:
    """<cache_dir>/ice_text.model, built only if missing."""
    path = os.path.join(cache_dir, TOKENIZER_FILE)
    if not os.path.isfile(path):
        build_test_tokenizer(path)
    return path


@main_entry
def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out_path", help=f"where to write the model (e.g. DIR/{TOKENIZER_FILE})")
    out_path = p.parse_args().out_path
    try:
        print(build_test_tokenizer(out_path))
    except OSError as e:
        raise UserError(f"cannot write {out_path}: {e.strerror}") from None


if __name__ == "__main__":
    main()
