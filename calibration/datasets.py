"""Labelled image sets: MedMNIST-format ``.npz`` and class-per-folder image trees.

Both readers return an ``ImageSet``: uint8 RGB images (decoded lazily for
folders), integer labels and ordered class names. Nothing here imports torch;
pixels go to models only through ``hemaedge.edge.bundle.preprocess``.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from hemaedge.edge.errors import InputError, UsageError

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
SPLITS = ("train", "val", "test")

# Class names of the MedMNIST v2 2D sets, in label order (from the MedMNIST INFO table).
MEDMNIST_CLASSES: dict[str, tuple[str, ...]] = {
    "bloodmnist": (
        "basophil",
        "eosinophil",
        "erythroblast",
        "immature granulocyte",
        "lymphocyte",
        "monocyte",
        "neutrophil",
        "platelet",
    ),
    "pathmnist": (
        "adipose",
        "background",
        "debris",
        "lymphocytes",
        "mucus",
        "smooth muscle",
        "normal colon mucosa",
        "cancer-associated stroma",
        "colorectal adenocarcinoma epithelium",
    ),
    "dermamnist": (
        "actinic keratoses and intraepithelial carcinoma",
        "basal cell carcinoma",
        "benign keratosis-like lesions",
        "dermatofibroma",
        "melanoma",
        "melanocytic nevi",
        "vascular lesions",
    ),
    "octmnist": ("choroidal neovascularization", "diabetic macular edema", "drusen", "normal"),
    "pneumoniamnist": ("normal", "pneumonia"),
    "breastmnist": ("malignant", "normal, benign"),
    "retinamnist": ("0", "1", "2", "3", "4"),
}


@dataclass
class ImageSet:
    """A labelled set of RGB uint8 images.

    Attributes:
        name: Human name (file or folder plus split).
        classes: Ordered class names; ``labels`` index into it.
        labels: ``N`` int64 labels.
        array: ``N x H x W x 3`` uint8 when held in memory (npz), else None.
        paths: Image paths when read lazily (folders), else None.
        digest: sha256 identifying the source (file bytes / sorted file list + sizes).
    """

    name: str
    classes: tuple[str, ...]
    labels: np.ndarray
    array: np.ndarray | None = None
    paths: list[Path] | None = None
    digest: str = ""

    def __len__(self) -> int:
        return len(self.labels)

    def image(self, i: int) -> np.ndarray:
        """Image ``i`` as HxWx3 uint8 RGB."""
        if self.array is not None:
            return self.array[i]
        assert self.paths is not None
        return read_rgb(self.paths[i])

    def images(self, idx: Sequence[int] | np.ndarray) -> list[np.ndarray] | np.ndarray:
        """Several images (an array slice for npz sets, a list for folders)."""
        if self.array is not None:
            return self.array[np.asarray(idx)]
        return [self.image(int(i)) for i in idx]

    def subset(self, idx: Sequence[int] | np.ndarray) -> ImageSet:
        """A new ImageSet holding only ``idx``."""
        idx = np.asarray(idx, dtype=np.int64)
        return ImageSet(
            name=f"{self.name}[{len(idx)}]",
            classes=self.classes,
            labels=self.labels[idx],
            array=None if self.array is None else self.array[idx],
            paths=None if self.paths is None else [self.paths[i] for i in idx],
            digest=hashlib.sha256((self.digest + ",".join(map(str, idx.tolist()))).encode()).hexdigest(),
        )


def read_rgb(path: str | os.PathLike) -> np.ndarray:
    """Decode an image file to HxWx3 uint8 RGB.

    Raises:
        InputError: one line naming the file when it is missing or cannot be decoded.
    """
    import cv2

    data = np.fromfile(str(path), dtype=np.uint8) if Path(path).is_file() else None
    if data is None:
        raise InputError(f"image {path} does not exist")
    img = cv2.imdecode(data, cv2.IMREAD_COLOR) if data.size else None
    if img is None:
        raise InputError(f"image {path} is corrupt or not an image")
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def load_npz(path: str | os.PathLike, split: str, classes: Sequence[str] | None = None) -> ImageSet:
    """Read one split of a MedMNIST-format ``.npz`` (any size, any 2D set).

    Grey sets are repeated to 3 channels. Class names come from ``classes``,
    else the MedMNIST table matched by file name, else ``class_0..``.

    Raises:
        InputError: when the file or split is missing or malformed.
    """
    path = Path(path)
    if split not in SPLITS:
        raise UsageError(f"split must be one of {SPLITS}, not {split!r}")
    if not path.is_file():
        raise InputError(f"data set {path} does not exist")
    try:
        with np.load(path) as z:
            keys = set(z.files)
            if f"{split}_images" not in keys:
                have = sorted({k.rsplit("_", 1)[0] for k in keys if k.endswith("_images")})
                raise InputError(f"{path.name} has no '{split}' split (it has: {', '.join(have) or 'none'})")
            images = z[f"{split}_images"]
            labels = z[f"{split}_labels"]
    except (OSError, ValueError) as exc:
        raise InputError(f"{path} is not a readable .npz file ({exc})") from exc
    if labels.ndim == 2 and labels.shape[1] > 1:
        raise UsageError(f"{path.name} is multi-label (labels {labels.shape}); only single-label sets are supported")
    labels = labels.reshape(-1).astype(np.int64)
    if images.ndim == 3:
        images = np.repeat(images[..., None], 3, axis=3)
    if images.ndim != 4 or images.shape[3] != 3 or images.dtype != np.uint8:
        raise InputError(
            f"{path.name} {split}_images has shape {images.shape} {images.dtype}; expected N x H x W x 3 uint8"
        )
    n_cls = int(labels.max()) + 1 if len(labels) else 0
    if classes is None:
        stem = path.stem.lower()
        match = next(
            (v for k, v in MEDMNIST_CLASSES.items() if stem.startswith(k.replace("mnist", "")) or k in stem), None
        )
        classes = match if match and len(match) >= n_cls else tuple(f"class_{i}" for i in range(n_cls))
    return ImageSet(
        name=f"{path.name}:{split}",
        classes=tuple(classes),
        labels=labels,
        array=images,
        digest=_file_digest(path) + f":{split}",
    )


def _list_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTS and p.is_file())


def load_folder(root: str | os.PathLike, split: str | None = None, classes: Sequence[str] | None = None) -> ImageSet:
    """Read a class-per-folder tree (``root/[split/]<class>/*.png``).

    A folder of images with no class subfolders is read as one class
    ``unlabelled`` (what ``hemaedge collect`` writes; fine for calibration).

    Raises:
        InputError: when the folder is missing or holds no images.
    """
    root = Path(root)
    base = root / split if split and (root / split).is_dir() else root
    if split and base == root and any((root / s).is_dir() for s in SPLITS):
        raise InputError(f"{root} has no '{split}' split folder")
    if not base.is_dir():
        raise InputError(f"image folder {base} does not exist")
    subdirs = sorted(d for d in base.iterdir() if d.is_dir() and not d.name.startswith("."))
    found = [d.name for d in subdirs if _list_images(d)]
    if not found and _list_images(base):
        found, subdirs = ["unlabelled"], [base]
    if not found:
        raise InputError(f"no images found under {base}")
    names = tuple(classes) if classes else tuple(found)
    # folders match classes by name or by any spelling of the same class ("ig" is "immature_granulocyte")
    index = {d: _class_index(d, names) for d in found if d != "unlabelled"}
    unknown = [d for d, i in index.items() if i is None]
    if unknown:
        raise InputError(f"{base} has class folders {unknown} that are not in the class list {list(names)}")
    paths: list[Path] = []
    labels: list[int] = []
    h = hashlib.sha256()
    for d in subdirs:
        name = "unlabelled" if d == base else d.name
        if name not in index and name != "unlabelled":
            continue
        for p in _list_images(d):
            paths.append(p)
            labels.append(index[name] if name in index else -1)
            h.update(f"{name}/{p.name}:{p.stat().st_size};".encode())
    return ImageSet(
        name=f"{root.name}:{split or 'all'}",
        classes=names,
        labels=np.asarray(labels, np.int64),
        paths=paths,
        digest=h.hexdigest(),
    )


def _class_index(folder: str, names: Sequence[str]) -> int | None:
    """The index of the class a folder holds: the same name, else the same class under another spelling."""
    from hemaedge.edge.bundle.vocabulary import same_class

    if folder in names:
        return names.index(folder)
    return next((i for i, n in enumerate(names) if same_class(folder, n)), None)


def open_dataset(
    path: str | os.PathLike, split: str | None = "train", classes: Sequence[str] | None = None
) -> ImageSet:
    """Open an ``.npz`` or an image-folder tree, choosing the reader by what ``path`` is."""
    p = Path(path)
    if p.suffix.lower() == ".npz":
        return load_npz(p, split or "train", classes)
    if p.is_dir():
        return load_folder(p, split, classes)
    raise InputError(f"data set {p} is neither a .npz file nor a folder of images")


def stratified_sample(labels: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    """Indices of about ``n`` items with each class in proportion (at least one per class present)."""
    labels = np.asarray(labels)
    if n >= len(labels):
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    out = []
    classes, counts = np.unique(labels, return_counts=True)
    quota = np.maximum(1, np.round(counts / counts.sum() * n)).astype(int)
    for c, q in zip(classes, quota):
        idx = np.flatnonzero(labels == c)
        out.append(rng.choice(idx, size=min(q, len(idx)), replace=False))
    return np.sort(np.concatenate(out))


_STAINS: dict[tuple, object] = {}  # set (and spec) -> its StainEstimate


def set_stain_vectors(images: ImageSet, spec):
    """The two stains (``2 x 3``, or None) of a set taken as one session, from an even sample of its images."""
    from hemaedge.edge.bundle.preprocess import HUE_CROPS, even_sample, optical_density, resized, stain_vectors

    if not len(images):
        return None
    return stain_vectors(optical_density(resized(images.images(even_sample(len(images), HUE_CROPS)), spec)))


def session_stain(images: ImageSet, spec, n: int = 2000):
    """The stain of a set taken as one session (one microscope's cells, as ``evaluate --station`` takes a labelled
    set): a ``StainEstimate``, as ``estimate_stain`` makes it, over up to ``n`` of its images, evenly spread
    (remembered per set and input spec)."""
    from hemaedge.edge.bundle.preprocess import StainEstimate, even_sample, hue_matrix, resized, stain_strength

    key = (images.digest or id(images), len(images), spec.height, spec.width, spec.colour_order, spec.resize)
    key += (tuple(getattr(spec, "stain_vectors", ())),)
    if key not in _STAINS:
        if not len(images):
            return StainEstimate(None)
        vectors = set_stain_vectors(images, spec) if getattr(spec, "stain_vectors", ()) else None
        matrix = hue_matrix(vectors, spec)
        idx = even_sample(len(images), n)
        st = [stain_strength(resized(images.images(idx[s : s + 256]), spec), matrix) for s in range(0, len(idx), 256)]
        _STAINS[key] = StainEstimate(float(np.median(np.concatenate(st))), vectors)
    return _STAINS[key]


def batches(images: ImageSet, spec, idx: np.ndarray | None = None, batch: int = 256):
    """Yield ``(preprocessed NCHW float32, labels)`` batches with the shared preprocessing (a bundle with session
    stain normalisation: the whole set is one session)."""
    from hemaedge.edge.bundle.preprocess import preprocess

    stain = session_stain(images, spec) if getattr(spec, "stain_ref", 0) else None
    idx = np.arange(len(images)) if idx is None else np.asarray(idx)
    for s in range(0, len(idx), batch):
        part = idx[s : s + batch]
        yield preprocess(images.images(part), spec, session=stain), images.labels[part]
