"""Makes sure the configured model folder exists before a worker loads it, and that
every camera's prompt fits its tokenizer.

The demo config points at a tiny random-weight model that is built on first run; a
file lock keeps two workers from building it at once, and the folder appears by
rename only when complete, so a crash mid-build never leaves a half model behind.
A folder that is there but is not a model is never replaced: it may be someone's data.
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

from daemon.config import ConfigError, DaemonConfig
from engine import InputError, ModelLoadError

log = logging.getLogger("iseg.model")


def ensure_model(config: DaemonConfig) -> Path:
    """The model folder; built (tiny, random weights) when missing and the config allows it."""
    path = config.model_path
    if (path / "model_index.json").is_file() or not config.engine.build_tiny_if_missing:
        if not path.exists():
            raise ModelLoadError(f"engine.model_dir: {path} does not exist (the engine loads only local folders; "
                                 "set build_tiny_if_missing: true for the demo model)")
        return path
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise ModelLoadError(f"engine.model_dir: {path} exists but holds no model_index.json; build_tiny_if_missing "
                             "builds only into a missing or empty folder (move it away, or point model_dir elsewhere)")
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.parent / f".{path.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (path / "model_index.json").is_file():
            return path
        from engine import build_tiny_model

        building = path.parent / f".{path.name}.building-{os.getpid()}"
        shutil.rmtree(building, ignore_errors=True)
        log.info("building the tiny demo model (random weights) in %s; this takes about a minute once", path)
        build_tiny_model(building, family="sd21", seed=0, progress=lambda line: log.info("%s", line))
        if path.exists():
            path.rmdir()
        os.rename(building, path)
    return path


def load_segmenter(config: DaemonConfig, log: logging.Logger) -> tuple[Any, dict[str, Any]]:
    """Load the model and cache every camera's text embedding; returns (segmenter, class set per camera)."""
    from engine import ClassSet, Segmenter

    if config.worker.torch_threads:
        import torch

        torch.set_num_threads(config.worker.torch_threads)
    model_dir = ensure_model(config)
    started = time.monotonic()
    engine = config.engine
    segmenter = Segmenter.load(model_dir, device=engine.device, dtype=engine.dtype, settings=engine.settings,
                               cache_dir=config.state_path / "embeddings", backend=engine.backend,
                               onnx_dir=config.onnx_path, compile_blocks=engine.compile,
                               cuda_graphs=engine.cuda_graphs, max_batch=config.worker.batch_size)
    class_sets = {}
    for i, camera in enumerate(config.cameras):
        try:
            class_sets[camera.id] = ClassSet(camera.classes, camera.bg_context)
            segmenter.prepare(class_sets[camera.id])
        except InputError as err:
            raise InputError(f"cameras[{i}] ({camera.id}): {err}") from None
    log.info("model %s loaded on %s/%s (backend %s%s%s), %d class set(s) cached in %.1fs", model_dir, engine.device,
             engine.dtype, engine.backend, ", compiled" if engine.compile else "",
             ", CUDA graphs" if engine.cuda_graphs else "", len(class_sets), time.monotonic() - started)
    if engine.cuda_graphs or engine.compile:
        seconds = segmenter.warm_up(next(iter(class_sets.values())))
        log.info("warmed up batch sizes %s in %.1fs (graph capture / compilation done before the first frame)",
                 ",".join(map(str, seconds)), sum(seconds.values()))
    return segmenter, class_sets


def check_prompts(config: DaemonConfig) -> bool:
    """Each camera's prompt must fit the model's tokenizer (75 tokens for CLIP), or the worker
    could not start; only the tokenizer is loaded (a second, no weights). False when the model
    folder has no tokenizer yet (nothing to check against)."""
    folder = config.model_path / "tokenizer"
    if not folder.is_dir():
        return False
    from transformers import CLIPTokenizer
    from transformers.utils import logging as transformers_logging

    from engine import ClassSet, tokenize_prompt

    try:
        tokenizer = CLIPTokenizer.from_pretrained(config.model_path, subfolder="tokenizer", local_files_only=True)
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"engine.model_dir: the tokenizer in {folder} cannot be loaded "
                             f"({str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__})") from None
    verbosity = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()  # its "sequence longer than 77" warning would be a second line
    try:
        for i, camera in enumerate(config.cameras):
            try:
                tokenize_prompt(tokenizer, ClassSet(camera.classes, camera.bg_context))
            except InputError as err:
                message = str(err)
                key_named = message.split(":", 1)[0] in ("classes", "bg_context")
                raise ConfigError(f"cameras[{i}].{message}" if key_named else f"cameras[{i}].classes: {message}") from None
    finally:
        transformers_logging.set_verbosity(verbosity)
    return True
