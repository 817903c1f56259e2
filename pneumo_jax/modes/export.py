"""--mode export: a trained grader as files a clinic can serve without this repository.

WORKDIR/export/ (or --export_dir) receives, from one checkpoint (its EMA weights when the run kept
them, as predict uses):
  model.jax_export      `jax.export` of uint8 [N, S, S, 3] → float32 [N, C] probabilities (N
                        symbolic), for CPU and CUDA: predict's device half (central crop, resize,
                        scale, network, softmax) with the weights inside; needs only jax to call
  serve.py              the host half with Pillow (decode, 8-bit RGB, Lanczos to S) around it:
                        jax, numpy and Pillow, no pneumo_jax
  saved_model/<step>/   TensorFlow SavedModel (jax2tf) whose `serving_default` takes the files'
                        bytes (`image_bytes`, tf.string [N]) and returns `probabilities`, with
                        decoding and resizing done in TF (its `decode` signature shows the
                        images): what TF Serving loads, the step as its version
  labels.txt            class names, one a line, in output order
  metadata.json         sizes, labels, step, grey window and how to call each artefact
  model_card.md         WORKDIR's card (--mode eval writes it), when there is one
docs/serving.md says how to serve them. The directory is written beside its destination and
renamed into place, so a failed export leaves the previous one as it was.

Channels: predict reads a grey file as one channel and repeats it three times (common.example),
so the network always sees RGB, and it takes colour files as they are even from a grey dataset.
The artefacts do the same: their input is RGB, a grey file's channel repeated, which gives exactly
what the one-channel record gives.

Grey deeper than 8 bits: predict maps a 16-bit grey PNG or TIFF to 8 bits by the run's
dataset.grey_window (dicom.GreyWindow); the SavedModel does so in TF ops, serve.py with its own
numpy copy of the rule, both to the same pixels. Neither reads DICOM: that needs pydicom and its
decoders, which a deployment of PNG/JPEG files should not carry; serve.py refuses it by name.
"""

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh

from pneumo_jax import checkpoints, sharding
from pneumo_jax.data import dicom, preprocess, stored_side
from pneumo_jax.data.dicom import GreyWindow
from pneumo_jax.errors import ConfigError, UserError
from pneumo_jax.evaluation import inference, model_card
from pneumo_jax.modes import common

EXPORT_DIR = 'export'
JAX_FILE = 'model.jax_export'
SAVED_MODEL_DIR = 'saved_model'
SERVE_FILE = 'serve.py'
METADATA_FILE = 'metadata.json'
# What a clinic runs on; the artefacts pick theirs when called.
PLATFORMS = ('cpu', 'cuda')
_PNG_SIGNATURE = b'\x89PNG\r\n\x1a\n'
_UINT16_MAX = float(np.iinfo(np.uint16).max)  # 'full_range': a 16-bit file's sample range.
# metadata.json's words for each grey window (linear between black and white, rounded, clipped).
_WINDOW_MEANS = {
  'file': 'black 0, white the largest value of the smallest depth from 8 to 16 bits that holds '
  "the image's brightest pixel (12-bit data: 4095)",
  'full_range': 'black 0, white 65535',
  'fixed': 'black range[0], white range[1]',
  'percentile': "black and white the image's percentiles (numpy's linear interpolation)",
}


class MissingExtraError(UserError, ImportError):
  """An optional dependency group that this mode needs is not installed."""


