"""Hugging Face checkpoints in and out: config.json + *.safetensors <-> a covjax Transformer.

Loading never holds two full copies of the weights on the host: every safetensors file is
memory-mapped, each covjax parameter is built with `jax.make_array_from_callback`, and the
callback copies only the slice that one device owns (converted to the covjax layout as a
zero-copy view first). safetensors' own numpy loader is not used for reading because numpy
cannot name bfloat16 (the dtype of most released checkpoints) and it copies whole tensors.

Saving never holds the model on the host either: `save_pretrained` gathers one tensor at a time
and streams it into its safetensors file, whose header the tensors' shapes fix in advance
(safetensors' own `save_file` wants every tensor of a file at once), to a local folder or an
object store (etils.epath).
"""

from __future__ import annotations

import collections
import json
import math
import os
import pathlib
import struct
import tempfile
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import chex
import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from flax import nnx
from huggingface_hub import split_state_dict_into_shards_factory
from jax.sharding import Mesh, SingleDeviceSharding
from jax.typing import DTypeLike

from covjax import multihost, storage
from covjax.model.config import ModelConfig
from covjax.model.transformer import Transformer
from covjax.sharding import logical_sharding

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

_ST_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": jnp.bfloat16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}
_ST_NAMES = {np.dtype(t): name for name, t in _ST_DTYPES.items()}
# Weight file names as transformers writes them: model.safetensors, or shards
# model-00001-of-00003.safetensors listed by the index.
_SHARD_PATTERN = "model{suffix}.safetensors"
_INDEX_FILE = "model.safetensors.index.json"
# An export is complete once this file, written last, is in its folder; until then it is written
# under its name + PARTIAL_SUFFIX on a local file system.
EXPORT_COMPLETE_FILE = "config.json"
PARTIAL_SUFFIX = ".partial"
MAX_SHARD_SIZE = "5GB"  # transformers' default
# Bytes per write of a tensor: a file object that takes only bytes (TF's gfile under etils) gets
# copies of at most this much, never of the whole tensor.
_WRITE_CHUNK = 64 * 2**20
# The files one of which every transformers tokenizer loads its vocabulary from.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt")
# Buffers some checkpoints carry that the model recomputes.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


class _SafetensorsFile:
    """Zero-copy numpy views of the tensors of one .safetensors file (8-byte header length,
    JSON header with dtype / shape / data_offsets, then the raw little-endian data)."""

    def __init__(self, path: str):
        try:
            with open(path, "rb") as f:
                (header_len,) = struct.unpack("<Q", f.read(8))
                if header_len > os.path.getsize(path) - 8:
                    raise ValueError(f"its header length {header_len} exceeds the file")
                header = json.loads(f.read(header_len))
        except (struct.error, ValueError) as e:  # too short, or a header that is not JSON
            raise ValueError(f"{path} is not a safetensors file: {e}") from e
        header.pop("__metadata__", None)
        data_size = os.path.getsize(path) - 8 - header_len
        for name, info in header.items():  # a file cut short (a failed copy) names its tensor
            end = info.get("data_offsets", [0, 0])[1]
            if end > data_size:
                raise ValueError(
                    f"{path} is truncated: tensor {name!r} ends at byte {end} of the data, which "
                    f"holds {data_size} bytes"
                )
        self.path = path
        self.header = header
        self._data_start = 8 + header_len
        self._mmap = np.memmap(path, dtype=np.uint8, mode="r")

    def array(self, name: str) -> np.ndarray:
        """The tensor `name` as a read-only view of the mapped file."""
        info = self.header[name]
        if info["dtype"] not in _ST_DTYPES:
            raise ValueError(f"{self.path}: tensor {name!r} has unsupported dtype {info['dtype']}")
        start, end = info["data_offsets"]
        raw = self._mmap[self._data_start + start : self._data_start + end]
        return raw.view(_ST_DTYPES[info["dtype"]]).reshape(info["shape"])


