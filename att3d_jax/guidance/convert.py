"""PyTorch (diffusers) state dicts <-> Flax params, and diffusers folders on disk.

Every Flax module of att3d_jax.guidance names its submodules after diffusers' module paths
(`down_blocks.0.attentions.1.proj_in`), so a Flax parameter path joined by "." is the
PyTorch key up to the leaf name. All renaming and layout changes live here:

  Flax leaf                                   PyTorch leaf   layout
  kernel [kh, kw, in, out] (nn.Conv)          weight         [out, in, kh, kw]
  kernel [in, out]         (nn.Dense)         weight         [out, in]
  scale                    (GroupNorm, LayerNorm) weight     same
  embedding                (nn.Embed)         weight         same
  anything else (bias, raw self.param)        same name      same

The conversion is generic over modules: `torch_to_flax` walks the expected Flax tree (real
arrays or `jax.ShapeDtypeStruct`s from `jax.eval_shape`), so it serves the UNet and the VAE.
"""

import json
import os
from typing import Any, Mapping

from flax import traverse_util
import jax
import ml_dtypes
import numpy as np
import safetensors.numpy

WEIGHTS_NAME = 'diffusion_pytorch_model.safetensors'
CONFIG_NAME = 'config.json'
_LEAF_RENAMES = {'kernel': 'weight', 'scale': 'weight', 'embedding': 'weight'}
_MAX_LISTED = 10  # Mismatches named in an error message.

# safetensors dtype names -> numpy; BF16 via ml_dtypes (numpy has no bfloat16).
_SAFETENSORS_DTYPES = {
    'F64': np.float64, 'F32': np.float32, 'F16': np.float16, 'BF16': ml_dtypes.bfloat16,
    'I64': np.int64, 'I32': np.int32, 'I16': np.int16, 'I8': np.int8, 'U8': np.uint8,
    'BOOL': np.bool_,
}


def model_folder(folder: str, subfolder: str) -> str:
  """The folder holding one diffusers model's config.json: `folder/subfolder`
  of a pipeline folder, or `folder` itself when it is that model's folder.

  Raises:
    FileNotFoundError: naming the expected layout and the config flag.
  """
  for candidate in (os.path.join(folder, subfolder), folder):
    if os.path.isfile(os.path.join(candidate, CONFIG_NAME)):
      return candidate
  raise FileNotFoundError(
      f'no diffusers {subfolder} model in {folder!r}: expected a pipeline folder with '
      f'{subfolder}/{CONFIG_NAME} and {subfolder}/{WEIGHTS_NAME}, or the {subfolder} folder '
      f'itself with {CONFIG_NAME} and {WEIGHTS_NAME}. Training configs take the folder '
      'from --config.guidance.path=/local/diffusers/folder.')


def torch_key(flax_path: tuple[str, ...]) -> str:
  """('down_blocks.0', 'resnets.1', 'conv1', 'kernel') -> 'down_blocks.0.resnets.1.conv1.weight'."""
  return '.'.join(flax_path[:-1] + (_LEAF_RENAMES.get(flax_path[-1], flax_path[-1]),))


def _to_torch_layout(leaf: str, array: np.ndarray) -> np.ndarray:
  if leaf == 'kernel' and array.ndim == 4:
    return array.transpose(3, 2, 0, 1)
  if leaf == 'kernel' and array.ndim == 2:
    return array.T
  return array


def _to_flax_layout(leaf: str, array: np.ndarray) -> np.ndarray:
  if leaf == 'kernel' and array.ndim == 4:
    return array.transpose(2, 3, 1, 0)
  if leaf == 'kernel' and array.ndim == 2:
    return array.T
  return array


def _torch_shape(leaf: str, flax_shape: tuple[int, ...]) -> tuple[int, ...]:
  # A zero-stride view: no memory is allocated for the (possibly large) shape.
  return _to_torch_layout(leaf, np.broadcast_to(np.bool_(False), flax_shape)).shape


def _listing(title: str, items: list[str]) -> str:
  shown = '\n  '.join(items[:_MAX_LISTED])
  more = f'\n  ... and {len(items) - _MAX_LISTED} more' if len(items) > _MAX_LISTED else ''
  return f'{len(items)} {title}:\n  {shown}{more}'


