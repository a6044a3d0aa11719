"""Class labels of meshes, for every dataset kind (tokens, sparse SDFs, latents): one rule.

A mesh's category is, in order: its file's entry in ``labels.json`` of the input folder (relative
file path -> label); the category its source records (the ShapeNet synset prefix of a name in
MeshGPT's processed ShapeNet); or, without ``labels.json``, the top-level folder it sits in
(ShapeNet's category folders, the synth families). A category that is a well-known ShapeNet synset
id becomes its class name (``03001627`` -> ``chair``); an unknown id stays the label. Manifests
record the synset -> class mapping they used.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from pathlib import Path

from meshforge.errors import InputError

LABELS_FILE = "labels.json"

# ShapeNetCore v2's 55 categories (taxonomy.json), names shortened to one CLI-friendly word.
SHAPENET_SYNSETS = {
    "02691156": "airplane", "02747177": "trash_bin", "02773838": "bag", "02801938": "basket",
    "02808440": "bathtub", "02818832": "bed", "02828884": "bench", "02843684": "birdhouse",
    "02871439": "bookshelf", "02876657": "bottle", "02880940": "bowl", "02924116": "bus",
    "02933112": "cabinet", "02942699": "camera", "02946921": "can", "02954340": "cap",
    "02958343": "car", "02992529": "cellphone", "03001627": "chair", "03046257": "clock",
    "03085013": "keyboard", "03207941": "dishwasher", "03211117": "display", "03261776": "earphone",
    "03325088": "faucet", "03337140": "file_cabinet", "03467517": "guitar", "03513137": "helmet",
    "03593526": "jar", "03624134": "knife", "03636649": "lamp", "03642806": "laptop",
    "03691459": "loudspeaker", "03710193": "mailbox", "03759954": "microphone", "03761084": "microwave",
    "03790512": "motorbike", "03797390": "mug", "03928116": "piano", "03938244": "pillow",
    "03948459": "pistol", "03991062": "flowerpot", "04004475": "printer", "04074963": "remote",
    "04090263": "rifle", "04099429": "rocket", "04225987": "skateboard", "04256520": "sofa",
    "04330267": "stove", "04379243": "table", "04401088": "telephone", "04460130": "tower",
    "04468005": "train", "04530566": "watercraft", "04554684": "washer",
}  # fmt: skip
_SYNSET_ID = re.compile(r"\d{8}")


def read_labels_file(folder: Path) -> dict[str, str]:
    """``folder/labels.json`` (relative file path -> label), or {} when there is none."""
    path = Path(folder) / LABELS_FILE
    if not path.is_file():
        return {}
    try:
        labels = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise InputError(path, f"invalid JSON ({exc})") from None
    if not isinstance(labels, dict):
        raise InputError(path, "expected a mapping of relative file path -> class label")
    return {str(k): str(v) for k, v in labels.items()}


def mesh_category(rel: Path, labels: dict[str, str], source_category: str | None) -> str | None:
    """The category of a mesh from file ``rel`` (relative to the input folder); see the module docstring."""
    listed = labels.get(rel.as_posix())
    if listed is not None or source_category is not None or labels:
        return listed if listed is not None else source_category
    return rel.parts[0] if len(rel.parts) > 1 else None


def class_label(category: str | None) -> str | None:
    return SHAPENET_SYNSETS.get(category, category) if category is not None else None


def synset_classes(categories: Iterable[str | None]) -> dict[str, str]:
    """{synset id: class label} for the categories that are ShapeNet synset ids, sorted by id."""
    return {c: SHAPENET_SYNSETS.get(c, c) for c in sorted({c for c in categories if c and _SYNSET_ID.fullmatch(c)})}


def label_sources(labels: dict[str, str], source_categories: bool) -> list[str]:
    """Where a dataset's labels came from, in order of precedence, for its manifest."""
    sources = [LABELS_FILE] if labels else []
    if source_categories:
        sources.append("categories the source records (ShapeNet synsets)")
    return sources if labels else [*sources, "top-level folders"]
