# python main.py --config configs/default.py --workdir runs/xray \
#     --config.dataset.source_dir=/data/xray_by_stage --config.init_checkpoint=/weights/inception_v3
"""The seed's recipe (TF-Slim `train_image_classifier.py` as the 2017 tutorial ran it).

Head-only fine-tuning of an ImageNet InceptionV3: RMSProp at a fixed 0.01, batch 16, 6,000 steps,
weight decay 4e-5. Unlike the seed, frozen scopes run batch norm in inference mode, so the ImageNet
statistics survive. Every field a user may set is documented here, once; other configs import
this one and override.
"""

import ml_collections

from pneumo_jax import heads, models
from pneumo_jax.evaluation import metrics


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0  # Seeds parameter init, dropout, shuffling and augmentation.

  # --- Data: class folders, split folders or a label file (README "Your own data"). ---
  c.dataset = ml_collections.ConfigDict()
  # The image folder (or set labels_csv instead; one of the two is required). Either one
  # subfolder per class (source_dir/stage_0/…), or split folders each holding the same class
  # subfolders (source_dir/{train,val,test}/NORMAL/…; val may be valid or validation, any
  # case). Split folders are the splits: the fractions below do not re-split them, except that
  # without a val folder validation is drawn from train by validation_fraction, and that with
  # num_folds > 1 the train and val folders are pooled and folded (test stays the test folder).
  # test_fraction must then be 0 when a test folder exists.
  c.dataset.source_dir = ''
  # A CSV instead of source_dir: columns path (relative to the CSV's folder, or absolute) and
  # label (a class name); optional patient_id, and split (train, validation or test; empty:
  # drawn by the fractions, as are all rows without the column). Bad rows (missing file, empty
  # label, unknown split, repeated path) are an error naming their line numbers, or skipped and
  # listed with skip_corrupt. Its content is part of the build's fingerprint.
  c.dataset.labels_csv = ''
  # 'single': one class per image (folders, or a label file's label column). 'multilabel':
  # several findings per film, from labels_csv only: columns path (optional patient_id, split)
  # and one per finding, each cell 1 (present), 0 (absent), -1 (uncertain) or blank (not
  # mentioned), also as 1.0/0.0/-1.0 (CheXpert's file); any other value is an error naming the
  # line and column. Its splits keep every finding's positives in each split (docs/datasets.md).
  # model.head and best_metric follow it unless set.
  c.dataset.task = 'single'
  # Multilabel: the finding columns, in order, as a list or a comma string ('Effusion,Nodule');
  # empty → every column but path, patient_id and split.
  c.dataset.label_columns = ml_collections.FieldReference('', field_type=object)
  # Multilabel: what a -1 (uncertain) cell becomes: 'ignore' (masked out of the loss and the
  # metrics), 'zeros' (absent) or 'ones' (present): CheXpert's U-Ignore, U-Zeros, U-Ones.
  c.dataset.uncertain = 'ignore'
  c.dataset.blank = 'zeros'  # Multilabel: what a blank cell becomes (the same choices).
  # Class names in label order, as a list or a comma string ('none,mild,moderate,severe':
  # ordinal grades need their order). Must name exactly the classes of the folders or label
  # file. Empty → sorted names.
  c.dataset.class_names = ml_collections.FieldReference('', field_type=object)
  # A regex searched in each file's path relative to the source (a label file's patient_id
  # column comes first): its first group, or the whole match, is the patient, e.g.
  # r'(person\d+)_' on person12_bacteria_1.jpeg; it must match every file (a file it misses is
  # an error naming it: add alternatives, e.g. r'(person\d+)_|(IM-\d+)-'). Unset, DICOM files
  # give their PatientID. With patients known, splits and folds keep each patient's films in
  # one split; identical images (same decoded pixels) always stay together too. Without them
  # the split is by image (the log and model card say so).
  c.dataset.patient_pattern = ''
  c.dataset.data_dir = ''  # Where built array_record shards go; '' → WORKDIR/data.
  c.dataset.validation_fraction = 0.2  # Per class (stratified).
  c.dataset.test_fraction = 0.0  # Per class, held out before validation; 0 → no test split.
  c.dataset.split_seed = 0  # Seeds the stratified split; same seed, same split.
  c.dataset.num_shards = 1  # array_record shards per split.
  # True: skip and list unreadable images (broken files, link loops, dangling links, files
  # without read permission, suspicious sizes) and bad label-file rows instead of failing.
  c.dataset.skip_corrupt = False
  # Images too degenerate to be films are listed as suspicious (like unreadable ones: an error,
  # or skipped with skip_corrupt) by the build, predict and explain, instead of being squashed
  # to the input size without a word: a decoded image with fewer than min_image_side pixels on
  # a side, or whose longer side exceeds max_aspect_ratio times its shorter one. 0 turns a
  # bound off. Part of the build's fingerprint. The default side only catches icons and
  # one-pixel images (tiny test images stay valid); films are hundreds of pixels, so a real
  # collection may raise it (e.g. 256).
  c.dataset.min_image_side = 8
  c.dataset.max_aspect_ratio = 4.0
  c.dataset.num_folds = 0  # k > 1: k-fold CV; validation = fold `fold` (validation_fraction
  #   is then ignored).
  c.dataset.fold = 0  # Which fold is the validation split when num_folds > 1.
  c.dataset.synthetic = False  # True: generate the demo's 4-stage images into source_dir
  #   (default: DATA_DIR/synthetic_stages) when they are not there yet.
  c.dataset.synthetic_images_per_class = 120
  c.dataset.synthetic_image_size = 128
  # Side of the square images the build stores (each file decoded, squashed to a square and
  # antialiased once), so that training decodes small images instead of full-size X-rays.
  # None → ceil(input.image_size / 0.875) (342 at 299): slim's 0.875 central crop of it is then
  # input.image_size pixels. Must be >= input.image_size. Part of the build's fingerprint.
  c.dataset.stored_size = ml_collections.FieldReference(None, field_type=int)
  c.dataset.full_resolution = False  # True: store files at full resolution (PNG) and resize on
  #   every read: slower, but one build serves several input.image_size values.
  # How grey images deeper than 8 bits (DICOM, 16-bit PNG/TIFF) become 8-bit, i.e. which values
  # map to black and white (linearly between; DICOM's rescale slope/intercept applied first,
  # MONOCHROME1 inverted last). 8-bit files are read as they are, whatever this says.
  #   'file': a DICOM's own VOI LUT or window centre/width when it has one; otherwise the range
  #     of the stored bits: a DICOM's BitsStored, a 16-bit PNG/TIFF's smallest depth of 8–16
  #     bits that holds its brightest pixel (12-bit data, 0–4095: 4095 → white).
  #   'percentile': each image's own 0.5th to 99.5th percentile (robust to a few extreme pixels,
  #     but the same tissue may differ in grey from film to film).
  #   'fixed': grey_window_range below, for every image.
  #   'full_range': the whole range of the sample type (16-bit PNG/TIFF: 65535 → white, as
  #     builds before DICOM support stored them; DICOM: BitsAllocated).
  # Part of the build's fingerprint; predict and explain read files with it too.
  c.dataset.grey_window = 'file'
  # 'fixed' only: (low, high) in the images' values (DICOM: after rescale slope/intercept), e.g.
  # --config.dataset.grey_window_range='(0, 4095)'.
  c.dataset.grey_window_range = ml_collections.FieldReference(None, field_type=tuple)

  # --- Input pipeline (grain; TF-Slim inception preprocessing). ---
  c.input = ml_collections.ConfigDict()
  c.input.image_size = 299  # Square side fed to the net; InceptionV3 accepts >= 75.
  c.input.batch_size = 16  # Global training batch, split over all devices.
  c.input.eval_batch_size = 32  # Global evaluation batch.
  c.input.random_crop = True  # Train: slim's distorted bounding-box crop.
  c.input.random_flip = True  # Train: random left-right flip.
  c.input.color_distortion = True  # Train: brightness/saturation jitter (grey X-rays: off).
  # Eval, predict and explain: central crop before resize. None → follow the training view:
  # 1.0 (the whole image, as training resizes it) when random_crop is off, slim's 0.875 when on
  # (its distorted crops cover 5–100% of the image). Setting it below 1.0 with random_crop off
  # judges the model on a zoom it never saw (a warning says so).
  c.input.central_crop_fraction = ml_collections.FieldReference(None, field_type=float)
  # grain worker processes reading records: 'auto' → none when the model runs on the CPU (it
  # needs the cores), else one per core but one, up to 16 (README's performance table); or a
  # number: 0 (main process) or >= 2 (1 is slow to close). Resume with the same number: each
  # worker batches its own slice of the stream.
  c.input.num_workers = ml_collections.FieldReference('auto', field_type=object)
  c.input.class_balanced = False  # Sample classes equally (with replacement) for training.

  # --- Model. ---
  c.model = ml_collections.ConfigDict()
  # The backbone: 'inception_v3' (TF-Slim scope names; the fields below marked InceptionV3 apply
  # to it only) or 'densenet121' (torchvision names; see configs/densenet_two_phase.py).
  c.model.name = 'inception_v3'
  c.model.create_aux_logits = True  # InceptionV3: aux head on Mixed_6e (slim's flag).
  c.model.dropout_keep_prob = 0.8  # Before the logits, as in slim (1.0: no dropout).
  c.model.depth_multiplier = 1.0  # InceptionV3: scales every conv's depth (!= 1: no ImageNet
  #   weights fit).
  c.model.min_depth = 16  # InceptionV3: floor for scaled depths.
  c.model.batch_norm_decay = 0.9997  # Moving-average decay (slim's); lower it from scratch.
  c.model.dtype = 'float32'  # Compute dtype: 'bfloat16' for mixed precision (params stay f32).
  # The classifier head (pneumo_jax/heads.py): 'softmax' (K outputs, cross-entropy) or 'ordinal'
  # (CORN: K − 1 "grade > k" outputs whose class probabilities respect the classes' order, for
  # graded classes such as stages 0–3 in dataset.class_names' order; the aux head likewise).
  # label_smoothing then smooths each "grade > k" target and class weights weigh each example.
  # 'sigmoid': one sigmoid per finding with binary cross-entropy, ignored labels masked
  # (dataset.task='multilabel' only; the other two are single-label only). Unset, it follows
  # dataset.task: 'softmax' for single, 'sigmoid' for multilabel.
  c.model.head = heads.default_for(c.dataset.get_ref('task'))

  # --- Initialisation, as slim's --checkpoint_path / --checkpoint_exclude_scopes. ---
  c.init_checkpoint = ''  # Orbax dir with params + batch_stats (see converters/); '' → random.
  # Regexes: re-initialised instead of loaded. Unset, the backbone's head (its record's
  # head_scopes: 'Logits,AuxLogits' for inception_v3, 'classifier' for densenet121), following
  # model.name; '' loads everything.
  c.exclude_scopes = models.head_scopes_of(c.model.get_ref('name'))
  c.ignore_missing_vars = False  # True: model variables absent from the checkpoint stay random.

  # --- What trains (slim's --trainable_scopes): comma-separated regexes over param paths. ---
  # Unset, the backbone's head (as exclude_scopes), following model.name; '.*' → everything.
  c.trainable_scopes = models.head_scopes_of(c.model.get_ref('name'))
  # Batch norm while training: 'trainable' → BN learns only inside trainable scopes, frozen ones
  # run in inference mode (the Keras rule); 'frozen' → all BN in inference mode; 'all' → every
  # BN uses batch statistics and updates its moving averages (what the seed's slim run did).
  c.batch_norm = 'trainable'
  # When a phase's augmentation is a finite set of views (random_crop and color_distortion off;
  # a flip makes two) and batch norm below its trainable layers is frozen, run the frozen layers
  # once per image and view and train from their stored outputs (WORKDIR/features): the heads'
  # inputs when only heads train (Logits, AuxLogits; DenseNet's classifier), the last frozen
  # block's output when top blocks train too (two_phase.py's `top`: Mixed_6d, 0.9 MB per image
  # and view at 299, built only if it fits on disk). Same numbers, far fewer passes. False:
  # always run the whole network. A phase may override it; the log says when and why a phase
  # runs uncached.
  c.feature_cache = True

  # --- Staged fine-tuning: named phases, run in phase_order. Each has num_steps and may override
  # trainable_scopes, batch_norm, schedule.*, optimizer.* and feature_cache; each starts a fresh
  # optimizer. Empty → one phase of num_steps from the fields above. See configs/two_phase.py.
  c.phases = ml_collections.ConfigDict()
  # With several phases: their names in the order they run, e.g. 'head,top' (required:
  # ml_collections sorts a ConfigDict's keys, so the order they are written in is lost).
  c.phase_order = ''

  # --- Loss. ---
  c.aux_loss_weight = 0.4  # Weight of the aux head's cross-entropy.
  c.label_smoothing = 0.0  # Findings (sigmoid): targets become 1 − ε/2 and ε/2.
  # 'balanced' → weight classes by n / (k · count), scikit-learn's rule; for findings, per
  # finding, its negatives and positives each n / (2 · count) over its used labels.
  c.class_weighting = ''
  c.ema_decay = 0.0  # > 0 (e.g. 0.999): keep an EMA of the weights; eval/predict use it.

  # --- Optimizer (slim's flags and defaults). ---
  c.optimizer = ml_collections.ConfigDict()
  # name: rmsprop | momentum | sgd | adam | adamw | adagrad | adadelta | ftrl.
  c.optimizer.name = 'rmsprop'
  c.optimizer.weight_decay = 4e-5  # L2 on conv kernels added to the gradient (slim's).
  c.optimizer.grad_clip_norm = 0.0  # > 0: clip the global gradient norm (slim: clip_gradient_norm).
  c.optimizer.momentum = 0.9  # momentum.
  c.optimizer.rmsprop_momentum = 0.9
  c.optimizer.rmsprop_decay = 0.9
  c.optimizer.epsilon = 1.0  # slim's --opt_epsilon (rmsprop, adam, adamw, adadelta).
  c.optimizer.adam_beta1 = 0.9  # adam, adamw.
  c.optimizer.adam_beta2 = 0.999  # adam, adamw.
  c.optimizer.adamw_weight_decay = 1e-4  # adamw's decoupled decay (on conv kernels).
  c.optimizer.adagrad_initial_accumulator_value = 0.1
  c.optimizer.adadelta_rho = 0.95
  c.optimizer.ftrl_learning_rate_power = -0.5
  c.optimizer.ftrl_initial_accumulator_value = 0.1
  c.optimizer.ftrl_l1 = 0.0
  c.optimizer.ftrl_l2 = 0.0

  # --- Learning-rate schedule. ---
  c.schedule = ml_collections.ConfigDict()
  c.schedule.name = 'fixed'  # fixed | exponential | polynomial | warmup_cosine
  c.schedule.learning_rate = 0.01
  c.schedule.end_learning_rate = 1e-4  # polynomial.
  c.schedule.decay_rate = 0.94  # exponential: factor per decay_steps.
  c.schedule.decay_steps = 1000  # exponential.
  c.schedule.staircase = True  # exponential.
  c.schedule.power = 1.0  # polynomial.
  c.schedule.warmup_steps = 0  # warmup_cosine.

  # --- Length, logging, checkpoints. ---
  c.num_steps = 6000  # slim's --max_number_of_steps (ignored when phases are given).
  c.log_every_steps = 10  # slim's --log_every_n_steps.
  c.log_every_secs = 0  # > 0: also log at least this often (slim's --save_summaries_secs).
  c.eval_every_steps = 500  # Validation evaluation; 0 → only at the end.
  c.checkpoint_every_steps = 500
  c.checkpoint_every_secs = 0  # > 0: also save this often (slim's --save_interval_secs).
  c.keep_checkpoints = 3  # Latest checkpoints kept (the best is kept apart, in WORKDIR/best).
  c.early_stopping_patience = 0  # > 0: stop after this many evals without a new best.
  # Validation metric that picks the best checkpoint and ranks sweeps: accuracy |
  # balanced_accuracy | kappa (quadratic weighted; single-label only) | auc_macro | loss (lower
  # wins). Unset, it follows dataset.task: kappa for single, auc_macro (mean of the findings'
  # ROC AUCs) for multilabel.
  c.best_metric = metrics.default_best_metric(c.dataset.get_ref('task'))
  # The threshold at which --mode predict writes each "class ≥ k" decision (decision_ge_<class>
  # columns; for findings each finding's decision_<finding>), once --mode eval has chosen the
  # thresholds on the validation split:
  # youden (Youden's J) | sensitivity_90 | sensitivity_95 (the highest reaching that sensitivity).
  c.operating_point = 'youden'
  return c
