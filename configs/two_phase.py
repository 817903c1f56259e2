# python main.py --config configs/two_phase.py --workdir runs/xray_two_phase \
#     --config.dataset.source_dir=/data/xray_by_stage --config.init_checkpoint=/weights/inception_v3
"""The recipe we recommend for ~2,000 graded chest X-rays: head first, then the top blocks.

Why each choice:
- Phase `head` (1,000 steps): only Logits and AuxLogits learn, on frozen ImageNet features, so the
  new random head stops sending large gradients before anything pretrained is touched.
- Phase `top` (3,000 steps, 10× lower rate, cosine to zero): Mixed_6e and Mixed_7a–7c adapt too.
  Features from natural images are rarely enough for X-rays, but ~2,000 images are too few to
  retrain all 27M parameters; the top blocks hold the most task-specific features.
- Batch norm stays in inference mode everywhere (`frozen`): with batches of 32 grey images the
  batch statistics are noisy and unlike ImageNet's; Keras's fine-tuning guide does the same.
- Momentum SGD with label smoothing, an EMA of the weights for evaluation, balanced class weights
  (stages are rarely balanced), and the best checkpoint chosen by quadratic weighted kappa,
  the ordinal agreement measure used for grading.
- Grey images: no colour distortion; no aggressive random crops that could cut away the
  opacities that decide the stage. Left-right flips keep the grading (profusion is bilateral).
"""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
  c = default.get_config()
  c.input.batch_size = 32
  c.input.color_distortion = False
  c.input.random_crop = False
  c.batch_norm = 'frozen'
  c.label_smoothing = 0.1
  c.class_weighting = 'balanced'
  c.ema_decay = 0.999
  c.optimizer.name = 'momentum'
  c.optimizer.grad_clip_norm = 5.0
  c.schedule.name = 'fixed'
  c.schedule.learning_rate = 0.01
  c.phase_order = 'head,top'
  c.phases.head = dict(num_steps=1000, trainable_scopes='Logits,AuxLogits')
  c.phases.top = dict(
    num_steps=3000,
    trainable_scopes='Mixed_6e,Mixed_7,Logits,AuxLogits',
    schedule=dict(
      name='warmup_cosine', learning_rate=0.001, warmup_steps=100, end_learning_rate=0.0
    ),
  )
  c.eval_every_steps = 250
  c.checkpoint_every_steps = 250
  c.early_stopping_patience = 6
  return c
