"""Default clinical grouping written into manifests (edge/bundle/class_groups.py)."""

from __future__ import annotations

from hemaedge.edge.bundle.class_groups import GROUP_SPELLINGS, default_class_groups, group_of
from hemaedge.edge.bundle.manifest import parse_manifest

PBC8 = ["basophil", "eosinophil", "erythroblast", "ig", "lymphocyte", "monocyte", "neutrophil", "platelet"]
SEED2_12 = [
    "myeloblast",
    "lymphoblast",
    "promyelocyte",
    "myelocyte",
    "metamyelocyte",
    "band neutrophil",
    "segmented neutrophil",
    "lymphocyte",
    "monocyte",
    "eosinophil",
    "basophil",
    "erythroblast",
]


def test_twelve_type_taxonomy_groups_blasts_and_immature_granulocytes():
    g = default_class_groups(SEED2_12)
    assert g["blasts"] == ["myeloblast", "lymphoblast"]
    assert g["immature_granulocytes"] == ["promyelocyte", "myelocyte", "metamyelocyte"]
    assert g["neutrophils"] == ["band neutrophil", "segmented neutrophil"]
    assert g["nrbc"] == ["erythroblast"]
    members = [c for v in g.values() for c in v]
    assert sorted(members) == sorted(SEED2_12) and len(members) == len(set(members))


def test_pbc_and_bloodmnist_spellings():
    g = default_class_groups(PBC8)
    assert g["immature_granulocytes"] == ["ig"] and g["platelets"] == ["platelet"] and "blasts" not in g
    assert default_class_groups(["Immature_Granulocytes", "Neutrophils"]) == {
        "immature_granulocytes": ["Immature_Granulocytes"],
        "neutrophils": ["Neutrophils"],
    }


def test_two_class_blast_model_and_unknown_names():
    assert default_class_groups(["normal", "blast"]) == {"blasts": ["blast"]}
    assert default_class_groups(["non-blast", "blast"]) == {"blasts": ["blast"]}
    assert group_of("smudge cell") == "smudge_cells" and group_of("artefact") is None
    assert group_of("Neutrophil (band)") == "neutrophils"


def test_groups_pass_manifest_validation():
    d = {
        "format": "hemaedge-bundle",
        "schema_version": 1,
        "classes": SEED2_12,
        "class_groups": default_class_groups(SEED2_12),
        "input": {"height": 256, "width": 256},
        "artifacts": [{"file": "model.onnx", "kind": "onnx", "precision": "fp32", "sha256": "0" * 64, "bytes": 1}],
    }
    assert parse_manifest(d).class_groups["blasts"] == ["myeloblast", "lymphoblast"]


def test_group_keys_are_the_counters_canonical_keys():
    try:
        from hemaedge.edge.count.flags import canonical_group
    except ImportError:  # the counter's grouping is optional here
        return
    for key in GROUP_SPELLINGS:
        assert canonical_group(key) == key, key
