"""Classification datasets in ImageFolder layout, with the class maps of the robustness sets.

A *layout* (registry) maps class-folder names to (class index, class name); the ImageNet
layouts also accept folders named by class name (``great_white_shark``):
    ``folder``          folder names are the classes (``golden_retriever`` -> "golden retriever")
    ``imagenet``        1000 WordNet-id folders (``n01443537``), CLIP's class names
    ``imagenet-sketch`` same 1000 WordNet ids
    ``imagenet-v2``     folders ``0`` .. ``999`` (class indices)
    ``imagenet-r``      the 200-class subset of ImageNet-R, WordNet-id folders
    ``imagenet-a``      the 200-class subset of ImageNet-A, WordNet-id folders
WordNet ids come from timm's shipped lists, names from open_clip's ``IMAGENET_CLASSNAMES``;
nothing is downloaded. The subsets are evaluated over their 200 classes only, as in the
ImageNet-R/-A papers and CLIP.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

from mmpretrain.data.ops import IMAGE_KEYS
from mmpretrain.registry import Registry


@dataclass(frozen=True)
class ClassMap:
    """``folder -> class index`` and the class names, in index order."""

    folders: dict[str, int]
    names: list[str]

    def index(self, folder: str) -> int | None:
        """A folder's class: by its id (WordNet id, index), else by class name (``great_white_shark``)."""
        if folder in self.folders:
            return self.folders[folder]
        wanted = folder.replace("_", " ").lower()
        return next((i for i, n in enumerate(self.names) if n.lower() == wanted), None)


LAYOUTS: Registry[ClassMap] = Registry("dataset layout")


def _timm_list(name: str) -> list[str]:
    return resources.files("timm.data._info").joinpath(name).read_text().split()


def _imagenet_names() -> list[str]:
    return list(IMAGENET_CLASSNAMES)


@LAYOUTS.register("imagenet", example={"folders": ("n01443537", "n15075141"), "classes": 1000})
def imagenet_layout(root: Path | None = None) -> ClassMap:
    """1000 WordNet-id folders."""
    wnids = _timm_list("imagenet_synsets.txt")
    return ClassMap({w: i for i, w in enumerate(wnids)}, _imagenet_names())


@LAYOUTS.register("imagenet-sketch", example={"folders": ("n01443537", "n15075141"), "classes": 1000})
def imagenet_sketch_layout(root: Path | None = None) -> ClassMap:
    """ImageNet-Sketch: the 1000 WordNet-id folders of ImageNet."""
    return imagenet_layout()


@LAYOUTS.register("imagenet-v2", example={"folders": ("0", "999"), "classes": 1000})
def imagenet_v2_layout(root: Path | None = None) -> ClassMap:
    """ImageNet-V2: folders named by class index 0..999."""
    return ClassMap({str(i): i for i in range(1000)}, _imagenet_names())


def _subset(synsets_file: str) -> ClassMap:
    all_wnids = _timm_list("imagenet_synsets.txt")
    names = _imagenet_names()
    subset = _timm_list(synsets_file)
    index = {w: i for i, w in enumerate(all_wnids)}
    return ClassMap({w: i for i, w in enumerate(subset)}, [names[index[w]] for w in subset])


@LAYOUTS.register("imagenet-r", example={"folders": ("n01443537", "n12267677"), "classes": 200})
def imagenet_r_layout(root: Path | None = None) -> ClassMap:
    """ImageNet-R: its 200 WordNet ids, evaluated over those 200 classes."""
    return _subset("imagenet_r_synsets.txt")


@LAYOUTS.register("imagenet-a", example={"folders": ("n01498041", "n12267677"), "classes": 200})
def imagenet_a_layout(root: Path | None = None) -> ClassMap:
    """ImageNet-A: its 200 WordNet ids, evaluated over those 200 classes."""
    return _subset("imagenet_a_synsets.txt")


@LAYOUTS.register("folder", example={"folders": ("cat", "red_fox"), "classes": None})
def folder_layout(root: Path | None = None) -> ClassMap:
    """Any ImageFolder: sorted folder names are the classes (underscores read as spaces)."""
    if root is None:
        raise ValueError("the 'folder' layout needs the dataset root")
    folders = sorted(p.name for p in Path(root).iterdir() if p.is_dir())
    return ClassMap({f: i for i, f in enumerate(folders)}, [f.replace("_", " ") for f in folders])


class ImageFolderSet:
    """The images of ``root/<class folder>/...`` with their labels (``samples``: (path, label), sorted),
    every folder checked against the layout's classes (``classes``). ``eval.embed`` reads them."""

    def __init__(self, root: str | Path, layout: str):
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"dataset folder not found: {self.root}")
        self.classes = LAYOUTS.get(layout).builder(self.root)
        self.samples: list[tuple[Path, int]] = []
        unknown = []
        for folder in sorted(p for p in self.root.iterdir() if p.is_dir()):
            label = self.classes.index(folder.name)
            if label is None:
                unknown.append(folder.name)
                continue
            self.samples += [
                (f, label) for f in sorted(folder.rglob("*")) if f.suffix.lower().lstrip(".") in IMAGE_KEYS
            ]
        if unknown:
            example = next(iter(self.classes.folders))
            raise ValueError(
                f"{self.root}: {len(unknown)} folder(s) are not classes of layout {layout!r} "
                f"(first: {unknown[0]!r}; expected names like {example!r})"
            )
        if not self.samples:
            raise ValueError(f"{self.root}: no images found in class folders")
