"""ImageNet top-k predictions of a pretrained InceptionV3, as the seed's ImageNet script printed.

A check that converted weights work before fine-tuning from them: `main.py --mode imagenet
--config.init_checkpoint=DIR --inputs photo.jpg`. Images go through the evaluation preprocessing
(central crop 0.875, bilinear resize, [-1, 1]) the weights were trained with.

Class names are WordNet synset ids (n01440764 = tench, …) from the ImageNet label list that
tensorflow-datasets ships: no installed package ships the human-readable names. Slim's checkpoint
has 1001 outputs (0 = background, then the synsets in sorted order), Keras's 1000 (no background).
"""

import importlib.resources
import os
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from pneumo_jax.data import images, preprocess
from pneumo_jax.errors import ConfigError
from pneumo_jax.evaluation import inference
from pneumo_jax.models.inception_v3 import InceptionV3

BACKGROUND = 'background'
_BATCH = 8  # Images per forward pass (rounded up to the device count).


def class_names(num_classes: int) -> list[str]:
  """Names of an ImageNet classifier's outputs: 1000 synsets, or 1001 with 'background' first."""
  labels = importlib.resources.files('tensorflow_datasets.datasets.imagenet2012') / 'labels.txt'
  synsets = labels.read_text().split()
  if num_classes == len(synsets):
    return synsets
  if num_classes == len(synsets) + 1:
    return [BACKGROUND, *synsets]
  raise ConfigError(
    f'a model with {num_classes} outputs is not an ImageNet classifier (1000, or 1001 with '
    "slim's background class); give the ImageNet weights from converters/, not fine-tuned ones"
  )


def _batches(
  image_paths: Sequence[str], image_size: int, batch: int
) -> Iterator[dict[str, np.ndarray]]:
  """Eval-preprocessed images in fixed-size batches, the last padded and masked."""
  for start in range(0, len(image_paths), batch):
    chunk = [
      preprocess.eval(images.load_image(p), image_size) for p in image_paths[start : start + batch]
    ]
    mask = np.arange(batch) < len(chunk)
    chunk += [np.zeros_like(chunk[0])] * (batch - len(chunk))
    yield {'image': np.stack(chunk), 'mask': mask}


def top_k(
  variables: Any, image_paths: Sequence[str], k: int = 5, image_size: int = 299
) -> list[list[tuple[str, float]]]:
  """Per image, its k most probable ImageNet classes as (name, probability), most probable first.

  Args:
    variables: {'params', 'batch_stats'} of an InceptionV3 with an ImageNet head (1000 or 1001
      classes; an aux head in them is ignored).
    image_paths: image files (anything pneumo_jax.data.images reads).
  """
  num_classes = np.shape(variables['params']['Logits']['Conv2d_1c_1x1']['biases'])[-1]
  names = class_names(num_classes)
  if not image_paths:
    return []
  model = InceptionV3(num_classes=num_classes, create_aux_logits=False)
  batch = -(-_BATCH // jax.device_count()) * jax.device_count()
  probs = inference.predict(model, variables, _batches(image_paths, image_size, batch))['probs']
  best = np.argsort(-probs, axis=-1, kind='stable')[:, :k]
  return [[(names[c], float(p[c])) for c in row] for p, row in zip(probs, best, strict=True)]


def print_top_k(config: ml_collections.ConfigDict, inputs: Sequence[str], k: int = 5) -> None:
  """main.py --mode imagenet: prints the top-k classes of each input under config.init_checkpoint.

  Args:
    inputs: image files, folders (their images, sorted) or glob patterns.
  """
  files = images.expand_inputs(inputs)
  path = os.path.abspath(os.path.expanduser(config.init_checkpoint))
  hint = (
    'give an orbax directory written by `python -m converters.download {slim,keras} DEST` or '
    'converters.*_to_orbax (the path they print)'
  )
  if not (config.init_checkpoint and os.path.isdir(path)):
    raise ConfigError(f'config.init_checkpoint={config.init_checkpoint!r} is no directory; {hint}')
  try:
    variables = ocp.StandardCheckpointer().restore(path)
  except (FileNotFoundError, ValueError) as e:
    raise ConfigError(
      f'config.init_checkpoint={config.init_checkpoint!r} is not an orbax checkpoint ({e}); {hint}'
    ) from e
  for file, top in zip(files, top_k(variables, files, k, config.input.image_size), strict=True):
    print(file)
    for name, p in top:
      print(f'  {p:7.2%}  {name}')
