"""Warm starts: encoder weights from pretrained checkpoints instead of random ones.

LangCell starts its text encoder from PubMedBERT. This module finds a checkpoint (`init_from`:
a local folder or an HF id) and reads its weight file; `pretrain.model.build_text_encoder`
maps the names (`model.text.init_from`).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from langcell.errors import LangCellError


def resolve_pretrained(spec: str, field: str, files: tuple[str, ...]) -> Path:
    """A local folder for `spec`: an existing folder, or an HF id `owner/name[@revision][/subfolder]`
    (the path syntax of huggingface_hub's HfFileSystem) whose `files` (glob patterns) are fetched
    with snapshot_download, from the local cache only when HF_HUB_OFFLINE is set."""
    folder = Path(spec).expanduser()
    if not folder.is_dir():
        if spec.startswith((".", "/", "~")):
            raise LangCellError(f"{field} '{spec}': folder does not exist; give an existing local folder or an HF id")
        folder = _download(spec, field, files)
    if not (folder / "config.json").is_file():
        raise LangCellError(f"{field} '{spec}': no config.json in {folder}; name the folder that holds the model "
                            "(owner/name[@revision]/subfolder)")
    return folder


def _download(spec: str, field: str, files: tuple[str, ...]) -> Path:
    repo, revision, subfolder = _parse_hub_id(spec)
    try:
        from huggingface_hub import snapshot_download
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false")
        root = snapshot_download(repo, revision=revision, local_files_only=offline,
                                 allow_patterns=[f"{subfolder}/{f}" if subfolder else f for f in files])
    except Exception as exc:  # the hub raises many types; all mean "not available here"
        command = " ".join(["hf download", repo, *(["--revision", revision] if revision else []),
                            *(["--include", f"{subfolder}/*"] if subfolder else [])])
        raise LangCellError(f"{field} '{spec}': not a local folder and not available from the HF hub "
                            f"({type(exc).__name__}); download it first ({command}) or give a local folder") from None
    return Path(root) / subfolder


def _parse_hub_id(spec: str) -> tuple[str, str | None, str]:
    """(repo id, revision or None, subfolder or '') of `owner/name[@revision][/subfolder]`."""
    owner, _, rest = spec.partition("/")
    name_rev, _, subfolder = rest.partition("/")
    name, _, revision = name_rev.partition("@")
    return (f"{owner}/{name}" if name else owner), (revision or None), subfolder.strip("/")


def read_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    if (folder / "model.safetensors").is_file():
        from safetensors.torch import load_file
        return load_file(str(folder / "model.safetensors"))
    if (folder / "pytorch_model.bin").is_file():
        return torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True)
    raise LangCellError(f"{folder}: no model.safetensors or pytorch_model.bin; re-export the checkpoint")
