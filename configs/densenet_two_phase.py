# python main.py --config configs/densenet_two_phase.py --workdir runs/xray_densenet \
#     --config.dataset.source_dir=/data/xray_by_stage --config.init_checkpoint=/weights/densenet121
"""configs/two_phase.py's recipe on DenseNet-121, the backbone chest X-ray work standardised on.

It is two_phase.py with the backbone's own phases and size (exclude_scopes defaults to its head,
`classifier`); why each difference:
- DenseNet-121 (CheXNet; torchxrayvision's X-ray weights load too): 8M parameters against
  InceptionV3's 24M, which suits ~2,000 images, at its ImageNet size of 224 px.
- Phase `head` (1,000 steps): only `classifier` learns, on frozen features, so the new random
  head stops sending large gradients before anything pretrained is touched.
- Phase `top` (3,000 steps, 10× lower rate, cosine to zero): denseblock4 and norm5, the last
  block at 7×7 (2.2M parameters, 16 layers: the most task-specific features), adapt with the
  head; the earlier blocks hold generic edges and textures that ~2,000 images should not move.
- Batch norm stays in inference mode everywhere (`frozen`): batches of 32 grey images give noisy
  statistics unlike the pretrained ones. `batch_norm_decay` 0.9 is torchvision's momentum, used
  only if a phase lets batch norm learn.
- Dropout 0.2 before the classifier (the default keep 0.8, as InceptionV3's head): DenseNet's
  own has none, but a new head on few images overfits quickly.
"""

import ml_collections

from configs import two_phase


def get_config() -> ml_collections.ConfigDict:
  c = two_phase.get_config()
  c.model.name = 'densenet121'
  c.model.batch_norm_decay = 0.9
  c.input.image_size = 224
  c.phases.head.trainable_scopes = 'classifier'
  c.phases.top.trainable_scopes = 'denseblock4,norm5,classifier'
  return c
