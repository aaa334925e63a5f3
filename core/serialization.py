"""Reading and writing adapter files: atomic writes, safe loads, local-or-Hub resolution.

Nothing here unpickles: ``.safetensors`` is read with safetensors, and a legacy ``adapter_model.bin``
only through ``torch.load(weights_only=True)``, which refuses any pickle that would run code.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from .errors import CheckpointError

__all__ = [
    "SAFETENSORS_NAME",
    "WEIGHTS_NAME",
    "atomic_write_bytes",
    "load_weights",
    "resolve_file",
    "resolve_weights",
    "serialize_safetensors",
]

SAFETENSORS_NAME = "adapter_model.safetensors"
WEIGHTS_NAME = "adapter_model.bin"
_TMP_PREFIX = ".peft-core-tmp-"


def _first_line(exc: BaseException) -> str:
    """``Type: first line of the message`` (an EOFError from a truncated pickle has an empty message)."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


def _write_chunks(fd: int, data: bytes) -> None:
    """Write all of ``data``: ``os.write`` may write fewer bytes than asked (a disk filling up, a signal), and
    ignoring its count would rename a silently truncated file into place."""
    view = memoryview(data)
    chunk = 1 << 22
    pos = 0
    while pos < len(view):
        n = os.write(fd, view[pos:pos + chunk])
        if n <= 0:
            raise OSError(errno.EIO, f"os.write wrote nothing at byte {pos} of {len(view)}")
        pos += n


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the new one, never a mix.

    The bytes go to a temporary file in the same folder, are flushed to disk, and replace the target
    with one ``os.replace``. On any error the temporary file is removed and the target is untouched.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=_TMP_PREFIX, dir=path.parent)
    try:
        try:
            _write_chunks(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def staged_files(folder: Path) -> Iterator[dict[str, bytes]]:
    """Collect several files' bytes, then write them all atomically once the block succeeds.

    Every file is fully written to its temporary name before the first one replaces its target, so
    a failure while writing leaves every previous file as it was, and no temporary file behind. The
    previous files are kept (hard links) until every rename is done: a rename that fails puts back the
    files already replaced. Names may include sub-folders. A process killed while writing leaves its
    ``.peft-core-tmp-*`` files (never read by loads; safe to delete when no save is running); killed
    between two of the final renames (microseconds), a folder can hold some new files beside old ones.
    """
    files: dict[str, bytes] = {}
    yield files
    folder.mkdir(parents=True, exist_ok=True)
    tmps: list[tuple[str, Path]] = []
    backups: dict[Path, str] = {}  # target -> a hard link to its previous content
    replaced: list[Path] = []
    try:
        for name, data in files.items():
            target = folder / name  # a name may have a sub-folder ("other/adapter_model.safetensors")
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=_TMP_PREFIX, dir=target.parent)
            tmps.append((tmp, target))
            try:
                _write_chunks(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
        for tmp, target in tmps:
            if target.is_file():
                backup = f"{tmp}.old"
                with contextlib.suppress(OSError):  # no hard links on this filesystem: no rollback of renames
                    os.link(target, backup)
                    backups[target] = backup
        for tmp, target in tmps:
            os.replace(tmp, target)
            replaced.append(target)
    except BaseException:
        for target in reversed(replaced):  # a rename failed: put the previous files back
            with contextlib.suppress(OSError):
                if target in backups:
                    os.replace(backups.pop(target), target)
                else:
                    os.unlink(target)
        for tmp, _ in tmps:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        raise
    finally:
        for backup in backups.values():
            with contextlib.suppress(FileNotFoundError):
                os.unlink(backup)


def serialize_safetensors(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> bytes:
    from safetensors.torch import save

    # safetensors wants contiguous, unshared CPU tensors; clones of small adapter tensors are cheap.
    plain = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    return save(plain, metadata=dict(metadata or {"format": "pt"}))


#: safetensors' own limit on the JSON header.
_MAX_HEADER = 100_000_000


def _check_safetensors_size(path: Path) -> None:
    """Refuse a file whose size is not what its header describes, before reading it whole: a file padded to
    gigabytes, or a header claiming more data than there is, costs one small read, not the file's size in
    memory. The full validation is safetensors' own, on the bytes, afterwards."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if n < 2 or n > _MAX_HEADER or 8 + n > size:
            raise ValueError(f"the file is {size} bytes and its first 8 bytes give a header of "
                             f"{n if n >= 0 else 'no'} bytes")
        header = f.read(n)
    try:
        meta = json.loads(header)
    except (ValueError, RecursionError):
        raise ValueError("its header is not JSON") from None
    if not isinstance(meta, dict):
        raise ValueError("its header is not a JSON object")
    end = 0
    for key, info in meta.items():
        if key == "__metadata__":
            continue
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2
                and all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)):
            raise ValueError(f"tensor {key[:100]!r} has no valid data_offsets in the header")
        end = max(end, offsets[1])
    if 8 + n + end != size:
        raise ValueError(f"the file is {size} bytes but its header describes {8 + n + end}")


def load_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """Load an adapter weights file (safetensors, or a weights-only ``.bin``) onto the CPU."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load

        try:
            _check_safetensors_size(path)
            data = path.read_bytes()
            return load(data)
        except (SafetensorError, ValueError, RuntimeError, OSError) as e:
            raise CheckpointError(f"{path}: not a valid safetensors file ({e}); it is truncated or corrupt. "
                                  "Download or save it again.") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError for a pickle that would run code, and anything torch raises
        raise CheckpointError(f"{path}: refused to load: only plain tensors are accepted from .bin files "
                              f"(torch.load weights_only=True said: {_first_line(e)[:300]}). "
                              "Convert it to safetensors from a trusted environment.") from None
    if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                            for k, v in obj.items()):
        raise CheckpointError(f"{path}: expected a mapping of names to tensors, got {type(obj).__name__}")
    return obj


def resolve_weights(model_id: str | Path, *, subfolder: str | None = None, revision: str | None = None,
                    **hub_kwargs: Any) -> Path:
    """The adapter's weights file at ``model_id`` (see :func:`resolve_file`): ``adapter_model.safetensors``, else
    the older ``adapter_model.bin``; a CheckpointError when there is neither."""
    for name in (SAFETENSORS_NAME, WEIGHTS_NAME):
        path = resolve_file(model_id, name, subfolder=subfolder, revision=revision, **hub_kwargs)
        if path is not None:
            return path
    raise CheckpointError(f"{model_id!s}: no {SAFETENSORS_NAME} or {WEIGHTS_NAME} found"
                          + (f" in subfolder {subfolder!r}" if subfolder else ""))


def resolve_file(model_id: str | Path, filename: str, *, subfolder: str | None = None,
                 revision: str | None = None, **hub_kwargs: Any) -> Path | None:
    """Path of ``filename`` in a local folder, or downloaded from the Hub repo ``model_id``.

    Returns None when the folder or repo exists but lacks the file. Hub downloads go through
    ``huggingface_hub.hf_hub_download``, so its cache, tokens and ``HF_HUB_OFFLINE`` apply.
    """
    local = Path(model_id)
    if local.is_dir():
        candidate = local / subfolder / filename if subfolder else local / filename
        return candidate if candidate.is_file() else None
    if isinstance(model_id, Path) or str(model_id).startswith((".", "/")) or str(model_id).count("/") > 1:
        raise CheckpointError(f"{model_id!s} is not a folder (and not a Hub repo id 'owner/name')")
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    kwargs = {k: v for k, v in hub_kwargs.items()
              if k in {"cache_dir", "force_download", "token", "local_files_only", "proxies"}}
    try:
        return Path(hf_hub_download(str(model_id), filename, subfolder=subfolder, revision=revision,
                                    **kwargs))
    except LocalEntryNotFoundError as e:  # a subclass of EntryNotFoundError in recent huggingface_hub
        raise CheckpointError(f"{model_id}: not a local folder, and {filename} is not in the Hub cache "
                              f"while offline or unreachable ({_first_line(e)}). Pass a local folder, "
                              "or go online.") from None
    except EntryNotFoundError:
        return None
    except Exception as e:
        raise CheckpointError(f"{model_id}: not a local folder, and the Hub could not provide {filename}: "
                              f"{_first_line(e)}") from None
