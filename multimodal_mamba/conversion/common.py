"""Shared pieces of the conversion tools: sources, checkpoint reading, sharded safetensors, output folders, CLI.

Every reading error is turned into a ``ValueError`` that names the file and the problem (missing, truncated,
not a checkpoint, keys or shapes that do not match the config); the command-line tools print it as
``<tool>: error: ...`` and exit with status 2.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pickle
import re
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence

import torch

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[A-Za-z0-9][\w.\-]*$")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Tensors kept in float32 whatever the target dtype (the SSM's decay and skip).
KEEP_FLOAT32 = re.compile(r"(^|\.)mixer\.(A_log|D)$")


# ------------------------------------------------------------------------------------------------------ sources
def looks_like_repo_id(value: str) -> bool:
    return bool(_REPO_ID.match(str(value))) and not str(value).startswith((".", "/", "~"))


def resolve_source(source, what: str, allow_patterns: Optional[Sequence[str]] = None) -> Path:
    """A local folder, or a Hub repo id downloaded with ``snapshot_download`` (only the ``allow_patterns`` files).

    ValueError when ``source`` is a file, or neither an existing folder nor a ``namespace/name`` repo id.
    """
    path = Path(os.path.expanduser(str(source)))
    if path.is_dir():
        return path
    if path.exists():
        raise ValueError(f"the {what} {source} is a file; expected a folder (or a Hub repo id)")
    if not looks_like_repo_id(str(source)):
        raise ValueError(f"the {what} {source} does not exist (expected a folder or a Hub repo id namespace/name)")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(str(source), allow_patterns=list(allow_patterns) if allow_patterns else None))
    except Exception as error:  # network, auth, missing repo: say which source failed
        raise ValueError(f"could not download the {what} {source!r} from the Hugging Face Hub: {error}") from error


def resolve_checkpoint_source(source, what: str, extra_patterns: Sequence[str] = ()) -> Path:
    """As ``resolve_source`` for a checkpoint: from the Hub, the JSON files, ``extra_patterns`` and the safetensors
    weights are downloaded, the ``.bin`` weights only when the repo has no safetensors (never both)."""
    base = ["*.json", *extra_patterns]
    folder = resolve_source(source, what, base + ["*.safetensors"])
    if Path(os.path.expanduser(str(source))).is_dir() or any(folder.glob("*.safetensors")):
        return folder
    return resolve_source(source, what, base + ["*.bin"])


def read_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise ValueError(f"the {what} has no {path.name} (looked for {path})")
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON (truncated?): {error}") from error
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


# ------------------------------------------------------------------------------------------- reading checkpoints
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


def _load_bin(path: Path) -> Dict[str, torch.Tensor]:
    """A ``.bin`` state dict through ``torch.load(weights_only=True)`` (memory-mapped when the format allows)."""
    try:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as error:
            if "mmap" not in str(error):
                raise
            state = torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) format
    except pickle.UnpicklingError as error:
        raise ValueError(
            f"{path} holds objects other than tensors, which torch.load(weights_only=True) refuses to unpickle: "
            f"{str(error).splitlines()[0]}"
        ) from error
    except (RuntimeError, EOFError, OSError, ValueError) as error:
        raise ValueError(
            f"{path} cannot be read as a PyTorch checkpoint (truncated or corrupt file?): {str(error).splitlines()[0]}"
        ) from error
    return _check_state_dict(state, path)


def _load_safetensors(path: Path) -> Dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return _check_state_dict(load_file(str(path), device="cpu"), path)
    except ValueError:
        raise
    except Exception as error:  # SafetensorError: bad header, file shorter than its header says, ...
        raise ValueError(f"{path} cannot be read as safetensors (truncated or corrupt file?): {error}") from error


def _check_state_dict(state, path: Path) -> Dict[str, torch.Tensor]:
    if not isinstance(state, Mapping):
        raise ValueError(f"{path} does not hold a state dict (name -> tensor) but a {type(state).__name__}")
    bad = [key for key, value in state.items() if not isinstance(value, torch.Tensor)]
    if bad:
        raise ValueError(
            f"{path} is not a plain state dict: {bad[:5]} are not tensors (a training checkpoint? extract its "
            "model state dict first)"
        )
    return dict(state)


def load_state_dict(folder: Path, what: str) -> Dict[str, torch.Tensor]:
    """The weights of the checkpoint in ``folder``: ``model.safetensors``, ``pytorch_model.bin`` or their sharded
    forms (``*.index.json`` + shards), safetensors preferred. ValueError naming the file on any problem."""
    folder = Path(folder)
    for name in WEIGHT_FILES:
        path = folder / name
        if not path.is_file():
            continue
        if not name.endswith(".index.json"):
            return _load_safetensors(path) if name.endswith(".safetensors") else _load_bin(path)
        index = read_json(path, what)
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{path} has no weight_map")
        state: Dict[str, torch.Tensor] = {}
        for shard in sorted(set(weight_map.values())):
            shard_path = folder / shard
            if not shard_path.is_file():
                raise ValueError(f"{path} lists the shard {shard}, which is missing from {folder}")
            state.update(_load_safetensors(shard_path) if shard.endswith(".safetensors") else _load_bin(shard_path))
        missing = sorted(set(weight_map) - set(state))
        if missing:
            raise ValueError(f"the shards of {path} lack {len(missing)} tensor(s) listed in its weight_map: {missing[:5]}")
        return state
    raise ValueError(f"the {what} {folder} has no weights (looked for {', '.join(WEIGHT_FILES)})")


def compare_state_dict(state: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Size], what: str,
                       optional: Iterable[str] = ()) -> None:
    """ValueError listing missing, unexpected and wrongly shaped tensors of ``state`` against ``expected`` shapes
    (names in ``optional`` may be absent)."""
    optional = set(optional)
    missing = sorted(set(expected) - set(state) - optional)
    unexpected = sorted(set(state) - set(expected))
    wrong = [f"{name}: {tuple(state[name].shape)} (expected {tuple(expected[name])})"
             for name in sorted(set(state) & set(expected)) if tuple(state[name].shape) != tuple(expected[name])]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing tensor(s): {missing[:6]}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected tensor(s): {unexpected[:6]}")
    if wrong:
        problems.append(f"{len(wrong)} tensor(s) with the wrong shape: {wrong[:6]}")
    if problems:
        raise ValueError(f"the {what} does not match its config: " + "; ".join(problems))


def cast_state_dict(state: Dict[str, torch.Tensor], dtype: Optional[torch.dtype]) -> Dict[str, torch.Tensor]:
    """Cast floating tensors to ``dtype`` (None: unchanged); ``mixer.A_log`` and ``mixer.D`` become float32."""
    out = {}
    for name, tensor in state.items():
        if KEEP_FLOAT32.search(name):
            tensor = tensor.to(torch.float32)
        elif dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        out[name] = tensor
    return out


# ---------------------------------------------------------------------------------------- writing checkpoints
def write_sharded_safetensors(state: Mapping[str, torch.Tensor], folder: Path, max_shard_size="5GB",
                              progress: bool = True) -> List[str]:
    """Write ``state`` as transformers does: ``model.safetensors``, or ``model-0000i-of-0000n.safetensors`` plus
    ``model.safetensors.index.json`` when it exceeds ``max_shard_size`` (bytes or a string such as "5GB").

    A progress bar (bytes) runs over the tensors as they are read (memory-mapped inputs are read here) and
    written. Returns the written file names.
    """
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    split = split_torch_state_dict_into_shards(
        dict(state), filename_pattern="model{suffix}.safetensors", max_shard_size=max_shard_size
    )
    total = sum(t.numel() * t.element_size() for t in state.values())
    written = []
    with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="Writing safetensors",
              disable=not progress) as bar:
        for filename, names in split.filename_to_tensors.items():
            shard, seen = {}, set()
            for name in names:
                tensor = state[name].contiguous()
                key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset())
                shard[name] = tensor.clone() if key in seen else tensor  # safetensors refuses shared memory
                seen.add(key)
                bar.update(tensor.numel() * tensor.element_size())
            save_file(shard, str(Path(folder) / filename), metadata={"format": "pt"})
            written.append(filename)
    if split.is_sharded:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(split.tensor_to_filename.items()))}
        with open(Path(folder) / "model.safetensors.index.json", "w", encoding="utf-8") as handle:
            json.dump(index, handle, indent=2)
            handle.write("\n")
        written.append("model.safetensors.index.json")
    return written


# --------------------------------------------------------------------------------------------- output folders
def check_output_dir(output_dir, overwrite: bool, sources: Iterable = ()) -> Path:
    """The absolute output folder, after refusing: an existing non-empty folder without ``overwrite``; a file; a
    folder that is, or contains, one of the ``sources`` (overwriting it would destroy the input)."""
    out = Path(os.path.expanduser(str(output_dir))).absolute()
    if out.exists() and not out.is_dir():
        raise ValueError(f"the output {out} exists and is not a folder")
    for source in sources:
        if source is None:
            continue
        src = Path(os.path.expanduser(str(source))).absolute()
        if src.exists() and (src == out or out in src.parents):
            raise ValueError(f"the output folder {out} is (or contains) the input {src}: choose another output")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ValueError(f"the output folder {out} already exists and is not empty: pass --overwrite to replace it")
    return out


@contextlib.contextmanager
def staged_output(output_dir, overwrite: bool, sources: Iterable = ()) -> Iterator[Path]:
    """Yield a fresh staging folder beside ``output_dir``; on success it replaces ``output_dir`` (which must be
    empty or absent unless ``overwrite``); on failure it is deleted and ``output_dir`` is left untouched."""
    out = check_output_dir(output_dir, overwrite, sources)
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        yield stage
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    if out.exists():
        old = out.with_name(f".{out.name}.old-{uuid.uuid4().hex[:8]}")
        out.rename(old)
        stage.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        stage.rename(out)


# ------------------------------------------------------------------------------------------------------- CLI
def add_output_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing non-empty output folder (refused by default)")
    parser.add_argument("--max-shard-size", default="5GB",
                        help="split the weights into safetensors shards of at most this size (default: 5GB)")
    parser.add_argument("--dtype", default="auto", choices=["auto", *DTYPES],
                        help="dtype of the written weights; auto keeps the input's (A_log and D stay float32)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def run_cli(parser: argparse.ArgumentParser, run: Callable[[argparse.Namespace], object],
            argv: Optional[Sequence[str]] = None) -> int:
    """Parse ``argv`` and run; a ValueError (bad or mismatched input) ends the tool with ``prog: error: ...``."""
    args = parser.parse_args(argv)
    try:
        run(args)
    except ValueError as error:
        parser.exit(2, f"{parser.prog}: error: {error}\n")
    return 0
