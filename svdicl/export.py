"""Save a pruned model so any tool can load it: a dense Hugging Face folder plus the edit record."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from svdicl.errors import SvdiclError
from svdicl.models import LoadedModel
from svdicl.provenance import versions
from svdicl.prune import EditRecord

EDIT_FILE = "svdicl_edit.json"


def prepare_output(path: str | Path, overwrite: bool = False) -> Path:
    """An empty folder to write into; a non-empty one is refused unless `overwrite`."""
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise SvdiclError(f"output {folder} is a file; choose a folder path")
    if folder.is_dir() and any(folder.iterdir()):
        if not overwrite:
            raise SvdiclError(f"output folder {folder} is not empty; choose a new folder or pass --overwrite")
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def save_dense(loaded: LoadedModel, record: EditRecord, path: str | Path, overwrite: bool = False) -> Path:
    """save_pretrained (safetensors) + tokenizer + svdicl_edit.json; plain transformers reloads it."""
    folder = prepare_output(path, overwrite)
    loaded.model.save_pretrained(folder)
    loaded.tokenizer.save_pretrained(folder)
    edit = {
        "source": loaded.source,
        "source_fingerprint": loaded.fingerprint,
        "dtype": loaded.dtype,
        "format": "dense",
        "edit": record.to_dict(),
        "versions": versions(),
    }
    (folder / EDIT_FILE).write_text(json.dumps(edit, indent=2) + "\n")
    return folder
