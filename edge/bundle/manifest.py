"""The model-bundle manifest: the one contract between workstation and station.

A bundle is a directory holding ``manifest.json`` and the artifacts it lists.
The manifest is plain JSON (schema below, versioned by ``schema_version``);
this module validates it into typed records with stdlib + numpy only.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from hemaedge.edge.errors import BundleError

FORMAT = "hemaedge-bundle"
SCHEMA_VERSION = 3  # 2: input.stain_ref; 3: input.stain_vectors (each written only by bundles that use it)
MANIFEST = "manifest.json"
LAYOUTS = ("NCHW",)
COLOUR_ORDERS = ("RGB", "BGR")
PRECISIONS = ("fp32", "fp16", "int8")
ARTIFACT_KINDS = ("onnx", "engine", "calibration-cache", "golden", "triage", "other")
OUTPUT_KINDS = ("logits", "probabilities")


@dataclass(frozen=True)
class InputSpec:
    """What the model eats: ``N x C x H x W`` float32 after preprocessing.

    ``pixel = (value / 255 - mean) / std`` per channel, channels in ``colour_order``.
    With ``white_balance`` each image is first scaled per channel so its bright
    background becomes neutral (removes the lamp / stain colour cast of one
    microscope; training and runtime both do it, through ``preprocess``).
    With ``stain_ref`` (> 0) the session's stain strength is normalised first: every crop's
    optical density is multiplied by ``stain_ref / the session's strength``, bounded by
    ``stain_gain_range`` (``edge/bundle/preprocess.py``: a pale smear and a heavy one look alike,
    while a basophil stays darker than a lymphocyte of the same slide). Such a manifest is
    schema version 2.
    With ``stain_vectors`` (the reference's nuclear and eosin stain directions in optical density,
    two unit RGB rows) the session's own two stains are measured too and mapped onto them first
    (a slide stained bluer or redder than the training slides looks like them); a session stain
    within ``stain_hue_tolerance`` degrees of its reference is left as it is. Schema version 3.
    """

    height: int
    width: int
    channels: int = 3
    layout: str = "NCHW"
    dtype: str = "float32"
    colour_order: str = "RGB"
    mean: tuple[float, ...] = (0.0, 0.0, 0.0)
    std: tuple[float, ...] = (1.0, 1.0, 1.0)
    resize: str = "area"
    name: str = "input"
    white_balance: bool = False
    stain_ref: float = 0.0
    stain_gain_range: tuple[float, float] = (0.5, 2.0)
    stain_vectors: tuple[tuple[float, ...], ...] = ()
    stain_hue_tolerance: float = 0.0


def stain_fields(inp: dict[str, Any], default: InputSpec | None = None) -> dict[str, Any]:
    """The stain-normalisation fields of an ``input`` record (a manifest's or a checkpoint's), as ``InputSpec``
    keywords; missing ones from ``default`` (else off)."""
    base = default or InputSpec(height=1, width=1)
    return {
        "stain_ref": float(inp.get("stain_ref", base.stain_ref)),
        "stain_gain_range": tuple(float(x) for x in inp.get("stain_gain_range", base.stain_gain_range)),
        "stain_vectors": tuple(tuple(float(x) for x in v) for v in inp.get("stain_vectors", base.stain_vectors)),
        "stain_hue_tolerance": float(inp.get("stain_hue_tolerance", base.stain_hue_tolerance)),
    }


CROP_SCALES = ("cell", "session")


@dataclass(frozen=True)
class CropGeometry:
    """How a crop is cut around a detected cell so it matches training crops.

    The crop is a square centred on the detection box, padded with ``pad`` where it
    leaves the frame, then resized to the model input. Its side (at least ``min_side_px``):

    * ``scale="cell"``: ``max(box_w, box_h) / cell_fraction``: every cell fills the same
      share of its crop (for training sets whose crops were cut around each cell that way);
    * ``scale="session"``: ``typical cell side / cell_fraction``, the typical side being the
      median white-cell box of the session (the station keeps it): one field of view for all
      cells, as in training images taken at a fixed magnification, so a small lymphocyte stays
      smaller than a monocyte, as the model learned.

    ``cell_fraction`` is the share of the crop side the (typical) cell spans in training images.
    """

    cell_fraction: float = 0.45
    min_side_px: int = 16
    pad: str = "reflect"
    scale: str = "cell"


@dataclass(frozen=True)
class Artifact:
    """One file of the bundle with its checksum."""

    file: str
    kind: str
    precision: str | None
    sha256: str
    bytes: int
    details: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Manifest:
    """A parsed, validated manifest."""

    name: str
    architecture: str
    classes: tuple[str, ...]
    input: InputSpec
    crop: CropGeometry
    artifacts: tuple[Artifact, ...]
    output_kind: str = "logits"
    output_name: str = "output"
    class_groups: dict[str, list[str]] = field(default_factory=dict)
    calibration: dict[str, Any] | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    schema_version: int = 1  # raised on writing to 2 when input.stain_ref is used, 3 with input.stain_vectors

    def artifact(self, precision: str | None = None, kind: str = "onnx", target: str | None = None) -> Artifact:
        """The artifact of a kind (and precision), or a BundleError naming what exists.

        A precision may come in variants for different runtimes (``details["target"]``): the
        portable one (no target; symmetric INT8 that TensorRT accepts) and e.g. ``"cpu"`` (INT8
        with asymmetric activations, which ONNX Runtime's CPU kernels run faster). ``target``
        picks that variant when the bundle has it, else the portable one; without ``target``
        the portable one is returned.
        """
        found = [a for a in self.artifacts if a.kind == kind and (precision is None or a.precision == precision)]
        if found:
            for art in found:
                if art.details.get("target") == target:
                    return art
            return found[0]
        have = ", ".join(f"{a.file} ({a.kind}/{a.precision})" for a in self.artifacts)
        raise BundleError(f"bundle '{self.name}' has no {kind} artifact at precision {precision}: it has {have}")

    @property
    def views(self) -> int:
        """Test-time views per crop (``edge/classify/views.py``): 1 unless the bundle asks for more."""
        return int(self.extra.get("views", 1))

    @property
    def notice(self) -> str:
        """Terms the bundle's training data put on its use (e.g. research use only), or ``""``."""
        return str(self.extra.get("notice") or "")

    def precisions(self, kind: str = "onnx") -> list[str]:
        """Precisions available for an artifact kind (each once, variants included)."""
        return list(dict.fromkeys(a.precision for a in self.artifacts if a.kind == kind and a.precision))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (the on-disk form)."""
        d = asdict(self)
        need = 3 if self.input.stain_vectors else 2 if self.input.stain_ref else 1
        version = max(self.schema_version, need)
        out: dict[str, Any] = {"format": FORMAT, "schema_version": version}
        for key in ("name", "architecture", "classes", "class_groups", "input", "crop"):
            out[key] = d[key]
        if not self.input.stain_ref:  # a bundle without session stain normalisation reads as before (version 1)
            for key in ("stain_ref", "stain_gain_range"):
                out["input"].pop(key)
        else:
            out["input"]["stain_gain_range"] = list(self.input.stain_gain_range)
        if not self.input.stain_vectors:
            for key in ("stain_vectors", "stain_hue_tolerance"):
                out["input"].pop(key)
        else:
            out["input"]["stain_vectors"] = [list(v) for v in self.input.stain_vectors]
        out["output"] = {"name": self.output_name, "kind": self.output_kind}
        out["artifacts"] = d["artifacts"]
        out["calibration"] = d["calibration"]
        out["metrics"] = d["metrics"]
        out["provenance"] = d["provenance"]
        out.update(self.extra)
        out["classes"] = list(self.classes)
        return out


def _need(d: dict, key: str, typ: type | tuple, where: str) -> Any:
    if key not in d:
        raise BundleError(f"manifest is missing '{where}{key}'")
    if not isinstance(d[key], typ):
        raise BundleError(f"manifest field '{where}{key}' has the wrong type ({type(d[key]).__name__})")
    return d[key]


def parse_manifest(d: dict[str, Any]) -> Manifest:
    """Validate a manifest dict (as read from JSON) into a ``Manifest``.

    Raises:
        BundleError: with a one-line reason for the first problem found.
    """
    if not isinstance(d, dict):
        raise BundleError("manifest is not a JSON object")
    if d.get("format") != FORMAT:
        raise BundleError(f"manifest 'format' is {d.get('format')!r}, expected {FORMAT!r}")
    version = _need(d, "schema_version", int, "")
    if version > SCHEMA_VERSION:
        raise BundleError(
            f"bundle schema_version {version} is newer than this hemaedge understands ({SCHEMA_VERSION}): upgrade hemaedge"
        )
    classes = _need(d, "classes", list, "")
    if not classes or not all(isinstance(c, str) and c for c in classes) or len(set(classes)) != len(classes):
        raise BundleError("manifest 'classes' must be a non-empty list of distinct names")
    inp = _need(d, "input", dict, "")
    try:
        spec = InputSpec(
            height=int(_need(inp, "height", int, "input.")),
            width=int(_need(inp, "width", int, "input.")),
            channels=int(inp.get("channels", 3)),
            layout=str(inp.get("layout", "NCHW")),
            dtype=str(inp.get("dtype", "float32")),
            colour_order=str(inp.get("colour_order", "RGB")),
            mean=tuple(float(x) for x in inp.get("mean", (0.0, 0.0, 0.0))),
            std=tuple(float(x) for x in inp.get("std", (1.0, 1.0, 1.0))),
            resize=str(inp.get("resize", "area")),
            name=str(inp.get("name", "input")),
            white_balance=bool(inp.get("white_balance", False)),
            **stain_fields(inp),
        )
    except (TypeError, ValueError) as exc:
        raise BundleError(f"manifest 'input' is malformed: {exc}") from exc
    if spec.layout not in LAYOUTS:
        raise BundleError(f"manifest input.layout {spec.layout!r} is not supported ({', '.join(LAYOUTS)})")
    if spec.colour_order not in COLOUR_ORDERS:
        raise BundleError(f"manifest input.colour_order {spec.colour_order!r} is not one of {COLOUR_ORDERS}")
    if len(spec.mean) != spec.channels or len(spec.std) != spec.channels or min(spec.std) <= 0:
        raise BundleError("manifest input.mean/std must have one positive value per channel")
    lo_hi = spec.stain_gain_range
    if spec.stain_ref < 0 or len(lo_hi) != 2 or not 0 < lo_hi[0] <= 1 <= lo_hi[1]:
        raise BundleError(
            "manifest input.stain_ref must be >= 0 and input.stain_gain_range [low <= 1 <= high], both > 0"
        )
    if spec.stain_vectors:
        rows = spec.stain_vectors
        if len(rows) != 2 or any(len(v) != 3 or abs(sum(x * x for x in v) - 1.0) > 1e-3 for v in rows):
            raise BundleError("manifest input.stain_vectors must be two unit-length RGB rows (nuclear stain, eosin)")
        if not spec.stain_ref:
            raise BundleError("manifest input.stain_vectors needs input.stain_ref (the session's stain normalisation)")
        if not 0.0 <= spec.stain_hue_tolerance < 45.0:
            raise BundleError("manifest input.stain_hue_tolerance must be in degrees, 0 to under 45")
    crop_d = d.get("crop") or {}
    crop = CropGeometry(
        cell_fraction=float(crop_d.get("cell_fraction", 0.45)),
        min_side_px=int(crop_d.get("min_side_px", 16)),
        pad=str(crop_d.get("pad", "reflect")),
        scale=str(crop_d.get("scale", "cell")),
    )
    if not 0.05 <= crop.cell_fraction <= 1.0:
        raise BundleError(f"manifest crop.cell_fraction {crop.cell_fraction} is outside 0.05..1")
    if crop.scale not in CROP_SCALES:
        raise BundleError(f"manifest crop.scale {crop.scale!r} is not one of {CROP_SCALES}")
    arts = []
    for i, a in enumerate(_need(d, "artifacts", list, "")):
        where = f"artifacts[{i}]."
        file = _need(a, "file", str, where)
        if "/" in file or "\\" in file or file.startswith("."):
            raise BundleError(f"manifest artifact name {file!r} must be a plain file name inside the bundle")
        kind = _need(a, "kind", str, where)
        if kind not in ARTIFACT_KINDS:
            raise BundleError(f"manifest artifact {file} has unknown kind {kind!r}")
        precision = a.get("precision")
        if precision is not None and precision not in PRECISIONS:
            raise BundleError(f"manifest artifact {file} has unknown precision {precision!r}")
        arts.append(
            Artifact(
                file=file,
                kind=kind,
                precision=precision,
                sha256=_need(a, "sha256", str, where),
                bytes=int(_need(a, "bytes", int, where)),
                details=dict(a.get("details") or {}),
            )
        )
    if not any(a.kind == "onnx" for a in arts):
        raise BundleError("manifest lists no ONNX model artifact")
    out = d.get("output") or {}
    output_kind = out.get("kind", "logits")
    if output_kind not in OUTPUT_KINDS:
        raise BundleError(f"manifest output.kind {output_kind!r} is not one of {OUTPUT_KINDS}")
    groups = d.get("class_groups") or {}
    for g, members in groups.items():
        unknown = [m for m in members if m not in classes]
        if unknown:
            raise BundleError(f"manifest class group {g!r} names classes the model lacks: {unknown}")
    known = {
        "format",
        "schema_version",
        "name",
        "architecture",
        "classes",
        "class_groups",
        "input",
        "crop",
        "output",
        "artifacts",
        "calibration",
        "metrics",
        "provenance",
    }
    views = d.get("views", 1)
    if views not in (1, 2, 4, 8) or isinstance(views, bool):
        raise BundleError(f"manifest 'views' must be 1, 2, 4 or 8 (test-time views per crop), not {views!r}")
    if views > 2 and spec.height != spec.width:
        raise BundleError(f"manifest 'views' {views} turns crops by 90 degrees: it needs a square input")
    return Manifest(
        name=str(d.get("name", "unnamed")),
        architecture=str(d.get("architecture", "unknown")),
        classes=tuple(classes),
        input=spec,
        crop=crop,
        artifacts=tuple(arts),
        output_kind=output_kind,
        output_name=str(out.get("name", "output")),
        class_groups={k: list(v) for k, v in groups.items()},
        calibration=d.get("calibration"),
        metrics=dict(d.get("metrics") or {}),
        provenance=dict(d.get("provenance") or {}),
        extra={k: v for k, v in d.items() if k not in known},
        schema_version=version,
    )