def torch_to_flax(state_dict: Mapping[str, Any], expected_params: Any) -> Any:
  """Converts a diffusers state dict into the Flax params tree `expected_params` describes.

  Args:
    state_dict: PyTorch key -> array (numpy or anything `np.asarray` takes), in PyTorch layout.
    expected_params: the Flax params tree (arrays or ShapeDtypeStructs) the module expects.

  Returns:
    The params tree with float32 numpy leaves (float16/bfloat16 files are upcast).

  Raises:
    ValueError: keys missing from or unexpected in `state_dict`, or shapes that do not match;
      the message lists the first ones of each kind, expected vs got.
  """
  expected = traverse_util.flatten_dict(expected_params)
  by_key = {torch_key(path): path for path in expected}
  missing = [f'{key}  expected shape {_torch_shape(path[-1], expected[path].shape)}'
             for key, path in by_key.items() if key not in state_dict]
  unexpected = [f'{key}  shape {tuple(np.shape(state_dict[key]))}'
                for key in state_dict if key not in by_key]
  mismatched, converted = [], {}
  for key, path in by_key.items():
    if key not in state_dict:
      continue
    array = np.asarray(state_dict[key])
    if np.issubdtype(array.dtype, np.floating) or array.dtype == ml_dtypes.bfloat16:
      # No copy of float32 weights: they stay views of the file's memory map until the
      # caller makes its own arrays (a real-size UNet is gigabytes).
      array = array.astype(np.float32, copy=False)
    array = _to_flax_layout(path[-1], array)
    if array.shape != tuple(expected[path].shape):
      mismatched.append(f'{key}  expected {_torch_shape(path[-1], expected[path].shape)}, got '
                        f'{_to_torch_layout(path[-1], array).shape}')
    converted[path] = array
  if missing or unexpected or mismatched:
    problems = [_listing(title, items) for title, items in (
        ('missing keys', missing), ('unexpected keys', unexpected),
        ('shape mismatches (PyTorch layout)', mismatched)) if items]
    raise ValueError('the weights do not match the model config:\n' + '\n'.join(problems) +
                     '\nCheck that config.json belongs to these weights.')
  return traverse_util.unflatten_dict(converted)


def flax_to_torch(params: Any) -> dict[str, np.ndarray]:
  """Flax params tree -> {PyTorch key: float32 numpy array in PyTorch layout}."""
  return {torch_key(path): np.ascontiguousarray(
              _to_torch_layout(path[-1], np.asarray(jax.device_get(value), np.float32)))
          for path, value in traverse_util.flatten_dict(params).items()}


def _read_safetensors_file(path: str) -> dict[str, np.ndarray]:
  """Parses one .safetensors file (8-byte header size, JSON header, raw little-endian data).

  The arrays are read-only views of a memory map, so large checkpoints are not copied twice.
  """
  data = np.memmap(path, np.uint8, mode='r')
  header_size = int.from_bytes(data[:8].tobytes(), 'little')
  header = json.loads(data[8:8 + header_size].tobytes())
  start = 8 + header_size
  tensors = {}
  for name, info in header.items():
    if name == '__metadata__':
      continue
    if info['dtype'] not in _SAFETENSORS_DTYPES:
      raise ValueError(f'{path}: tensor {name!r} has dtype {info["dtype"]}, which is not '
                       f'supported; supported: {sorted(_SAFETENSORS_DTYPES)}.')
    begin, end = info['data_offsets']
    dtype = np.dtype(_SAFETENSORS_DTYPES[info['dtype']]).newbyteorder('<')
    tensors[name] = data[start + begin:start + end].view(dtype).reshape(info['shape'])
  return tensors


def read_safetensors(folder_or_file: str,
                     weights_name: str = WEIGHTS_NAME) -> dict[str, np.ndarray]:
  """Reads a safetensors file, or the weights of a diffusers model folder.

  A folder may hold `weights_name`, its sharded form (`<weights_name>.index.json` plus the
  shards it lists), or the fp16 variant (`diffusion_pytorch_model.fp16.safetensors`).

  Raises:
    FileNotFoundError: none of these exist; the message names the expected files.
  """
  if os.path.isfile(folder_or_file):
    return _read_safetensors_file(folder_or_file)
  single = os.path.join(folder_or_file, weights_name)
  index = single + '.index.json'
  stem, extension = os.path.splitext(weights_name)
  fp16 = os.path.join(folder_or_file, f'{stem}.fp16{extension}')
  if os.path.isfile(single):
    return _read_safetensors_file(single)
  if os.path.isfile(index):
    with open(index) as f:
      shards = sorted(set(json.load(f)['weight_map'].values()))
    tensors = {}
    for shard in shards:
      tensors.update(_read_safetensors_file(os.path.join(folder_or_file, shard)))
    return tensors
  if os.path.isfile(fp16):
    return _read_safetensors_file(fp16)
  raise FileNotFoundError(
      f'no weights in {folder_or_file!r}: expected {weights_name} (or {os.path.basename(index)} '
      f'with its shards, or {os.path.basename(fp16)}). Only safetensors files are read; convert '
      '.bin checkpoints with diffusers (`save_pretrained(..., safe_serialization=True)`).')


def write_diffusers_folder(folder: str, config: Mapping[str, Any], params: Any,
                           weights_name: str = WEIGHTS_NAME) -> None:
  """Writes `config.json` and float32 safetensors weights that diffusers' `from_pretrained` reads.

  Args:
    folder: created if needed; existing files of the same names are replaced.
    config: the diffusers config dict (with `_class_name`).
    params: a Flax params tree named after diffusers' modules.
  """
  os.makedirs(folder, exist_ok=True)
  with open(os.path.join(folder, CONFIG_NAME), 'w') as f:
    json.dump(dict(config), f, indent=2, sort_keys=True)
  safetensors.numpy.save_file(flax_to_torch(params), os.path.join(folder, weights_name),
                              metadata={'format': 'pt'})