def _open_checkpoint(path: str) -> dict[str, _SafetensorsFile]:
    """tensor name -> the file holding it (single model.safetensors or a sharded index)."""
    index_path = os.path.join(path, "model.safetensors.index.json")
    single_path = os.path.join(path, "model.safetensors")
    if os.path.exists(index_path):
        weight_map = _read_json(index_path).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index_path} has no 'weight_map' mapping tensor names to files")
        files: dict[str, _SafetensorsFile] = {}
        for fname in sorted(set(weight_map.values())):
            fpath = os.path.join(path, fname)
            if not os.path.exists(fpath):
                raise FileNotFoundError(f"{fpath} (listed in {index_path}) does not exist")
            files[fname] = _SafetensorsFile(fpath)
        return {name: files[fname] for name, fname in weight_map.items()}
    if os.path.exists(single_path):
        f = _SafetensorsFile(single_path)
        return dict.fromkeys(f.header, f)
    raise FileNotFoundError(f"no model.safetensors or model.safetensors.index.json in {path}")


def _read_json(path: str) -> dict:
    """A JSON object from `path`; a ValueError naming the file if it does not parse as one."""
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(value, dict):
        raise ValueError(f"{path} holds a JSON {type(value).__name__}, expected an object")
    return value


# How a covjax parameter relates to its HF tensor: "same" shape, "flat" (HF is 1-D), or an int
# n_in = number of leading covjax axes that form the HF Linear's input dimension (HF [out, in]).
Layout = str | int


def _tensor_specs(config: ModelConfig) -> list[tuple[str, str, Layout]]:
    """(covjax parameter name, HF tensor name with {i} for the layer, layout) per tensor."""
    specs: list[tuple[str, str, Layout]] = [
        ("embed", "model.embed_tokens.weight", "same"),
        ("final_norm", "model.norm.weight", "same"),
    ]
    if not config.tie_word_embeddings:
        specs.append(("lm_head", "lm_head.weight", 1))
    per_layer: list[tuple[str, str, Layout]] = [
        ("input_norm", "input_layernorm.weight", "same"),
        ("post_norm", "post_attention_layernorm.weight", "same"),
        ("q_proj", "self_attn.q_proj.weight", 1),
        ("k_proj", "self_attn.k_proj.weight", 1),
        ("v_proj", "self_attn.v_proj.weight", 1),
        ("o_proj", "self_attn.o_proj.weight", 2),
        ("gate_proj", "mlp.gate_proj.weight", 1),
        ("up_proj", "mlp.up_proj.weight", 1),
        ("down_proj", "mlp.down_proj.weight", 1),
    ]
    if config.attention_bias:
        per_layer += [
            ("q_bias", "self_attn.q_proj.bias", "flat"),
            ("k_bias", "self_attn.k_proj.bias", "flat"),
            ("v_bias", "self_attn.v_proj.bias", "flat"),
        ]
    if config.attention_out_bias:
        per_layer.append(("o_bias", "self_attn.o_proj.bias", "same"))
    if config.qk_norm:
        per_layer += [
            ("q_norm", "self_attn.q_norm.weight", "same"),
            ("k_norm", "self_attn.k_norm.weight", "same"),
        ]
    specs += [
        (f"layers.{ours}", "model.layers.{i}." + theirs, lay) for ours, theirs, lay in per_layer
    ]
    return specs


def _hf_shape(our_shape: tuple[int, ...], layout: Layout) -> tuple[int, ...]:
    if layout == "same":
        return tuple(our_shape)
    if layout == "flat":
        return (int(np.prod(our_shape)),)
    return (int(np.prod(our_shape[layout:])), int(np.prod(our_shape[:layout])))


def _to_ours(hf: np.ndarray, our_shape: tuple[int, ...], layout: Layout) -> np.ndarray:
    """A view of an HF tensor in the covjax layout (transposing and splitting axes never copy)."""
    if layout == "same":
        return hf
    if layout == "flat":
        return hf.reshape(our_shape)
    return hf.T.reshape(our_shape)


def _to_hf(ours: np.ndarray, layout: Layout) -> np.ndarray:
    if layout == "same":
        return np.ascontiguousarray(ours)
    if layout == "flat":
        return ours.reshape(-1)
    n_in = int(np.prod(ours.shape[:layout]))
    return np.ascontiguousarray(ours.reshape(n_in, -1).T)


