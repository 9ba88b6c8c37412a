"""The CLIP vocabulary is the real one, found in the documented order, and tokenizes like CLIP."""

from __future__ import annotations

import gzip
import io
import subprocess
import zipfile
from pathlib import Path

import pytest
from transformers import CLIPTokenizer

from engine.model import clip_vocab
from engine.model.clip_vocab import (MAX_LENGTH, NUM_MERGES, VOCAB_NAME, VOCAB_SIZE, WHEEL_MEMBER, bytes_to_unicode,
                               locate_vocab, write_clip_tokenizer)
from engine.errors import ModelLoadError

# Standard CLIP ids: <|startoftext|> a photograph of fire hydr ant <|endoftext|>.
# ("hydrant" is not one CLIP token: the real vocabulary splits it into hydr + ant.)
PHOTO_IDS = [49406, 320, 8853, 539, 1769, 8031, 773, 49407]


@pytest.fixture(scope="module")
def tokenizers(clip_vocab: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, CLIPTokenizer]:
    out = {}
    for family in ("sd15", "sd21"):
        folder = tmp_path_factory.mktemp(f"tok-{family}")
        write_clip_tokenizer(folder, family, clip_vocab)
        out[family] = CLIPTokenizer.from_pretrained(folder, local_files_only=True)
    return out


def test_byte_table_is_a_bijection_keeping_printable_bytes() -> None:
    table = bytes_to_unicode()
    assert sorted(table) == list(range(256))
    assert len(set(table.values())) == 256
    assert table[ord("a")] == "a" and table[ord("!")] == "!"
    assert table[ord(" ")] != " "


def test_folder_has_the_clip_files(clip_vocab: Path, tmp_path: Path) -> None:
    write_clip_tokenizer(tmp_path, "sd21", clip_vocab)
    merges = (tmp_path / "merges.txt").read_text(encoding="utf-8").splitlines()
    assert merges[0] == "#version: 0.2"
    assert len(merges) == 1 + NUM_MERGES
    assert {p.name for p in tmp_path.iterdir()} == {"vocab.json", "merges.txt", "tokenizer_config.json",
                                                     "special_tokens_map.json"}


@pytest.mark.parametrize("family, pad_id", [("sd15", 49407), ("sd21", 0)])
def test_tokenizes_with_standard_clip_ids_and_family_padding(tokenizers: dict, family: str, pad_id: int) -> None:
    tok = tokenizers[family]
    assert len(tok) == VOCAB_SIZE
    assert tok.model_max_length == MAX_LENGTH
    assert tok.pad_token_id == pad_id
    ids = tok("a photograph of fire hydrant", padding="max_length", max_length=tok.model_max_length).input_ids
    assert len(ids) == 77
    assert ids[:8] == PHOTO_IDS
    assert ids[8:] == [pad_id] * (77 - 8)


def test_multi_token_class_names_span_all_their_sub_words(tokenizers: dict) -> None:
    tok = tokenizers["sd21"]
    assert tok.convert_ids_to_tokens(tok("fire hydrant", add_special_tokens=False).input_ids) == [
        "fire</w>", "hydr", "ant</w>"]
    assert tok("scratch", add_special_tokens=False).input_ids == [13258]
    assert tok("Rust", add_special_tokens=False).input_ids == [14212]  # lower-cased like CLIP


def test_unknown_family_is_refused(clip_vocab: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="sd15"):
        write_clip_tokenizer(tmp_path, "sdxl", clip_vocab)


def test_a_file_that_is_not_the_bpe_vocabulary_is_refused(tmp_path: Path) -> None:
    bad = tmp_path / VOCAB_NAME
    bad.write_bytes(gzip.compress(b"#header\na b\n"))
    with pytest.raises(ModelLoadError, match="ISEG_CLIP_VOCAB"):
        write_clip_tokenizer(tmp_path / "tok", "sd15", bad)


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No vocabulary configured anywhere; HOME points at an empty folder."""
    for name in ("ISEG_CLIP_VOCAB", "ISEG_CACHE_DIR", "XDG_CACHE_HOME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    return tmp_path


def test_explicit_path_wins(clean_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    explicit = clean_env / "mine.txt.gz"
    explicit.write_bytes(b"x")
    cached = clean_env / "home" / ".cache" / "iseg" / "clip" / VOCAB_NAME
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"y")
    monkeypatch.setenv("ISEG_CLIP_VOCAB", str(explicit))
    assert locate_vocab() == explicit
    monkeypatch.setenv("ISEG_CLIP_VOCAB", str(clean_env / "missing.gz"))
    with pytest.raises(ModelLoadError, match="ISEG_CLIP_VOCAB"):
        locate_vocab()


def test_cache_dir_order(clean_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home = clean_env / "home" / ".cache" / "iseg"
    assert clip_vocab.cache_dir() == home
    monkeypatch.setenv("XDG_CACHE_HOME", str(clean_env / "xdg"))
    assert clip_vocab.cache_dir() == clean_env / "xdg" / "iseg"
    monkeypatch.setenv("ISEG_CACHE_DIR", str(clean_env / "own"))
    assert clip_vocab.cache_dir() == clean_env / "own"
    target = clean_env / "own" / "clip" / VOCAB_NAME
    target.parent.mkdir(parents=True)
    target.write_bytes(b"cached")
    assert locate_vocab() == target


def _fake_pip(payload: bytes, returncode: int = 0):
    """A stand-in for `pip download` that drops a wheel holding `payload` as the vocabulary."""
    def run(cmd: list[str], **_kwargs) -> subprocess.CompletedProcess:
        assert cmd[1:4] == ["-m", "pip", "download"] and "--no-deps" in cmd
        if returncode == 0:
            dest = Path(cmd[cmd.index("-d") + 1])
            buf = io.BytesIO()
            with zipfile.ZipFile(buf, "w") as wheel:
                wheel.writestr(WHEEL_MEMBER, payload)
                wheel.writestr("open_clip/other.py", b"")
            (dest / "open_clip_torch-3.3.0-py3-none-any.whl").write_bytes(buf.getvalue())
        return subprocess.CompletedProcess(cmd, returncode, "", "" if returncode == 0 else "ERROR: no network")
    return run


def test_fetch_extracts_only_the_vocabulary_into_the_cache(clean_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ISEG_CACHE_DIR", str(clean_env / "cache"))
    monkeypatch.setattr(clip_vocab.subprocess, "run", _fake_pip(b"the vocabulary"))
    lines: list[str] = []
    path = locate_vocab(progress=lines.append)
    assert path == clean_env / "cache" / "clip" / VOCAB_NAME
    assert path.read_bytes() == b"the vocabulary"
    assert sorted(p.name for p in path.parent.iterdir()) == [VOCAB_NAME]  # no temp file left
    assert any("PyPI" in line for line in lines)


def test_fetch_failure_says_how_to_provide_the_file(clean_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ISEG_CACHE_DIR", str(clean_env / "cache"))
    monkeypatch.setattr(clip_vocab.subprocess, "run", _fake_pip(b"", returncode=1))
    with pytest.raises(ModelLoadError) as err:
        locate_vocab(progress=lambda _line: None)
    message = str(err.value)
    assert "\n" not in message and "ISEG_CLIP_VOCAB" in message and "no network" in message
    assert not (clean_env / "cache" / "clip" / VOCAB_NAME).exists()
