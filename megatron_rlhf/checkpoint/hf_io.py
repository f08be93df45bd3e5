"""Read and write Hugging Face checkpoints (safetensors, single file or sharded with an index).

:class:`HFWeightReader` opens tensors lazily, one at a time, so a rank reads only what its shard
needs. Missing files, a missing tensor, an index naming a missing shard or a corrupt safetensors
file raise :class:`HFCheckpointError` naming the file. :class:`HFWeightWriter` writes tensors as
they arrive into size-bounded shards plus ``model.safetensors.index.json``.

Files that travel with a model (tokenizer, generation config, chat template) are listed in
:data:`SIDE_FILES` and copied by :func:`copy_side_files`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from megatron_rlhf.config.errors import MissingInput, UserError

SIDE_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
)
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
SAFETENSORS_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}
"""safetensors header dtype -> the name ModelBuildConfig.params_dtype uses."""


class HFCheckpointError(UserError):
    """An HF checkpoint directory is missing files or holds unreadable ones."""


class HFWeightReader:
    """Lazy access to the tensors of an HF checkpoint directory."""

    def __init__(self, hf_dir: str | Path):
        self.directory = Path(hf_dir)
        if not self.directory.is_dir():
            raise MissingInput(f"{self.directory}: Hugging Face model directory not found")
        self._file_of: dict[str, Path] = {}
        index = self.directory / INDEX_FILE
        single = self.directory / SINGLE_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as error:
                raise HFCheckpointError(f"{index}: not a valid safetensors index ({error})") from error
            names_in: dict[Path, set[str]] = {}
            for name, file_name in weight_map.items():
                self._file_of[name] = self.directory / file_name
                names_in.setdefault(self.directory / file_name, set()).add(name)
            for path in sorted(names_in):
                if not path.is_file():
                    raise HFCheckpointError(f"{index} names shard {path.name}, which is missing")
                # Reads only the header: a corrupt or truncated shard fails here, not in a worker.
                absent = sorted(names_in[path] - set(self._open(path).keys()))
                if absent:
                    raise HFCheckpointError(
                        f"{index} places {len(absent)} tensors in {path.name} that it does not "
                        f"hold, e.g. {absent[0]!r}"
                    )
        elif single.is_file():
            for name in self._open(single).keys():
                self._file_of[name] = single
        else:
            found = sorted(p.name for p in self.directory.iterdir())[:10]
            raise HFCheckpointError(
                f"{self.directory}: no {SINGLE_FILE} or {INDEX_FILE} (only safetensors "
                f"checkpoints are supported); found {found}"
            )
        self._handles: dict[Path, object] = {}

    def _open(self, path: Path):
        from safetensors import SafetensorError, safe_open

        try:
            return safe_open(str(path), framework="pt", device="cpu")
        except (SafetensorError, OSError, ValueError) as error:
            raise HFCheckpointError(f"{path}: cannot read safetensors file ({error})") from error

    def names(self) -> list[str]:
        return sorted(self._file_of)

    def dtype_name(self, name: str) -> str | None:
        """Stored dtype of ``name`` ("float32", "bfloat16", "float16"), read from the header only;
        None for other dtypes or a missing tensor."""
        path = self._file_of.get(name)
        if path is None:
            return None
        stored = self._open(path).get_slice(name).get_dtype()  # type: ignore[attr-defined]
        return SAFETENSORS_DTYPES.get(stored)

    def __contains__(self, name: str) -> bool:
        return name in self._file_of

    def get(self, name: str) -> torch.Tensor:
        """The full tensor ``name`` (a fresh CPU tensor)."""
        path = self._file_of.get(name)
        if path is None:
            raise HFCheckpointError(
                f"{self.directory}: tensor {name!r} is not in the checkpoint "
                f"({len(self._file_of)} tensors present)"
            )
        if path not in self._handles:
            self._handles[path] = self._open(path)
        from safetensors import SafetensorError

        try:
            return self._handles[path].get_tensor(name)  # type: ignore[attr-defined]
        except (SafetensorError, OSError, ValueError, RuntimeError) as error:
            raise HFCheckpointError(f"{path}: cannot read tensor {name!r} ({error})") from error


class HFWeightWriter:
    """Write tensors into ``model-0000i-of-0000n.safetensors`` shards of bounded size."""

    def __init__(self, out_dir: str | Path, max_shard_bytes: int = 2 * 1024**3):
        self.directory = Path(out_dir)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.max_shard_bytes = max_shard_bytes
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._shards: list[dict[str, torch.Tensor] | list[str]] = []
        self._written: list[tuple[Path, list[str]]] = []
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self._pending or any(name in names for _, names in self._written):
            raise ValueError(f"tensor {name!r} written twice")
        size = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + size > self.max_shard_bytes:
            self._flush()
        self._pending[name] = tensor.detach().to("cpu").contiguous()
        self._pending_bytes += size
        self.total_bytes += size

    def _flush(self) -> None:
        from safetensors.torch import save_file

        path = self.directory / f"model-part{len(self._written):05d}.safetensors"
        save_file(self._pending, str(path), metadata={"format": "pt"})
        self._written.append((path, list(self._pending)))
        self._pending, self._pending_bytes = {}, 0

    def close(self) -> None:
        """Write the last shard and name the files (single file when one shard suffices)."""
        if self._pending or not self._written:
            self._flush()
        if len(self._written) == 1:
            self._written[0][0].rename(self.directory / SINGLE_FILE)
            return
        count = len(self._written)
        weight_map = {}
        for number, (path, names) in enumerate(self._written, start=1):
            final = self.directory / f"model-{number:05d}-of-{count:05d}.safetensors"
            path.rename(final)
            weight_map.update({name: final.name for name in names})
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
        (self.directory / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True))


def copy_side_files(source: str | Path, destination: str | Path, include_config: bool = True) -> list[str]:
    """Copy tokenizer/config side files that exist in ``source``; returns the names copied."""
    source, destination = Path(source), Path(destination)
    destination.mkdir(parents=True, exist_ok=True)
    copied = []
    for name in SIDE_FILES:
        if name == "config.json" and not include_config:
            continue
        if (source / name).is_file():
            shutil.copy2(source / name, destination / name)
            copied.append(name)
    return copied
