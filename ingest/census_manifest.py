"""Plan and manifests of `langcell ingest census`: parts planned from the cells' joinids, the
manifest written before any cell is read and updated part by part, resuming, shard locks and
`langcell ingest merge`."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pyarrow.parquet as pq

from langcell.core.errors import LangCellError
from langcell.core.files import atomic_write_json, output_lock, read_json, sha256_file, shared_lock

FORMAT = "langcell-ingest/1"

# Settings that define what a folder holds; a rerun must repeat them exactly.
IDENTITY_KEYS = ("format", "source", "organism", "obs_filter", "var_filter", "max_cells", "cells_per_part",
                 "plan", "n_genes", "genes_sha256")

PART_NAME = "cells/part-{:05d}.parquet"



def merge_shards(out: str | os.PathLike) -> dict[str, Any]:
    """Check the shard manifests in `out` and every part they list; write and return `manifest.json`."""
    out = Path(out)
    if not out.is_dir():
        raise LangCellError(f"{out}: folder not found; pass the --out folder the shards wrote to")
    with output_lock(out):
        shard_files = sorted(out.glob("manifest.shard-*-of-*.json"))
        if not shard_files:
            raise LangCellError(f"{out}: no manifest.shard-I-of-N.json found; run `langcell ingest census "
                                "--shard I/N --out` this folder first")
        manifests = [read_json(path, "shard manifest") for path in shard_files]
        counts = {m.get("shard", {}).get("count") for m in manifests}
        if len(counts) != 1:
            raise LangCellError(f"{out}: shard manifests of different shard counts {sorted(map(str, counts))}; "
                                "delete the manifests of the old sharding and rerun those shards")
        count = counts.pop()
        found = {m["shard"]["index"] for m in manifests}
        missing = sorted(set(range(count)) - found)
        if missing:
            raise LangCellError(f"{out}: shard(s) {missing} of {count} have no manifest; run `langcell ingest "
                                f"census --shard {missing[0]}/{count}` with the same arguments")
        first = manifests[0]
        for path, manifest in zip(shard_files, manifests):
            for key in IDENTITY_KEYS:
                if manifest.get(key) != first.get(key):
                    raise LangCellError(f"{path}: '{key}' differs from {shard_files[0].name}; all shards must "
                                        "run with the same arguments on the same store")
            if not manifest.get("complete"):
                index = manifest["shard"]["index"]
                raise LangCellError(f"{path}: shard {index}/{count} is not complete; rerun it with "
                                    f"`--shard {index}/{count}` and the same arguments, then merge again")
        if sha256_file(out / "genes.parquet") != first["genes_sha256"]:
            raise LangCellError(f"{out / 'genes.parquet'}: sha256 differs from the shard manifests; rerun any "
                                "shard to rewrite it, then merge again")
        parts = sorted((part for m in manifests for part in m["parts"]), key=lambda p: p["name"])
        _verify_parts(out, first, parts)
        merged = {key: first[key] for key in IDENTITY_KEYS}
        merged["census_summary"] = first.get("census_summary", {})
        merged["parts"] = parts
        _finish(merged)
        atomic_write_json(out / "manifest.json", merged)
        return merged



def parse_shard(text: str) -> tuple[int, int]:
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not match or int(match.group(2)) < 1 or int(match.group(1)) >= int(match.group(2)):
        raise LangCellError(f"--shard {text!r}: expected I/N with 0 <= I < N, e.g. "
                            "$SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT")
    return int(match.group(1)), int(match.group(2))



def _make_plan(joinids: np.ndarray, cells_per_part: int) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    digest = hashlib.sha256(joinids.astype("<i8", copy=False).tobytes()).hexdigest()
    parts = []
    for number, start in enumerate(range(0, joinids.size, cells_per_part)):
        block = joinids[start:start + cells_per_part]
        parts.append({"name": PART_NAME.format(number), "planned_rows": int(block.size),
                      "joinid_min": int(block[0]), "joinid_max": int(block[-1]),
                      "rows": None, "empty_cells": None, "sha256": None, "status": "pending"})
    plan = {"n_cells": int(joinids.size), "n_parts": len(parts), "joinids_sha256": digest}
    return plan, parts



def _shard_manifest_name(index: int, count: int) -> str:
    return f"manifest.shard-{index}-of-{count}.json"



def _start_manifest(path: Path, identity: dict[str, Any], parts: list[dict[str, Any]],
                    shard: tuple[int, int] | None) -> dict[str, Any]:
    fresh = dict(identity, parts=parts)
    if shard is not None:
        fresh["shard"] = {"index": shard[0], "count": shard[1]}
    _finish(fresh)
    if not path.exists():
        return fresh
    old = read_json(path, "ingest manifest")
    done = {part["name"]: part for part in old.get("parts", []) if part.get("status") == "done"}
    out = path.parent
    for part in fresh["parts"]:
        previous = done.get(part["name"])
        if previous is not None and (out / part["name"]).is_file() \
                and sha256_file(out / part["name"]) == previous["sha256"]:
            part.update(previous)
    _finish(fresh)
    return fresh



def _check_folder_identity(out: Path, identity: dict[str, Any]) -> None:
    """Refuse to add to a folder whose manifests (single run or any shard) describe another ingest."""
    for path in sorted(out.glob("manifest*.json")):
        old = read_json(path, "ingest manifest")
        for key in IDENTITY_KEYS:
            if old.get(key) != identity[key]:
                raise LangCellError(f"{path}: this folder holds an ingest with {key} = {json.dumps(old.get(key))}, "
                                    f"this run has {json.dumps(identity[key])}; rerun with the original arguments "
                                    "or use another --out")



def _remove_stale_temporaries(out: Path, parts: list[dict[str, Any]]) -> None:
    # A SIGKILLed writer leaves its temporary file; only this run's parts are touched because
    # other shards may be writing theirs into the same folder right now.
    for part in parts:
        final = out / part["name"]
        for tmp in final.parent.glob(f".{final.name}.*.tmp"):
            tmp.unlink(missing_ok=True)



def _finish(manifest: dict[str, Any]) -> None:
    parts = manifest["parts"]
    done = [part for part in parts if part["status"] == "done"]
    manifest["complete"] = len(done) == len(parts)
    manifest["n_cells"] = sum(part["rows"] for part in done)
    manifest["skipped_empty_cells"] = skipped = sum(part["empty_cells"] for part in done)
    manifest["warnings"] = [f"{skipped} cells without any count in the kept genes were skipped"] if skipped else []



def _verify_parts(out: Path, identity: dict[str, Any], parts: list[dict[str, Any]]) -> None:
    plan = identity["plan"]
    expected = [PART_NAME.format(n) for n in range(plan["n_parts"])]
    names = [part["name"] for part in parts]
    if names != expected:
        lacking = sorted(set(expected) - set(names)) or sorted(set(names) - set(expected))
        raise LangCellError(f"{out}: shard manifests do not list exactly the planned parts (e.g. {lacking[0]}); "
                            "rerun the shards with the same arguments")
    previous_max = -1
    for part in parts:
        path = out / part["name"]
        if not path.is_file():
            raise LangCellError(f"{path}: part listed as done is missing; rerun its shard")
        if sha256_file(path) != part["sha256"]:
            raise LangCellError(f"{path}: sha256 differs from the shard manifest; rerun its shard")
        joinids = pq.read_table(path, columns=["soma_joinid"])["soma_joinid"].to_numpy()
        if joinids.size != part["rows"] or part["rows"] + part["empty_cells"] != part["planned_rows"]:
            raise LangCellError(f"{path}: {joinids.size} rows, manifest says {part['rows']} of "
                                f"{part['planned_rows']} planned; rerun its shard")
        if joinids.size and (np.any(np.diff(joinids) <= 0) or joinids[0] < part["joinid_min"]
                             or joinids[-1] > part["joinid_max"]):
            raise LangCellError(f"{path}: soma_joinids unsorted, repeated or outside "
                                f"[{part['joinid_min']}, {part['joinid_max']}]; rerun its shard")
        if part["joinid_min"] <= previous_max:
            raise LangCellError(f"{path}: joinid range overlaps the previous part; rerun the shards")
        previous_max = part["joinid_max"]
    if sum(part["planned_rows"] for part in parts) != plan["n_cells"]:
        raise LangCellError(f"{out}: parts plan {sum(p['planned_rows'] for p in parts)} cells, the plan has "
                            f"{plan['n_cells']}; rerun the shards")


@contextlib.contextmanager
def _shard_lock(out: Path, index: int, count: int) -> Iterator[None]:
    """Shared lock on the folder (shards run side by side; merge and unsharded runs are kept out)
    plus an exclusive lock on this shard (the same array index never runs twice at once)."""
    with shared_lock(out, "an unsharded run or a merge"):
        with output_lock(out / ".shards" / f"{index}-of-{count}"):
            yield
