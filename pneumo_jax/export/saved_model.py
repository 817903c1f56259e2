"""The network as a TensorFlow SavedModel (jax2tf) that takes whole image files, for TF Serving.

`serving_default`: `image_bytes` (tf.string [N], PNG/JPEG/BMP/GIF files) → `probabilities`
(float32 [N, C]); `decode`: the same input → `images` (uint8 [N, S, S, 3]), what the network is
given, to check a deployment. Files are decoded by `tf_images`; those not S × S are resized by
TF's Lanczos, which differs from Pillow's by a grey level or so. TensorFlow is the `export`
extra's, so it is imported where it is used.
"""

from collections.abc import Callable
from typing import Any

from pneumo_jax.data.dicom import GreyWindow
from pneumo_jax.export import jax_export, tf_images


def save(serve: Callable, side: int, window: GreyWindow, path: str) -> None:
  """Writes the SavedModel of `serve` (jax_export.serving_fn's) at `path`, reading 16-bit grey
  PNGs by `window`."""
  import tensorflow as tf
  from jax.experimental import jax2tf

  network = jax2tf.convert(
    serve,
    polymorphic_shapes=[f'(n, {side}, {side}, 3)'],
    native_serialization_platforms=jax_export.PLATFORMS,
    with_gradient=False,
  )
  decode_file = tf_images.decoder(window)

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
