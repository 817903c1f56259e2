"""What the rest of pneumo_jax may know about a network: one `Backbone` record per architecture.

The training step, the optimizer's weight decay, preprocessing, Grad-CAM, checkpoints and the
modes ask these questions and nothing else, so a new architecture is one module under
`pneumo_jax/models/` that builds its Flax module and fills in a `Backbone` (registered in
`pneumo_jax.models.BACKBONES`). Layer names appear only there (and in configs, docs and tests).

Every module a backbone creates is called as `module.apply(variables, images, train=...)` on
preprocessed float images [B, H, W, 3] and returns `(logits, end_points)`; `end_points` maps layer
names (those in `gradcam_layers`, the aux head's key if any, and `PreLogits`) to their outputs.
"""

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import ml_collections


@dataclasses.dataclass(frozen=True)
class Backbone:
  """An architecture, as the rest of the code sees it.

  Attributes:
    name: the value of `config.model.name` that selects it.
    create: (config.model, num_classes, **overrides) → the Flax module. `overrides` may set
      `batch_norm_train` (regexes over parameter paths, as `pneumo_jax.scopes`; None: every batch
      norm uses batch statistics in training; (): none does), `create_aux_logits` and
      `activation` (explain swaps the ReLU for a guided one).
    head_scopes: comma-separated regexes selecting the classifier layers that a new set of
      classes replaces (the default `exclude_scopes` and `trainable_scopes`, see
      `pneumo_jax.models.head_scopes_of`).
    aux_logits: the end_points key of an auxiliary classifier trained with
      `config.aux_loss_weight`, or None.
    logits_bias: the parameter path of the final classifier's bias: its length is the number of
      classes a checkpoint predicts.
    weight_decay: comma-separated regexes selecting the parameters that get L2 weight decay.
    min_size: the smallest input side the network accepts.
    default_size: the input side its ImageNet weights were trained at.
    preprocessing: the input normalisation its weights expect: 'inception' (pixels scaled to
      [-1, 1]) or 'imagenet' (pixels in [0, 1], less the ImageNet channel means, divided by
      their standard deviations). The pipeline always delivers [-1, 1] (inception
      preprocessing, one image view for every backbone); a module whose weights expect another
      normalisation converts to it as its first operation, so explanations and exports see one
      input convention.
    gradcam_layers: layers Grad-CAM can weigh, earliest first; the last is the default.
    cell_centres: per layer in `gradcam_layers`, (offset, stride) in input pixels: cell i's
      receptive field is centred on pixel offset + stride * i.
    feature_taps: per head (a top-level scope such as 'Logits'), the path regex of the layer
      whose output is that head's whole input and is computed by frozen layers only (a pool
      before any dropout): what a feature cache stores when only heads train (models.taps).
    blocks: the top-level scopes below the heads in the order the input flows through them, each
      reading only the one before (parameter-free functions may sit between): when the lowest
      trainable block is blocks[k], a feature cache stores blocks[k − 1]'s output.
    head_inputs: per head scope, the block whose output it reads (InceptionV3's aux head reads
      Mixed_6e, below the last block), so a cache cut above it also stores the head's input.
    load_weights: a raw weights file this backbone reads (its formats: see `weight_formats`) →
      {'params', 'batch_stats'} as numpy arrays keyed like the module's variables.
    weight_formats: a short description of the files `load_weights` reads, for messages.
    recognise: whether a raw weights file holds this architecture (without loading it all).
    inference_overrides: what `create` is given to build the model for evaluation, prediction
      and explanation (InceptionV3: no aux head, whose weights inference never reads).
    describe: (config) → phrases describing the settings only this backbone reads (its extra
      model fields), for the model card; () when it reads none.
  """

  name: str
  create: Callable[..., nn.Module]
  head_scopes: str
  aux_logits: str | None
  logits_bias: str
  weight_decay: str
  min_size: int
  default_size: int
  preprocessing: str
  gradcam_layers: tuple[str, ...]
  cell_centres: Mapping[str, tuple[float, float]]
  feature_taps: Mapping[str, str]
  blocks: tuple[str, ...]
  head_inputs: Mapping[str, str]
  load_weights: Callable[[str], dict[str, Any]]
  weight_formats: str
  recognise: Callable[[str], bool]
  inference_overrides: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  describe: Callable[[ml_collections.ConfigDict], tuple[str, ...]] = lambda config: ()

  @property
  def default_gradcam_layer(self) -> str:
    return self.gradcam_layers[-1]

  def build(
    self,
    model_cfg: ml_collections.ConfigDict,
    num_classes: int,
    *,
    inference: bool = False,
    **overrides: Any,
  ) -> nn.Module:
    """The Flax module for `config.model`; `inference`: as evaluation and prediction run it."""
    if inference:
      overrides = {**self.inference_overrides, **overrides}
    return self.create(model_cfg, num_classes, **overrides)
