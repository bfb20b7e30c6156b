"""The two extension points of alignment: sequence aligners and vocabulary mappings.

Each method registers itself where it is defined (`@ALIGNMENT_METHODS.register("dtw", ...)`); recipes name
them by string. The registry type is `fusemerge.registry.Registry`, shared by every extension point.
"""

from __future__ import annotations

from fusemerge.registry import Registry

# Sequence aligners: fn(source: TokenizedText, pivot: TokenizedText, **params) -> Alignment;
# batch: fn(pairs: Sequence[tuple[TokenizedText, TokenizedText]], **params) -> list[Alignment]
ALIGNMENT_METHODS: Registry = Registry("token alignment method")
# Vocabulary mappings: fn(source: TokenizerProfile, pivot: TokenizerProfile, **params) -> VocabMapping
VOCAB_MAPPINGS: Registry = Registry("vocabulary mapping")
