import argparse
import os
import subprocess
import sys
import warnings

import pytest
import sentencepiece as spm

from model.errors import UserError
from model.tokenizer import IceTokenizer, get_tokenizer, resolve_tokenizer_path
from tools.build_test_tokenizer import (CORPUS_PATH, build_test_tokenizer, ensure_test_tokenizer, filler_piece,
                                        train_base_model)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENGLISH = "The library opens at nine on weekdays, and the bridge is 1,240 metres long."
CHINESE = "图书馆周一到周五九点开门。这座桥长一千二百四十米。"


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return ensure_test_tokenizer(str(tmp_path_factory.mktemp("icetk")))


@pytest.fixture(scope="module")
def tok(model_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a 130000-piece model loads without the piece-count warning
        return IceTokenizer(model_path)


@pytest.fixture(scope="module")
def base_model():
    """The trained model before padding, to compare segmentations against."""
    sp = spm.SentencePieceProcessor()
    sp.LoadFromSerializedProto(train_base_model())
    return sp


def test_special_ids_and_names(tok):
    expected = {"[MASK]": 150000, "[gMASK]": 150001, "[sMASK]": 150002, "eod": 150003, "sop": 150004,
                "eop": 150005, "ENC": 150006, "dBLOCK": 150007, "eos": 20002}
    assert {name: tok.get_command(name) for name in expected} == expected
    assert (tok.mask_id, tok.gmask_id, tok.smask_id, tok.sop_id, tok.eop_id, tok.eos_id, tok.pad_id) == \
        (150000, 150001, 150002, 150004, 150005, 20002, 0)
    assert tok.end_tokens == [150005, 20002]
    assert tok.vocab_size == len(tok) == 150009
    assert tok.num_tokens == 150000
    with pytest.raises(KeyError, match="pad"):
        tok.get_command("pad")
    with pytest.raises(KeyError, match=r"\[gMASK\]"):
        tok.get_command("gMASK")


def test_piece_layout(model_path):
    sp = spm.SentencePieceProcessor(model_file=model_path)
    assert sp.get_piece_size() == 130000
    assert [sp.id_to_piece(i) for i in range(4)] == ["<unk>", "<s>", "</s>", "<pad>"]
    assert (sp.unk_id(), sp.bos_id(), sp.eos_id(), sp.pad_id()) == (0, 1, 2, 3)


@pytest.mark.parametrize("text", [ENGLISH, CHINESE, ENGLISH + " " + CHINESE, "如果 x + 3 = 10,那么 x = 7。"])
def test_round_trip(tok, base_model, text):
    ids = tok.tokenize(text)
    assert ids and all(20000 <= i < 20000 + base_model.get_piece_size() for i in ids)
    assert tok.decode(ids) == text
    assert tok.detokenize(ids) == text


def test_icetk_encode_defaults(tok):
    assert tok.tokenize("") == []
    assert tok.decode(tok.tokenize("nine\non  weekdays")) == "nine on weekdays"  # SP normalisation, no <n>
    newline = tok.tokenize("<n>")[-1]
    assert tok.decode(tok.tokenize("nine<n>weekdays")) == "nine\nweekdays" and tok.decode([newline]) == "\n"
    # NFKC, as the real ice_text.model: full-width punctuation becomes ASCII (ChatGLM-6B issue #8)
    assert tok.decode(tok.tokenize("开门，这座桥：长！")) == "开门,这座桥:长!"
    assert tok.tokenize("tree") == [i + 20000 for i in spm.SentencePieceProcessor(
        model_file=tok.model_path).encode("tree")]


def test_detokenize_renders_specials(tok):
    a, b = tok.tokenize("the train"), tok.tokenize("left at noon")
    ids = [tok.gmask_id, *a, tok.mask_id, *b, tok.smask_id, tok.sop_id, *b, tok.eop_id, tok.eos_id, 0, 0]
    assert tok.detokenize(ids) == \
        "[[gMASK]]the train[[MASK]]left at noon[[sMASK]][sop]left at noon[eop][</s>][pad][pad]"
    assert tok.detokenize([tok.get_command(n) for n in ("eod", "ENC", "dBLOCK")]) == "[eod][ENC][dBLOCK]"
    assert tok.detokenize([]) == ""


def test_detokenize_accepts_tensors(tok):
    torch = pytest.importorskip("torch")
    ids = tok.tokenize(ENGLISH) + [tok.eos_id]
    assert tok.detokenize(torch.tensor(ids)) == ENGLISH + "[</s>]"


@pytest.mark.parametrize("bad", [1, 19999, 150008, 150527, -1])
def test_bad_ids_raise_value_error(tok, bad):
    with pytest.raises(ValueError, match=f"id {bad} "):
        tok.detokenize(tok.tokenize("the") + [bad])
    with pytest.raises(ValueError, match=f"id {bad} "):
        tok.decode([bad])


def test_raw_decode_rejects_specials(tok):
    with pytest.raises(ValueError, match="special"):
        tok.decode([tok.sop_id])


def test_encoding_never_uses_filler_pieces(tok, base_model):
    with open(CORPUS_PATH, encoding="utf-8") as f:
        texts = f.read().splitlines()
    texts += ["ｐａｄ１２３４５ and ｐａｄ２２０９ look like filler pieces", filler_piece(129999),
              "unknown characters: 😀 龘 ☃", "Ｆｕｌｌ　ｗｉｄｔｈ！ ﬁsh ①②"]
    assert [tok.tokenize(t) for t in texts] == [[i + 20000 for i in ids] for ids in base_model.encode(texts)]


def test_every_filler_id_decodes_to_text(model_path, base_model):
    sp = spm.SentencePieceProcessor(model_file=model_path)
    filler_ids = range(base_model.get_piece_size(), 130000)
    decoded = sp.decode([[i] for i in filler_ids])
    assert all(decoded)
    assert decoded[0] == filler_piece(filler_ids[0]) and decoded[-1] == "ｐａｄ１２９９９９"


def test_build_is_deterministic(tmp_path, model_path):
    first = build_test_tokenizer(str(tmp_path / "a" / "ice_text.model"))
    second = build_test_tokenizer(str(tmp_path / "b.model"))
    with open(first, "rb") as f1, open(second, "rb") as f2, open(model_path, "rb") as f3:
        assert f1.read() == f2.read() == f3.read()
    assert sorted(os.listdir(tmp_path / "a")) == ["ice_text.model"]  # no temp file left behind


def test_ensure_does_not_rebuild(tmp_path):
    (tmp_path / "ice_text.model").write_bytes(b"cached")
    assert ensure_test_tokenizer(str(tmp_path)) == str(tmp_path / "ice_text.model")
    assert (tmp_path / "ice_text.model").read_bytes() == b"cached"


def test_cli_builds_the_model(tmp_path):
    out = tmp_path / "cli" / "ice_text.model"
    result = subprocess.run([sys.executable, "tools/build_test_tokenizer.py", str(out)], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(out)
    assert spm.SentencePieceProcessor(model_file=str(out)).get_piece_size() == 130000


@pytest.fixture
def isolated_home(tmp_path, monkeypatch):
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("ICETK_MODELS", raising=False)
    return home


def _place(folder, model_path):
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / "ice_text.model"
    os.symlink(model_path, target)
    return str(target)


def test_resolve_explicit_file_and_dir(tmp_path, isolated_home, model_path):
    _place(isolated_home / ".icetk_models", model_path)
    explicit = _place(tmp_path / "mine", model_path)
    assert resolve_tokenizer_path(explicit) == explicit
    assert resolve_tokenizer_path(str(tmp_path / "mine")) == explicit
    with pytest.raises(UserError) as e:  # an explicit path that is missing is not replaced by the default
        resolve_tokenizer_path(str(tmp_path / "typo.model"))
    assert "typo.model" in str(e.value) and ".icetk_models/ice_text.model," not in str(e.value)


def test_resolve_env_then_home(tmp_path, isolated_home, monkeypatch, model_path):
    home_file = _place(isolated_home / ".icetk_models", model_path)
    assert resolve_tokenizer_path(None) == home_file
    monkeypatch.setenv("ICETK_MODELS", str(tmp_path / "env"))
    assert resolve_tokenizer_path(None) == home_file  # $ICETK_MODELS has no file: fall back to HOME
    env_file = _place(tmp_path / "env", model_path)
    assert resolve_tokenizer_path(None) == env_file
    assert resolve_tokenizer_path("") == env_file


def test_missing_tokenizer_message(tmp_path, isolated_home, monkeypatch):
    monkeypatch.setenv("ICETK_MODELS", str(tmp_path / "env"))
    with pytest.raises(UserError) as e:
        resolve_tokenizer_path(None)
    message = str(e.value)
    assert "\n" not in message
    for part in (str(tmp_path / "env" / "ice_text.model"), str(isolated_home / ".icetk_models" / "ice_text.model"),
                 "~/.icetk_models/ice_text.model", "--tokenizer-path", "ICETK_MODELS"):
        assert part in message


@pytest.mark.parametrize("content", [b"", b"this is not a sentencepiece model\x00\x01"])
def test_invalid_model_file(tmp_path, content):
    bad = tmp_path / "ice_text.model"
    bad.write_bytes(content)
    with pytest.raises(UserError, match="not a valid SentencePiece model") as e:
        IceTokenizer(str(bad))
    assert str(bad) in str(e.value)
    with pytest.raises(UserError, match="not a valid SentencePiece model"):
        get_tokenizer(argparse.Namespace(tokenizer_type="icetk-glm-130B", tokenizer_path=str(tmp_path)))


def test_get_tokenizer(model_path):
    tok = get_tokenizer(argparse.Namespace(tokenizer_type="icetk-glm-130B", tokenizer_path=model_path))
    assert tok.tokenize("the") and tok.model_path == model_path
    with pytest.raises(UserError, match="icetk-glm-130B"):
        get_tokenizer(argparse.Namespace(tokenizer_type="glm_GPT2BPETokenizer", tokenizer_path=model_path))


def test_small_model_warns_but_works(tmp_path):
    small = tmp_path / "small.model"
    small.write_bytes(train_base_model())
    with pytest.warns(UserWarning, match="not icetk's 130000"):
        tok = IceTokenizer(str(small))
    assert tok.decode(tok.tokenize(ENGLISH)) == ENGLISH
    with pytest.raises(ValueError, match="id 149999 "):
        tok.detokenize([149999])