def run(
  config: ml_collections.ConfigDict,
  workdir: str,
  *,
  checkpoint: str = 'latest',
  export_dir: str | None = None,
) -> str:
  """Exports `checkpoint` of the run in WORKDIR; returns the export directory.

  Refuses, having written nothing, when TensorFlow (the SavedModel's writer) is missing: an export
  is one consistent set, so a deployment never finds the artefact it was told about absent.
  """
  tf, jax2tf = _tensorflow()
  target = os.path.abspath(export_dir or os.path.join(workdir, EXPORT_DIR))
  _check_target(target)
  window = GreyWindow.from_config(config.dataset)
  restored = common.restore(config, workdir, checkpoint)
  card = os.path.join(workdir, model_card.CARD_FILE)
  has_card = os.path.isfile(card)
  side = stored_side(config)
  serve = serving_fn(config, restored)
  spec = jax.ShapeDtypeStruct(jax.export.symbolic_shape(f'n, {side}, {side}, 3'), jnp.uint8)
  exported = jax.export.export(jax.jit(serve), platforms=PLATFORMS)(spec)
  with _replacing(target) as out:
    with open(os.path.join(out, JAX_FILE), 'wb') as f:
      f.write(exported.serialize())
    saved_model = os.path.join(out, SAVED_MODEL_DIR, str(restored.step))
    _save_tf(tf, jax2tf, serve, side, window, saved_model)
    checkpoints.save_label_names(out, restored.names)
    with open(os.path.join(out, SERVE_FILE), 'w') as f:
      f.write(_SERVE_PY)
    if has_card:
      shutil.copyfile(card, os.path.join(out, model_card.CARD_FILE))
    with open(os.path.join(out, METADATA_FILE), 'w') as f:
      json.dump(_metadata(config, restored, window, has_card, tf.__version__), f, indent=2)
  about = f'with {model_card.CARD_FILE}' if has_card else 'no model card: --mode eval writes one'
  print(
    f'Exported checkpoint step {restored.step} ({len(restored.names)} classes) to {target} '
    f'({about})'
  )
  return target


def serving_fn(
  config: ml_collections.ConfigDict, restored: common.Restored
) -> Callable[[jax.Array], jax.Array]:
  """uint8 [N, S, S, 3] images → float32 [N, C] probabilities, as predict computes them from
  common.example's images: the evaluation view and inference's jitted network, weights inside.

  On a one-device mesh, whatever this machine has: an export split over 8 GPUs would need 8.
  """
  side = stored_side(config)
  view = preprocess.central_view(side, side, preprocess.eval_central_fraction(config.input))
  mesh = Mesh(np.asarray(jax.devices()[:1]), (sharding.DATA_AXIS,))
  probs = inference.make_probs_fn(restored.model, mesh, config.input.image_size)

  def serve(images: jax.Array) -> jax.Array:
    n = images.shape[0]
    views = {k: jnp.broadcast_to(v, (n, *v.shape)) for k, v in view.items()}
    return probs(restored.variables, {'image': images, **views})

  return serve


def _tensorflow() -> tuple[Any, Any]:
  """(tensorflow, jax2tf), or the fix when TensorFlow is not installed."""
  try:
    import tensorflow as tf
    from jax.experimental import jax2tf
  except ImportError as e:
    raise MissingExtraError(
      f'--mode export writes a TensorFlow SavedModel and needs TensorFlow ({e}); '
      "install it with: pip install -e '.[export]'"
    ) from e
  return tf, jax2tf


def _check_target(target: str) -> None:
  """Refuses a destination that holds something other than an export: replacing it would
  delete it (a mistyped --export_dir=. or the workdir itself)."""
  if os.path.exists(target) and not (
    os.path.isdir(target)
    and (not os.listdir(target) or os.path.isfile(os.path.join(target, METADATA_FILE)))
  ):
    raise ConfigError(
      f'--export_dir {target} exists and is not an export (no {METADATA_FILE}), and an export '
      'replaces its whole folder; give a new or empty folder'
    )


@contextlib.contextmanager
def _replacing(target: str) -> Iterator[str]:
  """Yields a fresh directory beside `target` that replaces `target` when the block succeeds,
  and is removed when it fails, leaving `target` as it was.

  The old directory is moved aside before the new one moves in: between the two renames `target`
  is briefly absent, never half-written.
  """
  parent, name = os.path.split(target)
  os.makedirs(parent, exist_ok=True)
  staging = tempfile.mkdtemp(prefix=f'.{name}.', dir=parent)
  fresh, old = os.path.join(staging, name), os.path.join(staging, 'replaced')
  try:
    os.mkdir(fresh)
    yield fresh
    if os.path.isdir(target):
      os.rename(target, old)
    try:
      os.rename(fresh, target)
    except OSError:
      if os.path.isdir(old):  # Put the previous export back before `staging` goes.
        os.rename(old, target)
      raise
  finally:
    shutil.rmtree(staging, ignore_errors=True)


