"""The model bundle contract: manifest schema, load + verify, preprocessing."""

from edge.bundle.io import Bundle, BundleWriter, add_artifact, load_bundle, read_manifest, sha256_file
from edge.bundle.manifest import Artifact, CropGeometry, InputSpec, Manifest, parse_manifest
from edge.bundle.preprocess import crop_box, cut_crop, preprocess

__all__ = [
    "Artifact", "Bundle", "BundleWriter", "CropGeometry", "InputSpec", "Manifest", "add_artifact", "crop_box",
    "cut_crop", "load_bundle", "parse_manifest", "preprocess", "read_manifest", "sha256_file",
]