def _model_variables(model: nnx.Module) -> Iterator[tuple[str, nnx.Variable]]:
    for path, var in nnx.iter_graph(model):
        if isinstance(var, nnx.Variable):
            yield ".".join(str(p) for p in path), var


def _layer_and_name(path: str, scan: bool) -> tuple[int | None, str]:
    """'layers.3.q_proj' -> (3, 'layers.q_proj'); stacked 'layers.q_proj' -> (None, same)."""
    parts = path.split(".")
    if parts[0] == "layers" and not scan:
        return int(parts[1]), "layers." + ".".join(parts[2:])
    return None, path


def _read_config(path: str, **overrides: Any) -> ModelConfig:
    """The ModelConfig of the folder's config.json; errors name the folder or the file."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"model folder {path} does not exist")
    config_path = os.path.join(path, "config.json")
    if not os.path.exists(config_path):
        raise FileNotFoundError(f"{config_path} does not exist")
    try:
        return ModelConfig.from_hf_config(_read_json(config_path), **overrides)
    except ValueError as e:
        raise ValueError(f"{config_path}: {e}") from e


def check_pretrained(path: str | os.PathLike) -> ModelConfig:
    """What `from_pretrained` reads before any tensor, checked in a moment: the folder, its
    config.json (a supported architecture) and the safetensors files' headers. Raises as
    `from_pretrained` would; the trainer calls it before the data and the workdir."""
    path = os.fspath(path)
    config = _read_config(path)
    _open_checkpoint(path)
    return config


def from_pretrained(
    path: str | os.PathLike,
    *,
    dtype: DTypeLike = jnp.float32,
    mesh: Mesh | None = None,
    compute_dtype: DTypeLike | None = None,
    remat: str = "none",
    scan_layers: bool = True,
    **config_overrides: Any,
) -> Transformer:
    """Loads a local Hugging Face folder (config.json + safetensors) into a covjax Transformer.

    `dtype` is the parameter dtype (float32 = master weights), `compute_dtype` the matmul dtype
    (default: `dtype`). With `mesh` each parameter lands directly on its sharding.
    """
    path = os.fspath(path)
    param_dtype = jnp.dtype(dtype)
    config = _read_config(
        path,
        param_dtype=param_dtype.name,
        compute_dtype=jnp.dtype(compute_dtype or param_dtype).name,
        remat=remat,
        scan_layers=scan_layers,
        **config_overrides,
    )
    tensors = _open_checkpoint(path)
    abstract = nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0)))
    specs = {ours: (theirs, t) for ours, theirs, t in _tensor_specs(config)}

    used: set[str] = set()
    for var_path, var in _model_variables(abstract):
        layer, name = _layer_and_name(var_path, scan_layers)
        if name not in specs:
            raise ValueError(f"covjax parameter {var_path} has no Hugging Face tensor mapping")
        template, layout = specs[name]
        shape = tuple(var.get_value().shape)
        if scan_layers and name.startswith("layers."):
            hf_names = [template.format(i=i) for i in range(config.num_hidden_layers)]
            stacked, one_shape = True, shape[1:]
        else:
            hf_names = [template.format(i=layer)]
            stacked, one_shape = False, shape
        views = [_checked_view(tensors, n, one_shape, layout) for n in hf_names]
        used.update(hf_names)
        var.set_value(_place(views, stacked, shape, param_dtype, mesh, var))

    ignored = {n for n in tensors if n.endswith(_IGNORED_SUFFIXES)}
    if config.tie_word_embeddings:
        ignored.add("lm_head.weight")
    unexpected = sorted(set(tensors) - used - ignored)
    if unexpected:
        raise ValueError(f"{path}: unexpected tensors {unexpected[:10]} for {config.architecture}")
    return abstract


def _checked_view(tensors, name: str, our_shape, layout: Layout) -> np.ndarray:
    if name not in tensors:
        raise ValueError(f"tensor {name!r} is missing from the checkpoint")
    hf = tensors[name].array(name)
    expected = _hf_shape(our_shape, layout)
    if tuple(hf.shape) != expected:
        raise ValueError(f"tensor {name!r} has shape {tuple(hf.shape)}, expected {expected}")
    return _to_ours(hf, our_shape, layout)


def _place(views, stacked: bool, shape, dtype, mesh: Mesh | None, var: nnx.Variable):
    """A jax.Array of `shape` whose device shards are copied out of the memory-mapped views."""
    if mesh is None:
        sharding = SingleDeviceSharding(jax.devices()[0])
    else:
        axes = var.get_metadata().get("logical_axes") or (None,) * len(shape)
        sharding = logical_sharding(mesh, axes, shape)

    def shard(index: tuple[slice, ...]) -> np.ndarray:
        if not stacked:
            return np.asarray(views[0][index], dtype=dtype)
        rows = range(*index[0].indices(len(views)))
        return np.stack([np.asarray(views[i][index[1:]], dtype=dtype) for i in rows])

    return jax.make_array_from_callback(tuple(shape), sharding, shard)


def _gather_to_host(x: jax.Array) -> np.ndarray:
    if not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))


# Where one HF tensor lives in the model: the covjax variable, its layer when the variable stacks
# the layers (scan_layers) else None, and the layout.
_Source = tuple[nnx.Variable, int | None, Layout]


def _hf_sources(model: Transformer) -> dict[str, _Source]:
    """HF tensor name -> where it lives in the model, for every tensor of the checkpoint."""
    config = model.config
    specs = {ours: (theirs, t) for ours, theirs, t in _tensor_specs(config)}
    sources: dict[str, _Source] = {}
    for var_path, var in _model_variables(model):
        layer, name = _layer_and_name(var_path, config.scan_layers)
        template, layout = specs[name]
        if config.scan_layers and name.startswith("layers."):
            for i in range(config.num_hidden_layers):
                sources[template.format(i=i)] = (var, i, layout)
        else:
            sources[template.format(i=layer)] = (var, None, layout)
    return sources


def _hf_struct(source: _Source, dtype: DTypeLike | None) -> jax.ShapeDtypeStruct:
    """The shape and dtype (`dtype`, else the parameter's) of one HF tensor, nothing gathered."""
    var, layer, layout = source
    value = var.get_value()
    shape = value.shape[1:] if layer is not None else value.shape
    return jax.ShapeDtypeStruct(_hf_shape(shape, layout), jnp.dtype(dtype or value.dtype))


def _hf_tensor(source: _Source, dtype: DTypeLike | None, *, lay_out: bool = True) -> np.ndarray:
    """One HF tensor on the host: its layer sliced out and cast to `dtype` on the devices, then
    gathered (collective in a multi-process run) and, with `lay_out`, laid out as HF stores it
    (a process that only takes part in the gather skips that copy)."""
    var, layer, layout = source
    value = var.get_value()
    if layer is not None:
        value = value[layer]
    if dtype is not None:
        value = value.astype(dtype)
    gathered = _gather_to_host(value)
    return _to_hf(gathered, layout) if lay_out else gathered


def hf_state_dict(model: Transformer) -> dict[str, np.ndarray]:
    """The model's parameters as host numpy arrays under their Hugging Face names and layouts, in
    the parameters' own dtype.

    Works on any nnx tree shaped like the model (e.g. gradients merged into its graphdef).
    In a multi-process run every process must call it (the gather is collective).
    """
    return {name: _hf_tensor(source, None) for name, source in _hf_sources(model).items()}


def _write_safetensors(
    path: epath.Path, structs: dict[str, jax.ShapeDtypeStruct], arrays: Iterator[np.ndarray]
) -> None:
    """A safetensors file of the tensors `structs` names, their data taken from `arrays` (in the
    same order) one at a time: the header is written from the shapes first, then each array is
    streamed to the file and dropped before the next is taken, so no two tensors are in memory
    together. A write that fails leaves the rest of `arrays` untaken."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, s in structs.items():
        size = math.prod(s.shape) * s.dtype.itemsize
        header[name] = {"dtype": _ST_NAMES[s.dtype], "shape": list(s.shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # as safetensors pads it: the data starts 8-byte aligned
    with path.open("wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for name, s in structs.items():  # not zip: its result tuple would hold the last array
            array = next(arrays)
            chex.assert_shape(array, s.shape, custom_message=name)
            chex.assert_type(array, s.dtype, custom_message=name)
            data = np.ascontiguousarray(array).reshape(-1).view(np.uint8)
            del array  # data is the array itself, or its one contiguous copy
            for start in range(0, data.size, _WRITE_CHUNK):
                f.write(data[start : start + _WRITE_CHUNK].tobytes())
            del data


def save_tokenizer(tokenizer: PreTrainedTokenizerBase, path: epath.PathLike) -> None:
    """The tokenizer's files in the folder `path`, local or on an object store: transformers
    writes them to a local temporary folder, and each is copied through etils.epath."""
    path = epath.Path(path)
    path.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as local:
        tokenizer.save_pretrained(local)
        for file in sorted(pathlib.Path(local).iterdir()):
            (path / file.name).write_bytes(file.read_bytes())


def save_pretrained(
    model: Transformer,
    path: epath.PathLike,
    tokenizer: PreTrainedTokenizerBase | None = None,
    source_dir: str | os.PathLike | None = None,
    *,
    dtype: DTypeLike | None = None,
    max_shard_size: int | str = MAX_SHARD_SIZE,
) -> None:
    """Writes config.json + the weights (+ tokenizer files) for transformers to load, to a local
    folder or an object store (etils.epath), and the generation_config.json of `source_dir` (the
    folder the model came from) when it has one, so the saved model keeps its stop tokens
    (stop_ids reads them there).

    The weights are in `dtype` (default: the parameters' own) and split as transformers splits
    them (huggingface_hub's planner): files of at most `max_shard_size` (a tensor larger than it
    gets a file of its own), model.safetensors when one file holds them all, else
    model-0000i-of-0000n.safetensors and model.safetensors.index.json.

    config.json is written last: a folder without it is an export cut short (EXPORT_COMPLETE_FILE,
    which covjax.evaluation.resolve_checkpoint skips). Locally the files go to `<path>.partial`,
    which replaces `path` once complete, so an export cut short leaves an older folder of that
    name intact. On an object store, where a folder cannot be renamed in one step, they are
    written in place: the old config.json and weight files are removed first.

    Host memory: one tensor at a time. Each is sliced and cast on the devices, gathered, laid out
    as HF stores it (a transposing copy) and streamed into its file, so a process holds at most
    about twice the largest tensor (the embedding, for most models), never the model.

    In a multi-process run every process must call it (each gather is collective); process 0
    writes. A write that fails there does not stop process 0 while the others wait in a gather:
    it goes on gathering, writing nothing, and at the end every process raises OSError together
    (process 0's names the file and the cause, the others' say that process 0 failed).
    """
    sources = _hf_sources(model)
    structs = {name: _hf_struct(source, dtype) for name, source in sources.items()}
    split = split_state_dict_into_shards_factory(
        structs,
        get_storage_size=lambda s: math.prod(s.shape) * s.dtype.itemsize,
        filename_pattern=_SHARD_PATTERN,
        max_shard_size=max_shard_size,
    )
    path = epath.Path(path)
    local = storage.is_local(path)
    folder = path.parent / f"{path.name}{PARTIAL_SUFFIX}" if local else path
    failure: tuple[epath.Path, Exception] | None = None  # process 0's first failed write

    def attempt(target: epath.Path, write: Callable[..., object], *args: Any) -> None:
        """Runs `write(*args)` (of `target`) on process 0 unless a write has failed, keeping its
        error."""
        nonlocal failure
        if jax.process_index() != 0 or failure is not None:
            return
        try:
            write(*args)
        except Exception as error:  # noqa: BLE001 - raised once every process has gathered
            failure = (target, error)

    attempt(folder, lambda: _start_export(folder, local))
    for filename, names in split.filename_to_tensors.items():
        writing = jax.process_index() == 0 and failure is None
        arrays = (_hf_tensor(sources[name], dtype, lay_out=writing) for name in names)
        attempt(folder / filename, _write_safetensors, folder / filename,
                {name: structs[name] for name in names}, arrays)
        collections.deque(arrays, maxlen=0)  # the gathers not taken by a write: every process's
    if split.is_sharded:
        index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
        attempt(folder / _INDEX_FILE, lambda: (folder / _INDEX_FILE).write_text(
            json.dumps(index, indent=2, sort_keys=True) + "\n"))
    if tokenizer is not None:
        attempt(folder, lambda: save_tokenizer(tokenizer, folder))
    generation_config = pathlib.Path(os.fspath(source_dir or ""), "generation_config.json")
    if source_dir is not None and generation_config.is_file():
        attempt(folder / generation_config.name, lambda: (
            folder / generation_config.name).write_bytes(generation_config.read_bytes()))
    config = model.config if dtype is None else model.config.replace(
        param_dtype=jnp.dtype(dtype).name
    )
    attempt(folder / EXPORT_COMPLETE_FILE, lambda: (folder / EXPORT_COMPLETE_FILE).write_text(
        json.dumps(config.to_hf_config(), indent=2, sort_keys=True)))
    if local:
        attempt(path, lambda: _replace_folder(folder, path))
    if multihost.any_process(failure is not None):
        _raise_export_failure(path, failure)


def _start_export(folder: epath.Path, fresh: bool) -> None:
    """The folder an export writes, with no completion mark: made empty when `fresh`, else
    (in place, on an object store) stripped of config.json and of earlier weight files."""
    if fresh and folder.exists():
        folder.rmtree()
    folder.mkdir(parents=True, exist_ok=True)
    for old in [folder / EXPORT_COMPLETE_FILE, *folder.glob("model*.safetensors"),
                folder / _INDEX_FILE]:
        if old.exists():
            old.unlink()


def _replace_folder(new: epath.Path, path: epath.Path) -> None:
    """The local folder `new` renamed to `path`; a folder already there is moved aside first and
    removed after, so it is lost only once `new` is in place."""
    if not path.exists():
        new.rename(path)
        return
    aside = path.parent / f"{path.name}.old"
    if aside.exists():
        aside.rmtree()
    path.rename(aside)
    new.rename(path)
    aside.rmtree()


def _raise_export_failure(
    path: epath.Path, failure: tuple[epath.Path, Exception] | None
) -> None:
    """Raises the failure of the export to `path`: process 0's own error when it is a bug, else
    OSError naming the file and the cause; OSError saying process 0 failed on the others."""
    if failure is None:
        raise OSError(f"{path}: process 0 failed to write the export")
    target, error = failure
    if not storage.is_storage_error(error):
        raise error
    raise OSError(f"{target}: writing the export failed: {storage.one_line(error)}") from error


def load_tokenizer(path: str | os.PathLike) -> PreTrainedTokenizerBase:
    """The tokenizer saved next to the weights (transformers' AutoTokenizer, local files only)."""
    from transformers import AutoTokenizer

    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"tokenizer folder {path} does not exist")
    if not any(os.path.isfile(os.path.join(path, name)) for name in _TOKENIZER_FILES):
        raise FileNotFoundError(
            f"tokenizer folder {path} holds no tokenizer files (none of "
            f"{', '.join(_TOKENIZER_FILES)})"
        )
    return AutoTokenizer.from_pretrained(path, local_files_only=True)


def stop_ids(model_dir: str | os.PathLike, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The tokens that end a response: the tokenizer's EOS plus the eos_token_id(s) of the
    folder's generation_config.json (instruct models stop on an end-of-turn token there)."""
    ids = {tokenizer.eos_token_id}
    path = os.path.join(os.fspath(model_dir), "generation_config.json")
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            eos = json.load(f).get("eos_token_id")
        ids.update(eos if isinstance(eos, list) else [eos])
    return sorted(i for i in ids if i is not None)
