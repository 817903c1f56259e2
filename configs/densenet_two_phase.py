# python main.py --config configs/densenet_two_phase.py --workdir runs/xray_densenet \
#     --config.dataset.source_dir=/data/xray_by_stage --config.init_checkpoint=/weights/densenet121
"""configs/two_phase.py's recipe on DenseNet-121, the backbone chest X-ray work standardised on.

Why each choice (the rest is as in two_phase.py, whose reasons hold here too):
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
- Dropout 0.2 before the classifier (keep 0.8, as InceptionV3's head): DenseNet's own has none,
  but a new head on few images overfits quickly.
"""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
  c = default.get_config()
  c.model.name = 'densenet121'
  c.model.dropout_keep_prob = 0.8
  c.model.batch_norm_decay = 0.9
  c.input.image_size = 224
  c.input.batch_size = 32
  c.input.color_distortion = False
  c.input.random_crop = False
  c.exclude_scopes = 'classifier'
  c.trainable_scopes = 'classifier'
  c.batch_norm = 'frozen'
  c.label_smoothing = 0.1
  c.class_weighting = 'balanced'
  c.ema_decay = 0.999
  c.optimizer.name = 'momentum'
  c.optimizer.grad_clip_norm = 5.0
  c.schedule.name = 'fixed'
  c.schedule.learning_rate = 0.01
  c.phases.head = dict(num_steps=1000, trainable_scopes='classifier')
  c.phases.top = dict(
    num_steps=3000,
    trainable_scopes='denseblock4,norm5,classifier',
    schedule=dict(
      name='warmup_cosine', learning_rate=0.001, warmup_steps=100, end_learning_rate=0.0
    ),
  )
  c.eval_every_steps = 250
  c.checkpoint_every_steps = 250
  c.best_metric = 'kappa'
  c.early_stopping_patience = 6
  return c
