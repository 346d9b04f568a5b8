"""Checkpoint files: written atomically with a checksum, read back strictly, and loaded as a
model for inference without any training code (relaxation, the ASE calculator, evaluate).

Layout: one header line `molden-checkpoint 1 <payload bytes> <sha256 hex>\\n`, then the
payload, a `torch.save` of plain containers and tensors only, so it loads with
`weights_only=True` (a checkpoint cannot run code). Writing goes to a temporary file in the
same folder, fsynced, then renamed over the target: a crash leaves the old checkpoint or the
new one, never half of one.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from molden import __version__
from molden.errors import MoldenInputError
from molden.models.model import Model
from molden.models.spec import ModelSpec, build_model

MAGIC = b"molden-checkpoint"
FORMAT_VERSION = 1


def write_checkpoint(path: str | Path, payload: dict[str, Any]) -> Path:
    """Write `payload` (tensors, numbers, strings, lists and dicts of them) to `path` atomically."""
    path = Path(path)
    buffer = io.BytesIO()
    torch.save({**payload, "molden_version": __version__}, buffer)
    data = buffer.getvalue()
    header = b"%s %d %d %s\n" % (MAGIC, FORMAT_VERSION, len(data), hashlib.sha256(data).hexdigest().encode())
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(header)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    directory = os.open(path.parent, os.O_RDONLY)
    try:  # the rename itself survives a power cut only once the folder is synced
        os.fsync(directory)
    finally:
        os.close(directory)
    return path


def read_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """The payload of a checkpoint, after checking its size and SHA-256; `MoldenInputError`
    in one line for a missing, truncated, corrupted or foreign file."""
    path = Path(path)
    if not path.is_file():
        raise MoldenInputError(path, "no such checkpoint file")
    with open(path, "rb") as f:
        header = f.readline(256)
        parts = header.split()
        if len(parts) != 4 or parts[0] != MAGIC:
            raise MoldenInputError(path, "not a molden checkpoint (no molden-checkpoint header)")
        if int(parts[1]) > FORMAT_VERSION:
            raise MoldenInputError(path, f"checkpoint format {int(parts[1])} is newer than this molden reads "
                                         f"({FORMAT_VERSION}): upgrade molden")
        size, digest = int(parts[2]), parts[3].decode()
        data = f.read(size + 1)
    if len(data) != size:
        raise MoldenInputError(path, f"truncated checkpoint: {len(data)} of {size} payload bytes "
                                     "(an interrupted copy or a full disk?)")
    if hashlib.sha256(data).hexdigest() != digest:
        raise MoldenInputError(path, "checkpoint checksum mismatch: the file is corrupted")
    try:
        return torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except Exception as error:  # noqa: BLE001 - the checksum matched, so this is a foreign payload
        raise MoldenInputError(path, f"checkpoint payload cannot be read: {error}") from None


@dataclass
class LoadedModel:
    """A model ready for inference and what it was trained for."""

    model: Model
    spec: ModelSpec
    task: dict[str, Any]
    """The task's description from training (kind, target names, normalisation, units)."""
    path: Path


def load_model(path: str | Path, *, device: str | torch.device = "cpu", ema: bool = True,
               dtype: torch.dtype | None = None) -> LoadedModel:
    """The model of a checkpoint in eval mode, with the EMA weights when it has them (the
    weights molden validates and keeps as best), on `device`."""
    payload = read_checkpoint(path)
    if "model_spec" not in payload or "model" not in payload:
        raise MoldenInputError(path, "the checkpoint holds no model (model_spec and model missing)")
    spec = ModelSpec.model_validate_json(payload["model_spec"])
    model = build_model(spec)
    state = payload["ema"] if ema and payload.get("ema") is not None else payload["model"]
    expected = model.state_dict()
    for name in set(expected) - set(state):
        if name.endswith("element_reference"):  # checkpoints from before per-element offsets: none
            state[name] = torch.zeros_like(expected[name])
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    misshapen = sorted(k for k in set(expected) & set(state) if expected[k].shape != state[k].shape)
    if missing or unexpected or misshapen:
        parts = [f"{label} {names[:3]}{' …' if len(names) > 3 else ''}" for label, names in
                 (("missing", missing), ("unexpected", unexpected), ("wrong shape", misshapen)) if names]
        raise MoldenInputError(path, "the weights do not fit the model the checkpoint describes (written by another "
                                     f"molden version?): {'; '.join(parts)}")
    model.load_state_dict(state, strict=True)
    dtype = dtype or getattr(torch, str(payload.get("dtype", "float32")))
    model = model.to(device=device, dtype=dtype).eval()
    return LoadedModel(model=model, spec=spec, task=json.loads(payload.get("task", "{}")), path=Path(path))
