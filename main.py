"""`python main.py …` is `python -m pneumo_jax …` (see pneumo_jax/__main__.py)."""

from pneumo_jax.__main__ import run

if __name__ == '__main__':
  run()
