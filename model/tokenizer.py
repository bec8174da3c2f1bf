"""The `icetk-glm-130B` tokenizer (SAT 0.2.x `_IceTokenizer` over icetk), reimplemented over sentencepiece.

It reads the same `ice_text.model` icetk uses; the icetk package itself is not needed and nothing is ever downloaded.
Ids: [0, 20000) are icetk's image tokens (only 0 is used, as padding), text id = SentencePiece id + 20000, and the
special tokens are hard-coded right after icetk's 130000 text pieces (150000..150007); eos is the SP `</s>` (20002).
"""
import os
import re
import warnings
from typing import Iterable, List, Optional, Sequence, Tuple

import sentencepiece as spm

from model.errors import UserError

TOKENIZER_TYPE = "icetk-glm-130B"
TOKENIZER_FILE = "ice_text.model"
NUM_IMAGE_TOKENS = 20000
TEXT_PIECE_COUNT = 130000  # pieces in icetk's ice_text.model
NUM_TOKENS = NUM_IMAGE_TOKENS + TEXT_PIECE_COUNT  # 150000: the first special id

_ADDED_SPECIALS = ["[MASK]", "[gMASK]", "[sMASK]", "eod", "sop", "eop", "ENC", "dBLOCK"]
SPECIAL_IDS = {name: NUM_TOKENS + i for i, name in enumerate(_ADDED_SPECIALS)}
SPECIAL_IDS["eos"] = NUM_IMAGE_TOKENS + 2  # the SP `</s>`, forced by SAT after adding the others
PAD_ID = 0

# How detokenize renders ids it splits at: "[" + name + "]" (so [MASK] becomes "[[MASK]]").
_RENDERED = {i: f"[{name}]" for name, i in SPECIAL_IDS.items()}
_RENDERED[SPECIAL_IDS["eos"]] = "[</s>]"
_RENDERED[PAD_ID] = "[pad]"

# How a text written to the tokenizer API (the server's /tokenize, echo prompts) names a special token: the masks as
# prompts write them, the others as detokenize renders them (so "[sop]" + text reads back as sop + the text's ids).
SPELLED = {name if name.startswith("[") else _RENDERED[i]: i for name, i in SPECIAL_IDS.items()}
_SPELLED_PATTERN = re.compile("|".join(re.escape(s) for s in sorted(SPELLED, key=len, reverse=True)))
_TOKEN_CONTEXT = 4  # ids decoded before each one when splitting a text into its tokens' strings


class IceTokenizer:
    """Tokenizer with the ids, specials and text rendering of SAT 0.2.x `--tokenizer-type icetk-glm-130B`."""

    num_tokens = NUM_TOKENS
    pad_id = PAD_ID
    mask_id = SPECIAL_IDS["[MASK]"]
    gmask_id = SPECIAL_IDS["[gMASK]"]
    smask_id = SPECIAL_IDS["[sMASK]"]
    eod_id = SPECIAL_IDS["eod"]
    sop_id = SPECIAL_IDS["sop"]
    eop_id = SPECIAL_IDS["eop"]
    eos_id = SPECIAL_IDS["eos"]

    def __init__(self, model_path: str):
        self.model_path = model_path
        self._sp = _load_sentencepiece(model_path)
        self.piece_count = self._sp.get_piece_size()
        self._max_token_chars = None
        if self.piece_count != TEXT_PIECE_COUNT:
            warnings.warn(f"{model_path} has {self.piece_count} pieces, not icetk's {TEXT_PIECE_COUNT}: "
                          f"text ids {NUM_IMAGE_TOKENS + self.piece_count}..{NUM_TOKENS - 1} are unused "
                          f"(special ids stay at {NUM_TOKENS}+)", stacklevel=2)

    @property
    def vocab_size(self) -> int:
        return NUM_TOKENS + len(SPECIAL_IDS)  # 150009, as SAT's property (the model pads its vocab to 150528)

    def __len__(self) -> int:
        return self.vocab_size

    @property
    def max_token_chars(self) -> int:
        """Characters of the longest vocabulary piece: a text of more than n times this many characters has more
        than n tokens (unless normalization drops characters, i.e. collapses whitespace runs)."""
        if self._max_token_chars is None:
            self._max_token_chars = max(len(self._sp.id_to_piece(i)) for i in range(self.piece_count))
        return self._max_token_chars

    @property
    def end_tokens(self) -> List[int]:
        return [self.eop_id, self.eos_id]

    def get_command(self, name: str) -> int:
        try:
            return SPECIAL_IDS[name]
        except KeyError:
            raise KeyError(f"unknown special token {name!r}; known: {', '.join(SPECIAL_IDS)}") from None

    def tokenize(self, text: str) -> List[int]:
        """icetk.encode(text) with its defaults: the text goes to SentencePiece as is (a newline becomes a space)."""
        return [i + NUM_IMAGE_TOKENS for i in self._sp.encode(text)]

    def decode(self, ids: Iterable[int]) -> str:
        """Raw icetk decode of text ids (what the original reaches as `tokenizer.tokenizer.decode`)."""
        ids = [int(i) for i in ids]
        for i in ids:
            self._check_text_id(i)
        return self._sp.decode([i - NUM_IMAGE_TOKENS for i in ids]).replace("<n>", "\n")

    def detokenize(self, ids: Iterable[int]) -> str:
        """Decode runs of text ids; specials, eos and pad are written as `[name]` between them."""
        out, run = [], []
        for i in (int(i) for i in ids):
            rendered = _RENDERED.get(i)
            if rendered is None:
                run.append(i)
                continue
            out.append(self.decode(run))
            out.append(rendered)
            run = []
        out.append(self.decode(run))
        return "".join(out)

    def knows(self, i: int) -> bool:
        """Whether detokenize takes id i: a text id, a special token or pad."""
        return int(i) in _RENDERED or NUM_IMAGE_TOKENS <= int(i) < NUM_IMAGE_TOKENS + self.piece_count

    def id_text(self, i: int) -> str:
        """One id as text, for any id the model can score: detokenize([i]), or "[id N]" for an id detokenize does
        not take (icetk's image tokens, the model's padding rows)."""
        return self.detokenize([i]) if self.knows(i) else f"[id {int(i)}]"

    def tokenize_spelled(self, text: str) -> List[int]:
        """tokenize() of the text between the special tokens written as in SPELLED ("[sop]", "[MASK]", ...)."""
        ids, start = [], 0
        for match in _SPELLED_PATTERN.finditer(text):
            ids += self.tokenize(text[start:match.start()]) if match.start() > start else []
            ids.append(SPELLED[match.group()])
            start = match.end()
        return ids + (self.tokenize(text[start:]) if start < len(text) else [])

    def token_texts(self, ids: Sequence[int], start: int = 0) -> List[str]:
        """The text each of ids[start:] adds to detokenize(ids): the strings concatenate to what detokenize(ids)
        adds after detokenize(ids[:start]). A character made of several byte pieces goes to the piece that
        completes it. Each piece is decoded after a few of its predecessors (the same ones before and after it), so
        SentencePiece's leading-space rule treats it as inside the whole text, in O(len(ids)) decodes."""
        ids = [int(i) for i in ids]
        texts, done = [], start  # ids[:done] are accounted for
        for k in range(start, len(ids)):
            left = max(0, done - _TOKEN_CONTEXT)
            before, after = self.detokenize(ids[left:done]), self.detokenize(ids[left:k + 1])
            if k + 1 < len(ids) and after.endswith("\ufffd"):
                texts.append("")  # an incomplete character: its text comes with the piece that completes it
                continue
            texts.append(after[len(before):])
            done = k + 1
        return texts

    def _check_text_id(self, i: int) -> None:
        if not NUM_IMAGE_TOKENS <= i < NUM_IMAGE_TOKENS + self.piece_count:
            if i in _RENDERED:
                raise ValueError(f"id {i} is the special token {_RENDERED[i]}, not text; use detokenize()")
            raise ValueError(f"id {i} is not a text token of this tokenizer (text ids are "
                             f"{NUM_IMAGE_TOKENS}..{NUM_IMAGE_TOKENS + self.piece_count - 1}, "
                             f"specials {NUM_TOKENS}..{NUM_TOKENS + len(_ADDED_SPECIALS) - 1}, pad {PAD_ID})")


