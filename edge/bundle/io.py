"""Write and load model bundles, verifying every artifact's sha256.

The writer is used by ``export`` (workstation); the loader by the station.
A bundle is written into a temporary sibling directory and renamed into
place, so an interrupted export never leaves a half-written bundle behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from hemaedge.edge.bundle.manifest import MANIFEST, Artifact, Manifest, parse_manifest
from hemaedge.edge.errors import BundleError

_CHUNK = 1 << 20


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def make_artifact(path: Path, kind: str, precision: str | None, **details: Any) -> Artifact:
    """Describe a file already inside the bundle directory."""
    return Artifact(
        file=path.name,
        kind=kind,
        precision=precision,
        sha256=sha256_file(path),
        bytes=path.stat().st_size,
        details=details,
    )


@dataclass(frozen=True)
class Bundle:
    """A verified bundle on disk."""

    path: Path
    manifest: Manifest

    def file(self, artifact: Artifact) -> Path:
        """Absolute path of an artifact."""
        return self.path / artifact.file

    def onnx_path(self, precision: str, target: str | None = None) -> Path:
        """Path of the ONNX model at a precision (``fp32`` or ``int8``); ``target="cpu"`` prefers the CPU variant."""
        return self.file(self.manifest.artifact(precision, "onnx", target))


def verify_artifact(root: Path, art: Artifact) -> None:
    """Raise BundleError naming the file if it is missing, truncated or altered."""
    p = root / art.file
    if not p.is_file():
        raise BundleError(f"bundle {root}: artifact {art.file} is missing")
    size = p.stat().st_size
    if size != art.bytes:
        raise BundleError(
            f"bundle {root}: artifact {art.file} is {size} bytes, manifest says {art.bytes} (truncated or replaced)"
        )
    digest = sha256_file(p)
    if digest != art.sha256:
        raise BundleError(f"bundle {root}: artifact {art.file} fails its sha256 check (corrupted or tampered)")


def resolve(path: str | os.PathLike) -> Path:
    """A bundle directory; a bare name that is not a directory here means a bundle shipped in ``edge/models``."""
    root = Path(path)
    if not root.exists() and len(root.parts) == 1:
        shipped = Path(__file__).resolve().parents[1] / "models" / root.name
        if (shipped / MANIFEST).is_file():
            return shipped
    return root


def read_manifest(path: str | os.PathLike) -> Manifest:
    """Read and validate ``manifest.json`` without checking artifacts (``path`` may name a shipped bundle)."""
    root = resolve(path)
    mf = root / MANIFEST
    if not root.is_dir():
        raise BundleError(f"bundle {root} does not exist or is not a directory")
    if not mf.is_file():
        raise BundleError(f"bundle {root} has no {MANIFEST}")
    try:
        data = json.loads(mf.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"bundle {root}: {MANIFEST} is not valid JSON ({exc})") from exc
    return parse_manifest(data)


def load_bundle(path: str | os.PathLike, verify: bool = True) -> Bundle:
    """Load a bundle and verify the sha256 of every artifact it lists.

    Args:
        path: The bundle directory.
        verify: Check every artifact's size and sha256 (default True).

    Raises:
        BundleError: one line naming the bundle and the file at fault.
    """
    root = resolve(path)
    manifest = read_manifest(root)
    if verify:
        for art in manifest.artifacts:
            verify_artifact(root, art)
    return Bundle(root, manifest)


def write_manifest(root: Path, manifest: Manifest) -> Path:
    """Write ``manifest.json`` atomically."""
    text = json.dumps(manifest.to_dict(), indent=2, sort_keys=False) + "\n"
    tmp = root / (MANIFEST + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, root / MANIFEST)
    return root / MANIFEST


def add_artifact(
    bundle: Bundle, source: Path, kind: str, precision: str | None, name: str | None = None, **details: Any
) -> Bundle:
    """Copy a file into an existing bundle, list it, and rewrite the manifest.

    An artifact with the same file name is replaced.
    """
    dest = bundle.path / (name or source.name)
    if source.resolve() != dest.resolve():
        shutil.copyfile(source, dest)
    art = make_artifact(dest, kind, precision, **details)
    arts = tuple(a for a in bundle.manifest.artifacts if a.file != art.file) + (art,)
    manifest = replace(bundle.manifest, artifacts=arts)
    write_manifest(bundle.path, manifest)
    return Bundle(bundle.path, manifest)


class BundleWriter:
    """Build a bundle in a temporary directory, then move it into place.

    Usage::

        with BundleWriter(out_dir, overwrite=True) as w:
            w.add(Path("model.onnx"), "onnx", "fp32")
            w.finish(manifest_without_artifacts)
    """

    def __init__(self, out: str | os.PathLike, overwrite: bool = False):
        self.out = Path(out)
        self.overwrite = overwrite
        self.artifacts: list[Artifact] = []
        self.tmp: Path | None = None

    def __enter__(self) -> BundleWriter:
        if self.out.exists() and not self.overwrite:
            raise BundleError(f"output {self.out} already exists (pass --overwrite to replace it)")
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.", dir=self.out.parent))
        os.chmod(self.tmp, 0o755)  # mkdtemp makes it private; a bundle is meant to be shared
        return self

    @property
    def dir(self) -> Path:
        """The temporary directory being filled."""
        assert self.tmp is not None, "use BundleWriter as a context manager"
        return self.tmp

    def add(self, source: Path, kind: str, precision: str | None, name: str | None = None, **details: Any) -> Path:
        """Copy (or take, if already inside) a file into the bundle and list it."""
        dest = self.dir / (name or Path(source).name)
        if Path(source).resolve() != dest.resolve():
            shutil.copyfile(source, dest)
        self.artifacts = [a for a in self.artifacts if a.file != dest.name]
        self.artifacts.append(make_artifact(dest, kind, precision, **details))
        return dest

    def finish(self, manifest: Manifest) -> Bundle:
        """Write the manifest (with the listed artifacts) and move the bundle into place."""
        manifest = replace(manifest, artifacts=tuple(self.artifacts))
        write_manifest(self.dir, manifest)
        load_bundle(self.dir)  # the bundle we made must pass our own loader
        if self.out.exists():
            old = self.out.with_name(f".{self.out.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(self.out, old)
            os.replace(self.dir, self.out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(self.dir, self.out)
        self.tmp = None
        return load_bundle(self.out)

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
