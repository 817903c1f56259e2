"""Regular expressions over parameter paths: the one way to address parts of the model.

A path joins a variable's keys with '/', as TF-Slim's scopes do, e.g.
`Mixed_7c/Branch_1/Conv2d_0a_1x1/weights`. A pattern selects a path when it matches at the
start of it (`re.match`), so the slim-style scope prefix `Logits` selects everything under
`Logits/` and `Mixed_7.*` selects Mixed_7a–7c. Patterns come as a comma-separated string (the
way slim's `--trainable_scopes` flag takes them) or as a sequence.
"""

import re
from collections.abc import Mapping, Sequence
from typing import Any

from flax import traverse_util

from pneumo_jax.errors import ConfigError


def parse(patterns: str | Sequence[str] | None) -> tuple[str, ...]:
  """Returns patterns as a tuple, splitting a comma-separated string; validates each regex."""
  if patterns is None:
    return ()
  if isinstance(patterns, str):
    patterns = patterns.split(',')
  out = tuple(p.strip() for p in patterns if p.strip())
  for p in out:
    try:
      re.compile(p)
    except re.error as e:
      raise ConfigError(f'invalid scope pattern {p!r}: {e}') from e
  return out


def matches(patterns: str | Sequence[str] | None, path: str) -> bool:
  """True when any pattern matches `path` from its start."""
  return any(re.match(p, path) for p in parse(patterns))


def flatten(tree: Mapping[str, Any]) -> dict[str, Any]:
  """Nested dict → {'a/b/c': leaf}."""
  return traverse_util.flatten_dict(tree, sep='/')


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
  """{'a/b/c': leaf} → nested dict."""
  return traverse_util.unflatten_dict(dict(flat), sep='/')


def mask(tree: Mapping[str, Any], patterns: str | Sequence[str] | None) -> dict[str, Any]:
  """A tree of bools shaped like `tree`: True where the leaf's path matches a pattern."""
  pats = parse(patterns)
  return unflatten({k: matches(pats, k) for k in flatten(tree)})
