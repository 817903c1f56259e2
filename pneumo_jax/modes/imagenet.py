"""--mode imagenet: top-k ImageNet classes of pretrained weights, as the seed's script printed.

A check that converted weights work before fine-tuning from them: `python -m pneumo_jax --mode
imagenet --config configs/default.py --config.init_checkpoint=DIR --inputs photo.jpg`. Images go
through the evaluation preprocessing (slim's central crop 0.875, bilinear resize, [-1, 1]) the
weights were evaluated with.

Class names are WordNet synset ids (n01440764 = tench, …) from the ImageNet label list that
tensorflow-datasets ships: no installed package ships the human-readable names. Slim's checkpoint
has 1001 outputs (0 = background, then the synsets in sorted order), Keras's 1000 (no background).
"""

import contextlib
import importlib.resources
import tempfile
from collections.abc import Sequence
from typing import Any

import ml_collections
import numpy as np

from pneumo_jax import checkpoints, models, scopes, sharding
from pneumo_jax.data import images, preprocess
from pneumo_jax.errors import ConfigError
from pneumo_jax.evaluation import inference
from pneumo_jax.modes import common

NAME = 'imagenet'
HELP = 'top-5 ImageNet classes of config.init_checkpoint, to check converted weights'
FLAGS = ('inputs',)
NEEDS_WORKDIR = False  # WORKDIR, when given, keeps the converted weights for the next check.

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


def top_k(
  config: ml_collections.ConfigDict, variables: Any, image_paths: Sequence[str], k: int = 5
) -> list[list[tuple[str, float]]]:
  """Per image, its k most probable ImageNet classes as (name, probability), most probable first.

  Args:
    config: selects the backbone (config.model) and the input size (config.input.image_size).
    variables: {'params', 'batch_stats'} with an ImageNet head (1000 or 1001 classes; an aux
      head in them is ignored).
    image_paths: image files (anything pneumo_jax.data.images reads).
  """
  backbone = models.backbone_of(config)
  num_classes = np.shape(scopes.flatten(variables['params'])[backbone.logits_bias])[-1]
  names = class_names(num_classes)
  if not image_paths:
    return []
  model = models.build_inference_model(config, num_classes)
  config = ml_collections.ConfigDict(config.to_dict())
  config.input.central_crop_fraction = preprocess.SLIM_CENTRAL_FRACTION
  examples = ((common.example(p, config), i) for i, p in enumerate(image_paths))
  probs = inference.predict(
    model,
    variables,
    common.padded_batches(examples, sharding.round_up(_BATCH)),
    image_size=config.input.image_size,
    whole_batches=True,
  )['probs']
  best = np.argsort(-probs, axis=-1, kind='stable')[:, :k]
  return [[(names[c], float(p[c])) for c in row] for p, row in zip(probs, best, strict=True)]


def run(
  config: ml_collections.ConfigDict, workdir: str | None, inputs: Sequence[str], *, k: int = 5
) -> None:
  """Prints the top-k classes of each input under config.init_checkpoint (an orbax directory, or
  a raw weights file of the backbone, converted once into WORKDIR, else into a temporary folder).

  Args:
    inputs: image files, folders (their images, sorted) or glob patterns.
  """
  files = images.expand_inputs(inputs)
  if not config.init_checkpoint:
    raise ConfigError(
      'config.init_checkpoint is empty: give the ImageNet weights to check (an '
      'orbax directory from converters/, or the raw file)'
    )
  backbone = models.backbone_of(config)
  cache = contextlib.nullcontext(workdir) if workdir else tempfile.TemporaryDirectory()
  with cache as folder:
    variables = checkpoints.read_weights(config.init_checkpoint, backbone, folder)
    for file, top in zip(files, top_k(config, variables, files, k), strict=True):
      print(file)
      for name, p in top:
        print(f'  {p:7.2%}  {name}')
