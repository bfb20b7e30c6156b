"""Merging: recipe -> plan -> stream of tensors -> sharded writer, with mergekit as the fallback engine.

Where things are (see ARCHITECTURE.md, "Data flows"): `api.run_merge` is the entry point; `options` the
run's settings; `recipe` parses the YAML once; `routing` picks the engine (`vocabulary`: whether a
`tokenizer_source` needs rows taken by token); `plan` checks the whole recipe
from headers and builds the tensor tasks; `engine` streams them through a method (`methods/`, standing on
`sparsify`, `seeds` and `kernels/`); `output` and `side_files` finish the folder; `fallback` runs mergekit
under the same output handling.
"""
