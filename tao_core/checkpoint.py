"""The checkpoint format: safetensors for tensors, JSON for the rest, a manifest written last.

A checkpoint is a directory::

    step-00010/
      trainable.safetensors   the trainable weights, by parameter name
      optimizer.safetensors   optimizer tensors (``state/<param index>/<name>``) and RNG tensors
      trainer.json            step, optimizer hyper-parameters, RNG states that are plain numbers
      pipeline.json           the pipeline's own state (step, best, guard, ...)
      pipeline.safetensors    only when the pipeline keeps tensors (a frozen or EMA teacher):
                              ``pipeline_state["tensors"]`` on write and read
      manifest.json           written last: every other file's size and SHA-256

A *sharded* checkpoint (``distributed.strategy = "fsdp"``, :mod:`tao_core.dist_checkpoint`) has,
instead of ``trainable.safetensors``, each rank's rows of every sharded tensor (weights and
optimizer moments alike) and an index of where each tensor's rows are::

      shards/rank-00000-of-00002.safetensors   rank 0's rows: ``trainable/<name>``, ``state/<i>/<name>``
      shards/rank-00001-of-00002.safetensors
      shards.json                              key -> {"shape", "pieces": [[rank, first row, end row], ...]}

(``optimizer.safetensors`` then holds the RNG tensors and the optimizer tensors that are not sharded,
such as AdamW's step counts.) :func:`read` assembles the full tensors, so any process count resumes
it; :class:`Rows` reads only the rows a rank asks for, from either layout.

Nothing in it is pickled, so loading a checkpoint cannot run code; the shard files are listed in
the same manifest. A directory without a manifest, or
whose files do not match it, is not a checkpoint: :func:`verify` says why, and the run directory
falls back to the previous one (see :meth:`tao_core.rundir.RunDir.load_checkpoint`).

Checkpoints written before this format (``trainer.pt`` + ``pipeline.json``, no manifest) still
load, with ``torch.load(weights_only=True)``: tensors, containers, numbers and NumPy's RNG arrays
only, never arbitrary objects.
"""

from __future__ import annotations

import hashlib
import json
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from tao_core.errors import TaoInputError
from tao_core.fsio import fault_point, write_file

FORMAT = "tao-checkpoint"
VERSION = 1
MANIFEST = "manifest.json"
LEGACY_TRAINER = "trainer.pt"


class CheckpointError(TaoInputError):
    """A checkpoint directory that is incomplete, corrupt or of an unknown format."""


