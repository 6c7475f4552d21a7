"""Build configuration: `configs/build/default.yaml` plus command-line overrides."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from langcell.core.config import from_dict, load_yaml
from langcell.core.errors import LangCellError

from langcell.build_sclibrary.ingest_io import ASPECTS

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs" / "build"
DEFAULT_CONFIG = CONFIG_DIR / "default.yaml"
SPLITS = ("train", "val", "test")
# Options that change where or how fast the work runs, never what is written.
RUNTIME_KEYS = ("workers", "shard")


@dataclass
class TextConfig:
    prefixes: dict = field(default_factory=dict)
    template: str = "{prefix}: {label}. {definition}"
    template_no_definition: str = "{prefix}: {label}."
    synonym_template: str = "{prefix}: {synonym}. {definition}"
    parent_template: str = "{prefix}: {label}, a kind of {parent}."
    max_synonyms: int = 5
    max_parents: int = 3


@dataclass
class BuildConfig:
    vocab: str = "geneformer-v1"
    split_by: str = "dataset"
    fractions: list = field(default_factory=lambda: [0.8, 0.1, 0.1])
    holdout_cell_types: list = field(default_factory=list)
    seed: int = 0
    max_length: int = 2048
    shard_size: int = 10000
    bucket_cells: int = 50000
    chunk_rows: int = 4096
    bins_per_decade: int = 128
    texts: str = "texts.yaml"
    workers: int = 1
    shard: str | None = None

    def __post_init__(self):
        if self.vocab not in ("geneformer-v1", "corpus"):
            raise ValueError(f"vocab must be geneformer-v1 or corpus, got {self.vocab!r}")
        if self.split_by not in ("dataset", "donor", "cell"):
            raise ValueError(f"split_by must be dataset, donor or cell, got {self.split_by!r}")
        fractions = [float(f) for f in self.fractions]
        if len(fractions) != 3 or min(fractions) < 0 or abs(sum(fractions) - 1) > 1e-6 or fractions[0] <= 0:
            raise ValueError(f"fractions must be three non-negative numbers (train > 0) summing to 1, got {self.fractions}")
        self.fractions = fractions
        self.holdout_cell_types = [str(t) for t in self.holdout_cell_types]
        for name in ("max_length", "shard_size", "bucket_cells", "chunk_rows", "bins_per_decade", "workers"):
            if int(getattr(self, name)) < (2 if name == "max_length" else 1):
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)}")
        if self.bucket_cells < self.shard_size:
            # A bucket is cut into shards; a smaller one would quietly make shards below shard_size.
            raise ValueError(f"bucket_cells ({self.bucket_cells}) must be at least shard_size ({self.shard_size}); "
                             "raise bucket_cells or lower shard_size")
        parse_shard(self.shard)

    def output_config(self) -> dict[str, Any]:
        """The settings that determine the output (what a resumed run must repeat)."""
        data = dataclasses.asdict(self)
        for key in RUNTIME_KEYS:
            data.pop(key)
        return data


def parse_shard(text: str | None) -> tuple[int, int]:
    if text is None:
        return 0, 1
    try:
        index, count = (int(x) for x in str(text).split("/"))
    except ValueError:
        raise ValueError(f"shard must look like i/N (e.g. 0/4), got {text!r}") from None
    if count < 1 or not 0 <= index < count:
        raise ValueError(f"shard i/N needs 0 <= i < N, got {text!r}")
    return index, count


def load_build_config(path: str | None = None, overrides: dict[str, Any] | None = None) -> BuildConfig:
    source = Path(path) if path else DEFAULT_CONFIG
    data = load_yaml(source)
    data.update({k: v for k, v in (overrides or {}).items() if v is not None})
    texts = Path(str(data.get("texts", "texts.yaml")))
    if not texts.is_absolute():
        data["texts"] = str((source.parent / texts).resolve())
    return from_dict(BuildConfig, data, str(source))


def load_text_config(path: str) -> TextConfig:
    config = from_dict(TextConfig, load_yaml(path), str(path))
    missing = [a for a in ASPECTS if a not in config.prefixes]
    if missing:
        raise LangCellError(f"{path}: prefixes has no entry for aspect {missing[0]!r}; add one")
    return config
