"""Test sets of the industrial anomaly-detection benchmarks, read from their published layouts.

MVTec AD: `<category>/test/<defect_type>/*.png`, `<category>/test/good/*.png` and
`<category>/ground_truth/<defect_type>/<stem>_mask.png`. VisA: `split_csv/1cls.csv` with the
columns object, split, label, image, mask (paths relative to the data folder; label
`normal` or `anomaly`). `--data` may be the dataset root (every category) or, for MVTec, one
category's folder. Masks are binary: any non-zero pixel is defect.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from engine.errors import InputError
from engine.tools.image_io import DEFAULT_MAX_IMAGE_PIXELS, check_image_size

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
GOOD = "good"
VISA_CSV = Path("split_csv") / "1cls.csv"
VISA_DEFAULT_CLASSES = ("defect",)
"""VisA's split file names no defect types, so its default prompt is this generic word."""


@dataclass(frozen=True)
class Sample:
    """One test image: its category, defect type (`good` for a defect-free part) and files."""

    category: str
    defect: str
    image: Path
    mask: Path | None

    @property
    def defective(self) -> bool:
        return self.defect != GOOD

    @property
    def key(self) -> str:
        """A file-name-safe id, unique within its category (defect type + image stem)."""
        return f"{self.defect}__{self.image.stem}"


def _mvtec_category(folder: Path) -> list[Sample]:
    test = folder / "test"
    samples = []
    for defect_dir in sorted(p for p in test.iterdir() if p.is_dir()):
        for image in sorted(p for p in defect_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
            mask = None
            if defect_dir.name != GOOD:
                mask = folder / "ground_truth" / defect_dir.name / f"{image.stem}_mask.png"
                if not mask.is_file():
                    raise InputError(f"{image}: no ground-truth mask {mask} (MVTec layout: "
                                     f"<category>/ground_truth/<defect_type>/<stem>_mask.png)")
            samples.append(Sample(folder.name, defect_dir.name, image, mask))
    return samples


def read_mvtec(root: Path, category: str | None = None) -> dict[str, list[Sample]]:
    """Test samples per category of an MVTec AD folder (the root or one category's folder)."""
    if (root / "test").is_dir():
        folders = [root]
    else:
        folders = sorted(p for p in root.iterdir() if (p / "test").is_dir()) if root.is_dir() else []
    if not folders:
        raise InputError(f"--data: {root} is not in MVTec AD layout (<category>/test/<defect_type>/*.png "
                         "and <category>/ground_truth/<defect_type>/*_mask.png)")
    if category is not None:
        folders = [f for f in folders if f.name == category]
        if not folders:
            known = [p.name for p in sorted(root.iterdir()) if (p / "test").is_dir()] or [root.name]
            raise InputError(f"--category: {category!r} is not in {root} (known: {', '.join(known)})")
    categories = {f.name: _mvtec_category(f) for f in folders}
    for name, samples in categories.items():
        if not samples:
            raise InputError(f"--data: {root / name / 'test'} holds no images")
    return categories


def read_visa(root: Path, category: str | None = None) -> dict[str, list[Sample]]:
    """Test samples per object of a VisA folder, from its split CSV (split == test)."""
    table = root / VISA_CSV
    if not table.is_file():
        raise InputError(f"--data: {root} has no {VISA_CSV} (VisA layout: columns object,split,label,image,mask)")
    categories: dict[str, list[Sample]] = {}
    with table.open(newline="") as handle:
        reader = csv.DictReader(handle)
        missing = {"object", "split", "label", "image", "mask"} - set(reader.fieldnames or ())
        if missing:
            raise InputError(f"{table}: missing column(s) {', '.join(sorted(missing))} "
                             "(needs object,split,label,image,mask)")
        for line, row in enumerate(reader, 2):
            if row["split"].strip() != "test":
                continue
            label = row["label"].strip()
            if label not in ("normal", "anomaly"):
                raise InputError(f"{table}:{line}: label {label!r} must be normal or anomaly")
            image = root / row["image"].strip()
            mask = root / row["mask"].strip() if label == "anomaly" and row["mask"].strip() else None
            if not image.is_file():
                raise InputError(f"{table}:{line}: image {image} does not exist")
            if label == "anomaly" and (mask is None or not mask.is_file()):
                raise InputError(f"{table}:{line}: anomaly image {image} has no mask file {mask}")
            name = row["object"].strip()
            categories.setdefault(name, []).append(Sample(name, GOOD if label == "normal" else "anomaly", image, mask))
    if category is not None:
        if category not in categories:
            raise InputError(f"--category: {category!r} is not in {table} (known: {', '.join(sorted(categories))})")
        categories = {category: categories[category]}
    if not categories:
        raise InputError(f"{table}: no rows with split = test")
    return dict(sorted(categories.items()))


def read_anomaly_dataset(root: Path, fmt: str, category: str | None = None) -> dict[str, list[Sample]]:
    """Samples per category for `--format mvtec|visa`."""
    if fmt == "mvtec":
        return read_mvtec(root, category)
    if fmt == "visa":
        return read_visa(root, category)
    raise InputError(f"--format: {fmt!r} has no anomaly layout; use mvtec or visa")


def default_classes(samples: list[Sample], fmt: str) -> tuple[str, ...]:
    """The prompt: defect-type folder names with underscores as spaces (VisA: a generic word)."""
    if fmt == "visa":
        return VISA_DEFAULT_CLASSES
    names = sorted({s.defect.replace("_", " ") for s in samples if s.defective})
    if not names:
        raise InputError(f"category {samples[0].category}: no defect-type folders to prompt; give --classes")
    return tuple(names)


def read_binary_mask(path: Path | None, shape: tuple[int, int],
                     max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> np.ndarray:
    """bool [H, W]: True where the mask is non-zero; all False for a good image (path None)."""
    if path is None:
        return np.zeros(shape, dtype=bool)
    check_image_size(path.read_bytes(), str(path), max_pixels)
    with Image.open(path) as image:
        mask = np.array(image.convert("L")) > 0
    return mask
