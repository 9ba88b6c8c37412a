"""Cat-Cross text embeddings, computed once per class set and kept in memory and on disk.

The embedding depends only on (text encoder + tokenizer, prompt template, classes,
background context, enhance factor, dtype), so the daemon computes it at start-up and
every frame reuses it. The disk copy (safetensors) is keyed by a hash of all of these;
a changed model has another fingerprint and therefore misses.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from engine.method.prompt import PROMPT_TEMPLATE, tokenize_prompt
from engine.results import ClassSet


@dataclass(frozen=True)
class TextEntry:
    """A class set's enhanced embedding [T, D] and its class token spans."""

    embedding: torch.Tensor
    spans: list[list[int]]
    prompt: str


class TextEmbeddingCache:
    """Memory + disk cache of Cat-Cross embeddings; counts hits so tests and stats can see them."""

    def __init__(self, encode: Callable[[list[int]], torch.Tensor], tokenizer: Any, fingerprint: str,
                 enhance: float, cache_dir: Path | None, device: torch.device | None = None) -> None:
        self._encode = encode
        self._tokenizer = tokenizer
        self._fingerprint = fingerprint
        self._enhance = float(enhance)
        self._device = device
        self._dir = Path(cache_dir) / "text" if cache_dir is not None else None
        self._memory: dict[ClassSet, TextEntry] = {}
        self.stats = {"memory_hits": 0, "disk_hits": 0, "misses": 0}

    def key(self, class_set: ClassSet) -> str:
        """Hash of everything the embedding depends on."""
        material = json.dumps({
            "model": self._fingerprint,
            "template": PROMPT_TEMPLATE,
            "classes": list(class_set.classes),
            "bg_context": class_set.bg_context,
            "enhance": self._enhance,
        }, sort_keys=True)
        return hashlib.sha256(material.encode()).hexdigest()[:32]

    def get(self, class_set: ClassSet) -> TextEntry:
        """The entry for a class set: from memory, else disk, else computed and stored."""
        entry = self._memory.get(class_set)
        if entry is not None:
            self.stats["memory_hits"] += 1
            return entry
        entry = self._load(class_set)
        if entry is not None:
            self.stats["disk_hits"] += 1
        else:
            self.stats["misses"] += 1
            entry = self._compute(class_set)
            self._store(class_set, entry)
        self._memory[class_set] = entry
        return entry

    def _compute(self, class_set: ClassSet) -> TextEntry:
        tokens = tokenize_prompt(self._tokenizer, class_set)
        embedding = self._encode(tokens.input_ids).clone()
        positions = sorted({p for span in tokens.spans for p in span})
        embedding[positions] = embedding[positions] * self._enhance
        return TextEntry(embedding=embedding, spans=tokens.spans, prompt=tokens.text)

    def _path(self, class_set: ClassSet) -> Path | None:
        return self._dir / f"{self.key(class_set)}.safetensors" if self._dir is not None else None

    def _load(self, class_set: ClassSet) -> TextEntry | None:
        path = self._path(class_set)
        if path is None or not path.exists():
            return None
        try:
            with safe_open(str(path), framework="pt") as handle:
                meta = handle.metadata()
                embedding = handle.get_tensor("embedding")
            spans = json.loads(meta["spans"])
        except (OSError, ValueError, KeyError, TypeError, SafetensorError):
            return None
        if self._device is not None:
            embedding = embedding.to(self._device)
        return TextEntry(embedding=embedding, spans=spans, prompt=meta["prompt"])

    def _store(self, class_set: ClassSet, entry: TextEntry) -> None:
        path = self._path(class_set)
        if path is None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {"spans": json.dumps(entry.spans), "prompt": entry.prompt,
                "classes": json.dumps(list(class_set.classes)), "model": self._fingerprint}
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        os.close(fd)
        try:
            save_file({"embedding": entry.embedding.detach().cpu().contiguous()}, tmp, metadata=meta)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