# -- trainer state <-> (tensors, JSON) ------------------------------------------------------------
def _rng_to_parts(rng: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    version, internal, gauss = rng["python"]
    name, keys, pos, has_gauss, cached = rng["numpy"]
    tensors = {"rng/torch": rng["torch"].clone()}
    for i, s in enumerate(rng.get("cuda", [])):
        tensors[f"rng/cuda/{i}"] = s.clone()
    meta = {"python": [version, list(internal), gauss],
            "numpy": {"name": name, "keys": [int(k) for k in keys], "pos": int(pos),
                      "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
            "cuda_devices": len(rng.get("cuda", []))}
    return tensors, meta


def _rng_from_parts(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    version, internal, gauss = meta["python"]
    np_state = meta["numpy"]
    rng: dict[str, Any] = {
        "python": (version, tuple(internal), gauss),
        "numpy": (np_state["name"], np.array(np_state["keys"], dtype=np.uint32), np_state["pos"],
                  np_state["has_gauss"], np_state["cached_gaussian"]),
        "torch": tensors["rng/torch"],
    }
    if meta.get("cuda_devices"):
        rng["cuda"] = [tensors[f"rng/cuda/{i}"] for i in range(meta["cuda_devices"])]
    return rng


def trainer_state_to_parts(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor],
                                                           dict[str, Any]]:
    """Split a :meth:`Trainer.state_dict` into (trainable tensors, other tensors, JSON metadata)."""
    trainable = {n: t.detach().cpu().contiguous().clone() for n, t in state["trainable"].items()}
    opt = state["optimizer"]
    others: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, per_param in opt["state"].items():
        for key, value in per_param.items():
            if isinstance(value, torch.Tensor):
                others[f"state/{idx}/{key}"] = value.detach().cpu().contiguous().clone()
            else:
                scalars.setdefault(str(idx), {})[key] = value
    rng_tensors, rng_meta = _rng_to_parts(state["rng"])
    others.update(rng_tensors)
    meta = {"step": int(state["step"]), "param_groups": opt["param_groups"], "state_scalars": scalars,
            "state_params": [int(i) for i in opt["state"]], "rng": rng_meta}
    return trainable, others, meta


def trainer_state_from_parts(trainable: dict[str, torch.Tensor], others: dict[str, torch.Tensor],
                             meta: dict[str, Any]) -> dict[str, Any]:
    """The inverse of :func:`trainer_state_to_parts`."""
    opt_state: dict[int, dict[str, Any]] = {int(i): {} for i in meta["state_params"]}
    for key, value in others.items():
        if key.startswith("state/"):
            _, idx, name = key.split("/", 2)
            opt_state.setdefault(int(idx), {})[name] = value
    for idx, values in meta["state_scalars"].items():
        opt_state.setdefault(int(idx), {}).update(values)
    groups = [{**g, "betas": tuple(g["betas"])} if "betas" in g else g for g in meta["param_groups"]]
    return {"step": meta["step"], "trainable": trainable, "optimizer": {"state": opt_state, "param_groups": groups},
            "rng": _rng_from_parts(others, meta["rng"])}


# -- files ----------------------------------------------------------------------------------------
def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


PIPELINE_TENSORS = "tensors"  # the pipeline state's key for its tensors, stored in pipeline.safetensors


def write(directory: Path, trainer_state: dict[str, Any], pipeline_state: dict[str, Any]) -> None:
    """Write a complete checkpoint into the (new, empty) ``directory``; the manifest comes last."""
    trainable, others, meta = trainer_state_to_parts(trainer_state)
    pipeline_state = dict(pipeline_state)
    tensors = pipeline_state.pop(PIPELINE_TENSORS, None)  # e.g. a teacher's weights
    files = {
        "trainable.safetensors": st_save(trainable),
        "optimizer.safetensors": st_save(others),
        "trainer.json": json.dumps(meta).encode(),
        "pipeline.json": json.dumps(pipeline_state, indent=2).encode(),
    }
    if tensors:
        files["pipeline.safetensors"] = st_save({k: v.detach().cpu().contiguous() for k, v in tensors.items()})
    for name, data in files.items():
        write_file(directory / name, data)
    fault_point("checkpoint.before-manifest")
    manifest = {"format": FORMAT, "version": VERSION, "step": meta["step"],
                "files": {name: {"bytes": len(data), "sha256": _sha256(data)} for name, data in files.items()}}
    write_file(directory / MANIFEST, json.dumps(manifest, indent=2))


def _read_manifest(directory: Path) -> dict[str, Any]:
    path = directory / MANIFEST
    try:
        manifest = json.loads(path.read_bytes())
    except FileNotFoundError:
        raise CheckpointError(f"{directory}: no {MANIFEST} (the checkpoint was not finished)") from None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: unreadable manifest ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or not isinstance(manifest.get("files"), dict):
        raise CheckpointError(f"{path}: not a {FORMAT} manifest")
    if manifest.get("version") != VERSION:
        raise CheckpointError(f"{path}: checkpoint format version {manifest.get('version')!r}; this tao reads "
                              f"version {VERSION}")
    return manifest


def _verified_bytes(directory: Path, manifest: dict[str, Any], name: str) -> bytes:
    entry = manifest["files"].get(name)
    if not isinstance(entry, dict):
        raise CheckpointError(f"{directory}: {MANIFEST} does not list {name}")
    try:
        data = (directory / name).read_bytes()
    except OSError as e:
        raise CheckpointError(f"{directory / name}: cannot read ({e.strerror or e})") from None
    if len(data) != entry.get("bytes"):
        raise CheckpointError(f"{directory / name}: {len(data)} bytes, the manifest says {entry.get('bytes')} "
                              "(truncated or replaced)")
    if _sha256(data) != entry.get("sha256"):
        raise CheckpointError(f"{directory / name}: SHA-256 differs from the manifest (corrupt)")
    return data


def read(directory: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """Verify and load a checkpoint: ``(trainer_state, pipeline_state)``; :class:`CheckpointError` if invalid."""
    if not (directory / MANIFEST).exists() and (directory / LEGACY_TRAINER).exists():
        return _read_legacy(directory)
    manifest = _read_manifest(directory)
    try:
        others = st_load(_verified_bytes(directory, manifest, "optimizer.safetensors"))
        if SHARD_INDEX in manifest["files"]:
            trainable = _assemble(directory, manifest, others)
        else:
            trainable = st_load(_verified_bytes(directory, manifest, "trainable.safetensors"))
        meta = json.loads(_verified_bytes(directory, manifest, "trainer.json"))
        pipeline_state = json.loads(_verified_bytes(directory, manifest, "pipeline.json"))
        if "pipeline.safetensors" in manifest["files"]:
            pipeline_state[PIPELINE_TENSORS] = st_load(_verified_bytes(directory, manifest, "pipeline.safetensors"))
        return trainer_state_from_parts(trainable, others, meta), pipeline_state
    except CheckpointError:
        raise
    except Exception as e:  # files that match their hashes but do not parse: written by something else
        raise CheckpointError(f"{directory}: files match the manifest but do not load ({type(e).__name__}: {e})") from None


# -- sharded checkpoints ---------------------------------------------------------------------------
SHARD_INDEX = "shards.json"
TRAINABLE = "trainable/"  # key prefix of the weights in shard files (optimizer tensors: "state/")


def shard_file(rank: int, world_size: int) -> str:
    """The file of rank ``rank``'s rows in a checkpoint written by ``world_size`` ranks."""
    return f"shards/rank-{rank:05d}-of-{world_size:05d}.safetensors"


def _assemble(directory: Path, manifest: dict[str, Any], others: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every sharded tensor whole: trainable weights returned by name, optimizer ones added to ``others``."""
    index = json.loads(_verified_bytes(directory, manifest, SHARD_INDEX))
    world = int(index["world_size"])
    files = [st_load(_verified_bytes(directory, manifest, shard_file(r, world))) for r in range(world)]
    trainable = {}
    for key, entry in index["tensors"].items():
        pieces = [files[r][key] for r, start, stop in entry["pieces"] if stop > start]
        full = torch.cat(pieces) if pieces else torch.empty(entry["shape"])
        if list(full.shape) != entry["shape"]:
            raise CheckpointError(f"{directory}: {key} assembles to {list(full.shape)}, the index says {entry['shape']}")
        if key.startswith(TRAINABLE):
            trainable[key[len(TRAINABLE):]] = full
        else:
            others[key] = full
    return trainable


def verify(directory: Path) -> tuple[dict[str, Any], dict[str, Any], dict[str, torch.Tensor]]:
    """Check every file of a checkpoint against its manifest without assembling its tensors:
    ``(trainer meta, pipeline_state, small tensors)``, for :class:`Rows` to read from afterwards."""
    manifest = _read_manifest(directory)
    try:
        for name in manifest["files"]:
            if name not in ("trainer.json", "pipeline.json", "optimizer.safetensors"):
                _verified_bytes(directory, manifest, name)
        meta = json.loads(_verified_bytes(directory, manifest, "trainer.json"))
        pipeline_state = json.loads(_verified_bytes(directory, manifest, "pipeline.json"))
        others = st_load(_verified_bytes(directory, manifest, "optimizer.safetensors"))
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 (as in read: files that match their hashes but do not parse)
        raise CheckpointError(f"{directory}: files match the manifest but do not load ({type(e).__name__}: {e})") from None
    if "pipeline.safetensors" in manifest["files"]:
        pipeline_state[PIPELINE_TENSORS] = st_load(_verified_bytes(directory, manifest, "pipeline.safetensors"))
    return meta, pipeline_state, others


class Rows:
    """Rows ``[start, stop)`` of a checkpoint's weights and optimizer tensors, read from disk without
    loading the rest: from the shard files of a sharded checkpoint, or from ``trainable.safetensors``
    / ``optimizer.safetensors`` of a whole one. Keys: ``trainable/<name>``, ``state/<i>/<name>``.
    It checks no hash: :func:`verify` the directory first (rank 0 does, before the others read)."""

    def __init__(self, directory: Path) -> None:
        from safetensors import safe_open

        self.directory = directory
        self._open = lambda name: safe_open(str(directory / name), framework="pt")
        index = directory / SHARD_INDEX
        self.index = json.loads(index.read_bytes())["tensors"] if index.exists() else None
        self._world = json.loads(index.read_bytes())["world_size"] if index.exists() else 1

    def has(self, key: str) -> bool:
        if self.index is not None:
            return key in self.index
        name, inner = self._whole(key)
        with self._open(name) as f:
            return inner in f.keys()

    def _whole(self, key: str) -> tuple[str, str]:
        if key.startswith(TRAINABLE):
            return "trainable.safetensors", key[len(TRAINABLE):]
        return "optimizer.safetensors", key

    def read(self, key: str, start: int, stop: int) -> torch.Tensor:
        if self.index is None:
            name, inner = self._whole(key)
            with self._open(name) as f:
                return f.get_slice(inner)[start:stop]
        entry = self.index.get(key)
        if entry is None:
            raise CheckpointError(f"{self.directory}: {SHARD_INDEX} has no tensor {key!r}")
        parts = []
        for rank, first, end in entry["pieces"]:
            lo, hi = max(first, start), min(end, stop)
            if lo < hi:
                with self._open(shard_file(rank, self._world)) as f:
                    parts.append(f.get_slice(key)[lo - first:hi - first])
        got = sum(p.shape[0] for p in parts)
        if got != stop - start:
            raise CheckpointError(f"{self.directory}: rows {start}-{stop} of {key} are not all in the shard files")
        return torch.cat(parts)


def _read_legacy(directory: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """A checkpoint from before the manifest: ``trainer.pt`` read with ``weights_only=True``."""
    multiarray = getattr(np, "_core", None) or np.core  # numpy 2 / numpy 1
    safe = [np.ndarray, np.dtype, np.dtypes.UInt32DType, multiarray.multiarray._reconstruct]
    try:
        pipeline_state = json.loads((directory / "pipeline.json").read_bytes())
        with torch.serialization.safe_globals(safe):
            trainer_state = torch.load(directory / LEGACY_TRAINER, weights_only=True, map_location="cpu")
    except FileNotFoundError as e:
        raise CheckpointError(f"{directory}: {Path(e.filename).name} is missing") from None
    except pickle.UnpicklingError:
        raise CheckpointError(f"{directory}: cannot load the (pre-manifest) checkpoint: its pickle holds objects "
                              "other than tensors and plain data, which tao never unpickles") from None
    except Exception as e:  # a truncated zip, bad JSON
        raise CheckpointError(f"{directory}: cannot load the (pre-manifest) checkpoint: {type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''}") from None
    if not isinstance(trainer_state, dict) or not {"step", "trainable", "optimizer", "rng"} <= set(trainer_state):
        raise CheckpointError(f"{directory / LEGACY_TRAINER}: not a tao trainer state")
    return trainer_state, pipeline_state


def is_checkpoint_name(name: str) -> bool:
    return name.startswith("step-") and name[5:].isdigit()