def text_id_range(tokenizer) -> Tuple[int, int]:
    """[lo, hi): the text ids of `tokenizer` (icetk's layout: after the image tokens, one per SentencePiece piece)."""
    return NUM_IMAGE_TOKENS, NUM_IMAGE_TOKENS + getattr(tokenizer, "piece_count", TEXT_PIECE_COUNT)


def _load_sentencepiece(path: str) -> spm.SentencePieceProcessor:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise UserError(f"cannot read tokenizer file {path}: {e.strerror}") from None
    sp = spm.SentencePieceProcessor()
    try:
        sp.LoadFromSerializedProto(data)  # not the constructor: it silently skips empty bytes
        return sp
    except Exception:  # sentencepiece raises RuntimeError with an internal message
        raise UserError(f"{path} is not a valid SentencePiece model (expected icetk's {TOKENIZER_FILE})") from None


def _candidate_paths(explicit: Optional[str]) -> List[str]:
    if explicit:  # an explicit path is the only one tried, so a typo never silently picks another file
        path = os.path.expanduser(explicit)
        return [os.path.join(path, TOKENIZER_FILE) if os.path.isdir(path) else path]
    candidates = []
    if os.environ.get("ICETK_MODELS"):
        candidates.append(os.path.join(os.path.expanduser(os.environ["ICETK_MODELS"]), TOKENIZER_FILE))
    candidates.append(os.path.join(os.path.expanduser("~"), ".icetk_models", TOKENIZER_FILE))
    return candidates


def resolve_tokenizer_path(explicit: Optional[str]) -> str:
    """--tokenizer-path (file or folder), else $ICETK_MODELS/ice_text.model, else ~/.icetk_models/ice_text.model."""
    candidates = _candidate_paths(explicit)
    for path in candidates:
        if os.path.isfile(path):
            return path
    raise UserError(f"tokenizer file not found (tried: {', '.join(candidates)}); icetk users have it at "
                    f"~/.icetk_models/{TOKENIZER_FILE}: pass --tokenizer-path FILE_OR_DIR or set ICETK_MODELS=DIR")


def get_tokenizer(args) -> IceTokenizer:
    tokenizer_type = getattr(args, "tokenizer_type", TOKENIZER_TYPE)
    if tokenizer_type != TOKENIZER_TYPE:
        raise UserError(f"unsupported --tokenizer-type {tokenizer_type!r}; supported: {TOKENIZER_TYPE}")
    return IceTokenizer(resolve_tokenizer_path(getattr(args, "tokenizer_path", None)))
