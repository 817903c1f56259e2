"""The parts of `--mode export`, which pneumo_jax/modes/export.py assembles into one folder.

`jax_export`: the network as a `jax.export` function. `saved_model`: a TensorFlow SavedModel of it
that also decodes files, in `tf_images`' TF ops. `serve.py`: the script an export ships beside
`model.jax_export` (copied with data/grey_window.py, which it loads); it runs without pneumo_jax,
so nothing here imports it.
"""