def _save_tf(
  tf: Any, jax2tf: Any, serve: Callable, side: int, window: GreyWindow, path: str
) -> None:
  """A SavedModel at `path` whose serving_default maps image files' bytes to probabilities, and
  whose `decode` signature gives the images the network is given, to check a deployment."""
  network = jax2tf.convert(
    serve,
    polymorphic_shapes=[f'(n, {side}, {side}, 3)'],
    native_serialization_platforms=PLATFORMS,
    with_gradient=False,
  )
  decode_file = tf_decoder(tf, window)

  def load(data: Any) -> Any:
    """One file's bytes → uint8 [side, side, 3], as images.load_stored reads it with Pillow:
    exact for files already side × side; others are resized by TF's Lanczos, not Pillow's."""
    image = decode_file(data)

    def resize() -> Any:
      out = tf.image.resize(image, (side, side), method='lanczos3', antialias=True)
      return tf.cast(tf.clip_by_value(tf.round(out), 0, 255), tf.uint8)

    square = tf.reduce_all(tf.equal(tf.shape(image)[:2], side))
    return tf.ensure_shape(tf.cond(square, lambda: image, resize), (side, side, 3))

  files = tf.TensorSpec([None], tf.string, name='image_bytes')

  @tf.function(input_signature=[files], autograph=False)
  def decode(image_bytes: Any) -> dict[str, Any]:
    spec = tf.TensorSpec((side, side, 3), tf.uint8)
    return {'images': tf.map_fn(load, image_bytes, fn_output_signature=spec)}

  @tf.function(input_signature=[files], autograph=False)
  def serving_default(image_bytes: Any) -> dict[str, Any]:
    return {'probabilities': network(decode(image_bytes)['images'])}

  module = tf.Module()
  module.decode, module.serving_default = decode, serving_default
  tf.saved_model.save(
    module, path, signatures={'serving_default': serving_default, 'decode': decode}
  )


def tf_decoder(tf: Any, window: GreyWindow) -> Callable[[Any], Any]:
  """A function of one file's bytes (scalar tf.string) → uint8 [H, W, 3], the pixels Pillow gives
  images.load_stored before its resize (grey repeated), a 16-bit grey PNG windowed by `window`."""

  def decode(data: Any) -> Any:
    # IHDR's bit depth and colour type: 16-bit grey. Pillow keeps the high byte of other 16-bit
    # PNGs (grey + alpha, RGB), which decode_image does too.
    grey16 = tf.logical_and(
      tf.equal(tf.strings.substr(data, 0, 8), _PNG_SIGNATURE),
      tf.equal(tf.strings.substr(data, 24, 2), b'\x10\x00'),
    )

    def png16() -> Any:
      grey = tf.io.decode_png(data, channels=1, dtype=tf.uint16)
      return tf.image.grayscale_to_rgb(_tf_grey16_to_8(tf, grey, window))

    def other() -> Any:
      # Pillow decodes JPEG with libjpeg's accurate integer DCT; TF's default is the fast one.
      return tf.cond(
        tf.io.is_jpeg(data),
        lambda: tf.io.decode_jpeg(data, channels=3, dct_method='INTEGER_ACCURATE'),
        lambda: tf.io.decode_image(data, channels=3, expand_animations=False),
      )

    return tf.cond(grey16, png16, other)

  return decode


def _tf_grey16_to_8(tf: Any, grey: Any, window: GreyWindow) -> Any:
  """uint16 [H, W, 1] → uint8 [H, W, 1] as images.load_stored maps a 16-bit grey file: the
  rule's (black, white) as GreyWindow.bounds gives them, then dicom.to_uint8's arithmetic, all
  in float64 and rounded half to even as numpy's, so that the pixels are predict's exactly."""
  if window.rule == 'file':
    brightest = tf.cast(tf.reduce_max(grey), tf.int32)
    bits = tf.reduce_sum(tf.cast(brightest >= 2 ** tf.range(16), tf.int32))  # int.bit_length()
    black, white = 0.0, tf.cast(2 ** tf.clip_by_value(bits, 8, 16) - 1, tf.float64)
  elif window.rule == 'full_range':
    black, white = 0.0, _UINT16_MAX
  elif window.rule == 'fixed':
    black, white = window.fixed_range
  else:
    black, white = _tf_percentiles(tf, grey, dicom.PERCENTILES)
  black, white = tf.cast(black, tf.float64), tf.cast(white, tf.float64)
  scaled = (tf.cast(grey, tf.float64) - black) * (255.0 / (white - black))
  grey8 = tf.cast(tf.clip_by_value(tf.round(scaled), 0, 255), tf.uint8)
  return tf.where(white > black, grey8, tf.zeros_like(grey8))  # A flat range gives black.


