"""Token alignment between models with different tokenizers (FuseChat); adding an aligner or a vocabulary
mapping: see ARCHITECTURE.md, "Extension points".

- `dtw_align` / `dtw`: MinED dynamic-programming alignment on token strings, exactly the reference's;
  `dtw_align_batch` / `dtw_alignment_batch` (or `align_batch("dtw", ...)`) for many sequences at once.
- `offsets`: exact alignment by fast tokenizers' character spans.
- Vocabulary mappings `exact`, `mined`, `stats`, `prefix`, saved and loaded with `VocabMapping.save` / `load`.
- `transfer_topk`: a source's top-K moved onto pivot positions and ids, with the next-gold fallback.

Example::

    pivot, source = TokenizerProfile.from_tokenizer(pivot_tok), TokenizerProfile.from_tokenizer(src_tok)
    p, s = tokenize(pivot_tok, text, profile=pivot), tokenize(src_tok, text, profile=source)
    alignment = align("offsets", s, p)
    mapping = build_vocab_mapping("exact", source, pivot)
    target = transfer_topk(alignment, s_topk_ids, s_topk_logprobs, mapping, p.ids)
"""

from collections.abc import Sequence

from fusemerge.fuse.align.alignment import Alignment, TokenizedText, tokenize
from fusemerge.fuse.align.dtw import dtw_align, dtw_align_batch, dtw_alignment, dtw_alignment_batch
from fusemerge.fuse.align.offsets import offsets_alignment
from fusemerge.fuse.align.profile import TokenizerProfile
from fusemerge.fuse.align.registry import ALIGNMENT_METHODS, VOCAB_MAPPINGS
from fusemerge.fuse.align.transfer import TransferredTopK, choose_source_positions, transfer_topk
from fusemerge.fuse.align.vocab import (
    CoAlignmentCounts,
    VocabMapping,
    build_vocab_mapping,
    same_start_alignment,
)


def align(method: str, source: TokenizedText, pivot: TokenizedText, **params: object) -> Alignment:
    """Align with a registered method by name (the recipe's `alignment.tokens`: dtw | offsets)."""
    return ALIGNMENT_METHODS.get(method, key="alignment.tokens").fn(source, pivot, **params)


def align_batch(
    method: str, pairs: Sequence[tuple[TokenizedText, TokenizedText]], **params: object
) -> list[Alignment]:
    """`align` over many (source, pivot) pairs, through the method's batched form when it has one.

    Corpus-level passes (teacher pass, co-alignment statistics) align thousands of short sequences, where
    per-call overhead, not the alignment, dominates; `dtw` has a batched form that does one compiled call.
    """
    entry = ALIGNMENT_METHODS.get(method, key="alignment.tokens")
    if entry.batch_fn is not None:
        return entry.batch_fn(pairs, **params)
    return [entry.fn(source, pivot, **params) for source, pivot in pairs]


__all__ = [
    "ALIGNMENT_METHODS",
    "VOCAB_MAPPINGS",
    "Alignment",
    "CoAlignmentCounts",
    "same_start_alignment",
    "TokenizedText",
    "TokenizerProfile",
    "TransferredTopK",
    "VocabMapping",
    "align",
    "align_batch",
    "build_vocab_mapping",
    "choose_source_positions",
    "dtw_align",
    "dtw_align_batch",
    "dtw_alignment",
    "dtw_alignment_batch",
    "offsets_alignment",
    "tokenize",
    "transfer_topk",
]
