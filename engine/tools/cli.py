"""Engine subcommands of `iseg`: segment, eval, bench, make-tiny-model.

`register(subparsers)` adds them to the product's parser (daemon.cli); each sets
`args.func(args) -> exit code`. Method options default to None so that a YAML
`--config` can set them and the command line still wins.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from engine.backends.onnx_format import EXPORT_DTYPES
from engine.errors import InputError, SettingsError
from engine.settings import DTYPE_NAMES, IsegSettings, parse_self_heads


SETTING_OPTIONS = ("size", "timestep", "seed", "enhance", "ent", "iters", "cluster", "self_heads", "background", "bg_context")
RUN_OPTIONS = ("model", "device", "dtype", "classes", "out", "save_maps", "batch_size", "cache_dir", "backend", "onnx_dir",
               "compile", "cuda_graphs", "max_image_pixels")


def _add_method_options(parser: argparse.ArgumentParser, backends: tuple[str, ...] = ("torch", "onnx")) -> None:
    group = parser.add_argument_group("method (defaults and meaning: docs/method.md)")
    group.add_argument("--size", type=int, help="square input size the frame is resized to (multiple of 64; 512)")
    group.add_argument("--timestep", type=int, help="diffusion timestep t of the single UNet pass (100)")
    group.add_argument("--seed", type=int, help="seed of the fixed noise (1101)")
    group.add_argument("--enhance", type=float, help="Cat-Cross factor on class tokens (1.6)")
    group.add_argument("--ent", type=float, help="Ent-Self entropy step (0.1)")
    group.add_argument("--iters", type=int, help="refinement iterations (10)")
    group.add_argument("--cluster", dest="cluster", action="store_true", default=None, help="KL k-means smoothing (default on)")
    group.add_argument("--no-cluster", dest="cluster", action="store_false", help="skip the KL k-means smoothing")
    group.add_argument("--self-heads", dest="self_heads", help="self-attention heads: all | auto | 1,2 (auto)")
    group.add_argument("--background", help="threshold:0.45 | power (threshold:0.45)")
    group.add_argument("--bg-context", dest="bg_context", help="background words appended to the prompt")
    parser.add_argument("--model", help="local diffusers Stable Diffusion folder")
    parser.add_argument("--device", help="cpu | cuda | cuda:N (cpu)")
    parser.add_argument("--dtype", choices=DTYPE_NAMES, help="weights dtype (float32)")
    parser.add_argument("--batch-size", dest="batch_size", type=int, help="frames per UNet batch (4)")
    parser.add_argument("--cache-dir", dest="cache_dir", help="text-embedding cache folder (~/.cache/iseg)")
    parser.add_argument("--backend", choices=backends, help="torch, or onnx for a graph from `iseg export-onnx` (torch)")
    parser.add_argument("--onnx-dir", dest="onnx_dir", help="folder written by `iseg export-onnx` (for --backend onnx)")
    parser.add_argument("--compile", action="store_true", default=None,
                        help="torch.compile the convolution/feed-forward blocks (static shapes; first batch compiles)")
    parser.add_argument("--cuda-graphs", dest="cuda_graphs", action="store_true", default=None,
                        help="replay the VAE encode and UNet forward from CUDA graphs captured per batch size "
                             "(CUDA, torch backend; batches padded to 1, 2, 4, … up to --batch-size)")
    parser.add_argument("--max-image-pixels", dest="max_image_pixels", type=int,
                        help="refuse images whose header declares more pixels (100000000), before decoding")
    parser.add_argument("--config", help="YAML file with the same keys as these options")


def _load_config(path: str | None) -> dict[str, Any]:
    if not path:
        return {}
    try:
        with open(path) as handle:
            data = yaml.safe_load(handle) or {}
    except OSError as error:
        raise SettingsError(f"--config: cannot read {path} ({error.strerror})") from None
    except yaml.YAMLError as error:
        raise SettingsError(f"--config: {path} is not valid YAML ({str(error).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise SettingsError(f"--config: {path} must hold a mapping of option: value")
    config = {str(key).replace("-", "_"): value for key, value in data.items()}
    known = set(SETTING_OPTIONS) | set(RUN_OPTIONS)
    for key, value in config.items():
        if key not in known:
            raise SettingsError(f"{path}: {key}: unknown key (known: {', '.join(sorted(known))})")
        if isinstance(value, dict) or isinstance(value, list) and any(isinstance(v, (list, dict)) for v in value):
            raise SettingsError(f"{path}: {key}: must be a value or a list of values, not a nested structure")
    return config


def resolve_options(args: argparse.Namespace) -> tuple[IsegSettings, dict[str, Any]]:
    """Settings and run options: config file first, then whatever the command line gave."""
    config = _load_config(getattr(args, "config", None))
    merged = dict(config)
    for key in SETTING_OPTIONS + RUN_OPTIONS:
        value = getattr(args, key, None)
        if value is not None:
            merged[key] = value
    if isinstance(merged.get("self_heads"), str):
        merged["self_heads"] = parse_self_heads(merged["self_heads"])
    if isinstance(merged.get("self_heads"), int):
        merged["self_heads"] = (merged["self_heads"],)
    settings = IsegSettings.from_mapping({k: merged[k] for k in SETTING_OPTIONS if k in merged}, where="settings")
    run = {k: merged.get(k) for k in RUN_OPTIONS}
    run["device"] = run["device"] or "cpu"
    run["dtype"] = run["dtype"] or "float32"
    run["batch_size"] = int(run["batch_size"] or 4)
    if run["batch_size"] < 1:
        raise SettingsError(f"--batch-size: {run['batch_size']} must be >= 1")
    from engine.tools.image_io import DEFAULT_MAX_IMAGE_PIXELS

    run["max_image_pixels"] = int(run["max_image_pixels"] or DEFAULT_MAX_IMAGE_PIXELS)
    if run["max_image_pixels"] < 1:
        raise SettingsError(f"--max-image-pixels: {run['max_image_pixels']} must be >= 1")
    if not run["model"]:
        raise SettingsError("--model: give a local diffusers Stable Diffusion folder (or `model:` in --config)")
    return settings, run


def default_cache_dir() -> Path:
    """~/.cache/iseg unless ISEG_CACHE_DIR or XDG_CACHE_HOME say otherwise."""
    if os.environ.get("ISEG_CACHE_DIR"):
        return Path(os.environ["ISEG_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "iseg"


def _parse_classes(value: Any) -> tuple[str, ...]:
    if isinstance(value, (list, tuple)):
        return tuple(str(v) for v in value)
    if not value:
        raise InputError("--classes: give the class names, comma-separated, e.g. --classes scratch,dent "
                         "(or a region prompt: --point X,Y, --box X0,Y0,X1,Y1 or --scribble \"X,Y;X,Y\")")
    return tuple(part for part in str(value).split(","))


def _load_segmenter(settings: IsegSettings, run: dict[str, Any], max_batch: int | None = None):
    from engine.segmenter import Segmenter
    cache_dir = Path(run["cache_dir"]) if run["cache_dir"] else default_cache_dir()
    return Segmenter.load(run["model"], device=run["device"], dtype=run["dtype"], settings=settings, cache_dir=cache_dir,
                          backend=run["backend"] or "torch", onnx_dir=Path(run["onnx_dir"]) if run["onnx_dir"] else None,
                          compile_blocks=bool(run["compile"]), cuda_graphs=bool(run["cuda_graphs"]),
                          max_batch=max_batch or run["batch_size"])


def _coordinates(text: str, count: int | None, option: str, example: str) -> list[float]:
    try:
        values = [float(part) for part in text.split(",")]
    except ValueError:
        values = []
    if not values or (count is not None and len(values) != count):
        raise InputError(f"{option}: {text!r} must be {example}")
    return values


def parse_prompt(args: argparse.Namespace) -> dict[str, Any] | None:
    """The point / box / scribble of `iseg segment`, as Segmenter.segment_prompt takes it (None: class mode)."""
    given = [name for name in ("point", "box", "scribble") if getattr(args, name, None)]
    if not given:
        return None
    if len(given) > 1:
        raise InputError(f"--{given[0]} and --{given[1]}: give one kind of prompt (points, a box or a scribble)")
    if getattr(args, "classes", None):
        raise InputError(f"--classes and --{given[0]}: segment either classes or a prompted region, not both")
    if args.point:
        return {"points": [tuple(_coordinates(text, 2, "--point", "X,Y in pixels, e.g. 120,80")) for text in args.point]}
    if args.box:
        return {"box": tuple(_coordinates(args.box, 4, "--box", "X0,Y0,X1,Y1 in pixels, e.g. 40,30,200,160"))}
    points = [part for part in args.scribble.split(";") if part.strip()]
    if not points:
        raise InputError(f"--scribble: {args.scribble!r} must be points X,Y;X,Y;… in pixels, e.g. \"10,20;15,25\"")
    return {"scribble": [tuple(_coordinates(text, 2, "--scribble", "points X,Y;X,Y;… in pixels, e.g. \"10,20;15,25\""))
                         for text in points]}


def _segment_prompted(args: argparse.Namespace, prompt: dict[str, Any]) -> int:
    """Point / box / scribble mode: one selected region per image (mask 1 = selected)."""
    import time

    from engine.tools.image_io import read_image, write_png
    from engine.tools.overlay import overlay

    settings, run = resolve_options(args)
    out_dir = Path(run["out"] or "out")
    out_dir.mkdir(parents=True, exist_ok=True)
    segmenter = _load_segmenter(settings, run)
    failures = 0
    for name in args.images:
        path = Path(name)
        try:
            image = read_image(path)
            started = time.perf_counter()
            mask, refined = segmenter.segment_prompt(image, **prompt)
        except InputError as error:
            failures += 1
            print(f"error: {path}: {error}", file=sys.stderr)
            continue
        elapsed_ms = (time.perf_counter() - started) * 1000
        stem = out_dir / path.stem
        write_png(stem.with_name(path.stem + ".mask.png"), mask)
        write_png(stem.with_name(path.stem + ".overlay.png"), overlay(image, mask))
        kind, value = next(iter(prompt.items()))
        record = {"image": str(path), "size": [int(image.shape[1]), int(image.shape[0])], "prompt": kind,
                  kind: [list(v) for v in value] if kind != "box" else list(value),
                  "area": float(mask.mean()), "timings_ms": {"total_ms": round(elapsed_ms, 3)}}
        stem.with_name(path.stem + ".json").write_text(json.dumps(record, indent=2) + "\n")
        if run["save_maps"]:
            np.save(stem.with_name(path.stem + ".maps.npy"), refined[None].astype(np.float32))
        print(f"{path} -> {stem}.mask.png, .overlay.png, .json" + (", .maps.npy" if run["save_maps"] else "")
              + f"  ({elapsed_ms:.0f} ms)")
    print(f"segmented {len(args.images) - failures} of {len(args.images)} images into {out_dir}/")
    return 0 if failures == 0 else 1


def cmd_segment(args: argparse.Namespace) -> int:
    """Segment image files and write mask, overlay, JSON (and maps) per image."""
    prompt = parse_prompt(args)
    if prompt is not None:
        return _segment_prompted(args, prompt)
    from engine.tools.image_io import read_image, write_png
    from engine.tools.overlay import overlay
    from engine.method.preprocess import check_frame
    from engine.results import ClassSet

    settings, run = resolve_options(args)
    class_set = ClassSet(_parse_classes(run["classes"]), settings.bg_context)
    out_dir = Path(run["out"] or "out")
    out_dir.mkdir(parents=True, exist_ok=True)
    segmenter = _load_segmenter(settings, run)
    segmenter.prepare(class_set)
    failures = 0
    pending: list[tuple[Path, np.ndarray]] = []

    def flush() -> None:
        if not pending:
            return
        results = segmenter.segment([image for _, image in pending], class_set, keep_maps=bool(run["save_maps"]))
        for (path, image), result in zip(pending, results):
            stem = out_dir / path.stem
            write_png(stem.with_name(path.stem + ".mask.png"), result.labels)
            write_png(stem.with_name(path.stem + ".overlay.png"), overlay(image, result.labels))
            record = {"image": str(path), "size": [int(image.shape[1]), int(image.shape[0])],
                      "classes": list(result.classes), "presence": result.presence_by_class(),
                      "area": {name: float((result.labels == k + 1).mean()) for k, name in enumerate(result.classes)},
                      "timings_ms": {k: round(v, 3) for k, v in result.timings_ms.items()}}
            stem.with_name(path.stem + ".json").write_text(json.dumps(record, indent=2) + "\n")
            if run["save_maps"]:
                np.save(stem.with_name(path.stem + ".maps.npy"), result.maps.astype(np.float32))
            print(f"{path} -> {stem}.mask.png, .overlay.png, .json"
                  + (", .maps.npy" if run["save_maps"] else "") + f"  ({result.timings_ms['total_ms']:.0f} ms)")
        pending.clear()

    for name in args.images:
        path = Path(name)
        try:
            image = read_image(path, run["max_image_pixels"])
            check_frame(image, str(path))
        except InputError as error:
            failures += 1
            print(f"error: {error}", file=sys.stderr)
            continue
        pending.append((path, image))
        if len(pending) >= run["batch_size"]:
            flush()
    flush()
    done = len(args.images) - failures
    print(f"segmented {done} of {len(args.images)} images into {out_dir}/")
    return 0 if failures == 0 else 1


def cmd_eval(args: argparse.Namespace) -> int:
    """mIoU on a folder of images/, masks/ and classes.txt (pseudo-mask protocol)."""
    from engine.tools.evaluate import evaluate, format_table

    settings, run = resolve_options(args)
    segmenter = _load_segmenter(settings, run)
    report = evaluate(segmenter, Path(args.data), batch_size=run["batch_size"], progress=not args.quiet,
                      max_pixels=run["max_image_pixels"])
    print(format_table(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    """Per-stage timings, frames/s, memory and MFU; torch and/or ONNX; fast path against naive."""
    from engine.tools.bench import run_bench
    from engine.segmenter import Segmenter

    if args.full_size:
        from engine.tools.full_size import build_full_size_model
        args.model = str(build_full_size_model(default_cache_dir() / f"full-size-{args.family}", family=args.family))
    settings, run = resolve_options(args)
    names = ("torch", "onnx") if run["backend"] == "both" else (run["backend"] or "torch",)
    torch_segmenter = _load_segmenter(settings, dict(run, backend="torch"), max_batch=max(args.batch))
    segmenters = {}
    for name in names:
        if name == "torch":
            segmenters[name] = torch_segmenter
        else:
            from engine.backends.onnx_backend import onnx_backend_factory
            from engine.backends.onnx_export import export_onnx
            heads = "-".join(map(str, torch_segmenter.torch_backend.self_heads or ["all"]))
            onnx_dir = Path(run["onnx_dir"]) if run["onnx_dir"] else (
                default_cache_dir() / "onnx" / f"{torch_segmenter.fingerprint}-{settings.size}-h{heads}")
            if not (onnx_dir / "manifest.json").is_file():
                export_onnx(run["model"], onnx_dir, size=settings.size, self_heads=settings.self_heads,
                            device=run["device"], dtype=run["dtype"])
            segmenters[name] = Segmenter(torch_segmenter.model, settings, torch_segmenter.text_cache_dir,
                                         backend=onnx_backend_factory(onnx_dir))
    report = run_bench(segmenters, frames=args.frames, batches=tuple(args.batch), naive=not args.no_naive)
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
        print(f"wrote {args.json}", file=sys.stderr)
    return 0


def cmd_export_onnx(args: argparse.Namespace) -> int:
    """Both ONNX graphs and their manifest for one model, size and head selection."""
    from engine.backends.onnx_export import export_onnx

    export_onnx(args.model, args.out, size=args.size, opset=args.opset,
                self_heads=parse_self_heads(args.self_heads), device=args.device, dtype=args.dtype)
    return 0


def cmd_make_tiny_model(args: argparse.Namespace) -> int:
    """Build a tiny random-weight SD-topology model folder (tests and the demo use it)."""
    from engine.tools.tiny_model import build_tiny_model

    report = build_tiny_model(Path(args.dir), family=args.family, seed=args.seed)
    print(json.dumps(report, indent=2))
    return 0


def register(subparsers: Any) -> None:
    """Add the engine's subcommands to the product's argparse subparsers."""
    segment = subparsers.add_parser("segment", help="segment image files with iSeg")
    segment.add_argument("images", nargs="+", help="image files (PNG, JPEG, …; gray/RGBA/16-bit accepted)")
    segment.add_argument("--classes", help="comma-separated class names, e.g. scratch,dent")
    prompts = segment.add_argument_group("prompted region instead of classes (one kind; mask: 1 = selected)")
    prompts.add_argument("--point", action="append", metavar="X,Y",
                         help="a pixel on the object; repeat for more points (each refined, then averaged)")
    prompts.add_argument("--box", metavar="X0,Y0,X1,Y1", help="a box around the object, in pixels")
    prompts.add_argument("--scribble", metavar="X,Y;X,Y;…", help="points along a stroke over the object, in pixels")
    segment.add_argument("--out", help="output folder (out)")
    segment.add_argument("--save-maps", dest="save_maps", action="store_true", default=None,
                         help="also write <stem>.maps.npy, float32 [K,H,W]")
    _add_method_options(segment)
    segment.set_defaults(func=cmd_segment)

    evaluate = subparsers.add_parser("eval", help="mIoU on images/, masks/, classes.txt")
    evaluate.add_argument("--data", required=True, help="folder with images/, masks/ (indexed PNG, 255 = ignore), classes.txt")
    evaluate.add_argument("--json", help="write the report as JSON here")
    evaluate.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_method_options(evaluate)
    evaluate.set_defaults(func=cmd_eval)

    bench = subparsers.add_parser("bench", help="benchmark the engine (JSON)")
    bench.add_argument("--json", help="write the JSON report here")
    bench.add_argument("--frames", type=int, default=8, help="frames per measurement (8)")
    bench.add_argument("--batch", type=int, nargs="+", default=[1, 4], help="batch sizes (1 4)")
    bench.add_argument("--no-naive", action="store_true", help="skip the naive capture-everything path")
    bench.add_argument("--full-size", action="store_true",
                       help="benchmark a full-width SD topology with random weights (built once in the cache dir)")
    bench.add_argument("--family", choices=("sd21", "sd15"), default="sd21", help="topology for --full-size (sd21)")
    _add_method_options(bench, backends=("torch", "onnx", "both"))
    bench.set_defaults(func=cmd_bench)

    tiny = subparsers.add_parser("make-tiny-model", help="build a tiny random-weight SD model folder")
    tiny.add_argument("dir", help="output folder")
    tiny.add_argument("--family", choices=("sd15", "sd21"), default="sd21")
    tiny.add_argument("--seed", type=int, default=0)
    tiny.set_defaults(func=cmd_make_tiny_model)

    export = subparsers.add_parser("export-onnx", help="export the VAE encoder and the attention graph for --backend onnx")
    export.add_argument("--model", required=True, help="local diffusers Stable Diffusion folder")
    export.add_argument("--out", required=True, help="folder to write the graphs and manifest.json to")
    export.add_argument("--size", type=int, default=512, help="square input size the engine runs at (512)")
    export.add_argument("--self-heads", dest="self_heads", default="auto",
                        help="self-attention heads: all | auto | 1,2 (auto); must match the engine's setting")
    export.add_argument("--opset", type=int, default=17, help="ONNX opset (17)")
    export.add_argument("--device", default="cpu", help="device to trace on: cpu | cuda | cuda:N (cpu)")
    export.add_argument("--dtype", choices=EXPORT_DTYPES, default="float32",
                        help="weights dtype; the engine must load the model with the same one (float32)")
    export.set_defaults(func=cmd_export_onnx)