def _tf_percentiles(tf: Any, grey: Any, percentiles: tuple[float, float]) -> tuple[Any, Any]:
  """np.percentile(grey, percentiles) of a uint16 image, by the same float64 steps as numpy's
  default 'linear' method; its order statistics come from a histogram, not a sort of the film."""
  flat = tf.reshape(tf.cast(grey, tf.int32), [-1])
  count = tf.size(flat)
  virtual = tf.cast(count - 1, tf.float64) * np.true_divide(percentiles, 100)
  below = tf.floor(virtual)
  gamma = virtual - below
  # The k-th smallest value is the first whose cumulative count exceeds k.
  cumulative = tf.cumsum(tf.math.bincount(flat, minlength=2**16))
  lower = tf.cast(below, tf.int32)
  a, b = (
    tf.cast(tf.searchsorted(cumulative, k, side='right'), tf.float64)
    for k in (lower, tf.minimum(lower + 1, count - 1))
  )
  lerp = tf.where(gamma >= 0.5, b - (b - a) * (1 - gamma), a + (b - a) * gamma)
  return lerp[0], lerp[1]


def _metadata(
  config: ml_collections.ConfigDict,
  restored: common.Restored,
  window: GreyWindow,
  card: bool,
  tf_version: str,
) -> dict[str, Any]:
  """What a deployment needs to know without this repository: sizes, labels, calls, the grey
  window (serve.py reads its rule from here), and the versions that wrote the artefacts (the
  runtimes that load them must not be older)."""
  side, classes = stored_side(config), len(restored.names)
  return {
    'model': config.model.name,
    'step': restored.step,
    'versions': {'jax': jax.__version__, 'tensorflow': tf_version},
    'labels': restored.names,
    **common.view(config),
    'channels': 3,
    'grey_window': window_metadata(window),
    'model_card': model_card.CARD_FILE if card else None,
    'platforms': list(PLATFORMS),
    'jax_export': {
      'file': JAX_FILE,
      'input': f'uint8 [N, {side}, {side}, 3]: files decoded to 8-bit RGB (grey repeated) and '
      f'resized to {side}x{side} with Pillow LANCZOS, as serve.py does',
      'output': f'float32 [N, {classes}] probabilities, columns in labels.txt order',
      'call': f"jax.export.deserialize(bytearray(open('{JAX_FILE}', 'rb').read())).call(images)",
    },
    'serve_py': 'python serve.py FILE... (CSV on stdout), or serve.predict([paths]) -> [N, C]; '
    'DICOM is refused: convert it to PNG with pneumo_jax (docs/serving.md) or use --mode predict',
    'saved_model': {
      'dir': f'{SAVED_MODEL_DIR}/{restored.step}',
      'signature': 'serving_default',
      'input': 'image_bytes: tf.string [N], whole PNG/JPEG/BMP/GIF files (not DICOM)',
      'output': f'probabilities: float32 [N, {classes}]',
      'decode_signature': f'decode: image_bytes -> images, uint8 [N, {side}, {side}, 3], what the '
      'network is given (to check a deployment against serve.load)',
      'resize': f'files not {side}x{side} are resized with TF lanczos3 (antialiased), which '
      "differs from Pillow's LANCZOS by a grey level or so: slightly other probabilities",
    },
  }


def window_metadata(window: GreyWindow) -> dict[str, Any]:
  """metadata.json's grey_window: the run's rule with its numbers, which serve.py's copy of the
  rule reads, and what it means for a deployment that decodes files itself."""
  settings = {
    'fixed': {'range': window.fixed_range},
    'percentile': {'percentiles': dicom.PERCENTILES},
  }
  return {
    'rule': window.rule,
    **settings.get(window.rule, {}),
    'means': _WINDOW_MEANS[window.rule],
    'applies_to': '16-bit grey PNG (and TIFF in serve.py), mapped linearly from black -> 0 to '
    'white -> 255, rounded and clipped, as --mode predict reads them (dataset.grey_window); '
    '8-bit files are taken as they are',
  }


