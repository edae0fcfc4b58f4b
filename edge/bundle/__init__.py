"""The model bundle contract: manifest schema, load + verify, preprocessing."""

from hemaedge.edge.bundle.io import Bundle, BundleWriter, add_artifact, load_bundle, read_manifest, sha256_file
from hemaedge.edge.bundle.manifest import Artifact, CropGeometry, InputSpec, Manifest, parse_manifest
from hemaedge.edge.bundle.preprocess import crop_box, cut_crop, preprocess

__all__ = [
    "Artifact",
    "Bundle",
    "BundleWriter",
    "CropGeometry",
    "InputSpec",
    "Manifest",
    "add_artifact",
    "crop_box",
    "cut_crop",
    "load_bundle",
    "parse_manifest",
    "preprocess",
    "read_manifest",
    "sha256_file",
]
