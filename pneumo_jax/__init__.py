"""pneumo_jax: fine-tune an ImageNet-pretrained network on your own small image collection.

Importing the package silences a few library messages that are never the user's concern (they
would otherwise repeat in every grain worker process, which imports the package too).
"""

import logging as _logging

# absl's logger first: created here as a plain logging.Logger, it would not skip absl's own frames
# and every record would name absl's file instead of its caller.
from absl import logging as _absl_logging

# The only place the version is written: pyproject.toml reads it from here (setuptools' dynamic
# version), and reports, model cards, exports and summary.json record it.
__version__ = '0.1.0'

# Substrings of library log messages that say nothing a user can act on.
_NOISE = (
  "Unable to initialize backend 'tpu'",  # JAX probing for a TPU on a CPU/GPU machine.
  'Using custom data configuration',  # TFDS, for every builder config it does not ship.
  'OpenCV is not installed',  # TFDS decodes with Pillow instead; fine for our images.
)


class _DropNoise(_logging.Filter):
  def filter(self, record: _logging.LogRecord) -> bool:
    message = record.getMessage() if record.args else str(record.msg)
    return not any(n in message for n in _NOISE)


_absl_logging.get_absl_logger().addFilter(_DropNoise())
_logging.getLogger('jax._src.xla_bridge').addFilter(_DropNoise())