_SERVE_PY = '''\
"""Classifies image files with the exported grader: python serve.py FILE... (CSV on stdout).

Needs jax, numpy and Pillow only. Reads a file as pneumo_jax's --mode predict does (8-bit RGB,
a grey image's channel repeated, 16-bit grey PNG/TIFF mapped to 8 bits by the run's grey window,
alpha dropped, resized with Pillow's LANCZOS to the stored size), then calls model.jax_export,
which holds the rest. DICOM is refused: convert it with pneumo_jax, or use its --mode predict.
"""

import csv
import json
import os
import sys

import jax
import numpy as np
from PIL import Image

HERE = os.path.dirname(os.path.abspath(__file__))
with open(os.path.join(HERE, 'metadata.json')) as f:
  METADATA = json.load(f)
WINDOW = METADATA['grey_window']  # The run's dataset.grey_window.


class DicomError(ValueError):
  """A DICOM file, which this script does not read."""


# Mirrors pneumo_jax.data.dicom (GreyWindow.bounds, then to_uint8) as pneumo_jax.data.images
# applies it to 16-bit grey files, so that this script needs no pneumo_jax (nor pydicom);
# pneumo_jax's tests/test_export.py pins the two together, rule by rule.
def grey8(grey: np.ndarray, window: dict = WINDOW) -> np.ndarray:
  """16-bit grey [H, W] → uint8 [H, W]: the window's black → 0, white → 255, rounded, clipped."""
  rule = window['rule']
  if rule == 'file':  # The smallest depth of 8 to 16 bits that holds the brightest pixel.
    black, white = 0.0, 2.0 ** int(np.clip(int(grey.max()).bit_length(), 8, 16)) - 1
  elif rule == 'full_range':
    black, white = 0.0, 65535.0
  elif rule == 'fixed':
    black, white = window['range']
  else:  # 'percentile'
    black, white = (float(v) for v in np.percentile(grey, window['percentiles']))
  if white <= black:  # A blank image's percentiles.
    return np.zeros(grey.shape, np.uint8)
  scaled = (np.asarray(grey, np.float64) - black) * (255.0 / (white - black))
  return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def is_dicom(path: str) -> bool:
  """By extension, or by the b'DICM' after a DICOM file's 128-byte preamble, as pneumo_jax."""
  if path.lower().endswith(('.dcm', '.dicom')):
    return True
  with open(path, 'rb') as f:
    return f.read(132)[128:] == b'DICM'


def load(path: str) -> np.ndarray:
  """uint8 [S, S, 3] for the image file at `path`."""
  if is_dicom(path):
    raise DicomError(
      f'{path} is DICOM, which serve.py does not read: run pneumo_jax --mode predict on it, or '
      'convert it to PNG with pneumo_jax first (its docs/serving.md, "DICOM")'
    )
  side = METADATA['stored_size']
  with Image.open(path) as image:
    image.load()
    if image.mode.startswith('I'):  # 16-bit grey PNG/TIFF.
      image = Image.fromarray(grey8(np.asarray(image)))
    elif image.mode == 'P' and 'transparency' in image.info:
      image = image.convert('RGBA')
    image = image.convert('RGB')
  if image.size != (side, side):
    image = image.resize((side, side), Image.Resampling.LANCZOS)
  return np.asarray(image, np.uint8)


def predict(paths: list[str], batch: int = 32) -> np.ndarray:
  """float32 [len(paths), C] class probabilities, columns as METADATA['labels']."""
  with open(os.path.join(HERE, METADATA['jax_export']['file']), 'rb') as f:
    model = jax.export.deserialize(bytearray(f.read()))
  chunks = [paths[i : i + batch] for i in range(0, len(paths), batch)]
  return np.concatenate([np.asarray(model.call(np.stack([load(p) for p in c]))) for c in chunks])


if __name__ == '__main__':
  labels = METADATA['labels']
  try:
    probabilities = predict(sys.argv[1:])
  except DicomError as e:
    sys.exit(f'error: {e}')
  writer = csv.writer(sys.stdout)
  writer.writerow(['path', 'prediction', *labels])
  for path, row in zip(sys.argv[1:], probabilities, strict=True):
    writer.writerow([path, labels[int(np.argmax(row))], *(f'{p:.6f}' for p in row)])
'''
