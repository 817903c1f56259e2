"""The runnable modes, one module each: `train`, `evaluate` (--mode eval), `predict`, `explain`,
`export`, `imagenet`, and `sweep` (many `train` runs, as trial processes). Inference modes restore
through `common.restore` and batch through `common.padded_batches`; `pneumo_jax/__main__.py`
dispatches."""
