"""Language-model plumbing shared by fuse, evaluate and merge: chat records and templates, tokenizing
with assistant masks, loading models and tokenizers under one safety policy, padding, and the top-K forward.

One owner for each of these facts, so that a fused model, its teacher pass and its evaluation read the
same text the same way (see ARCHITECTURE.md, "Contracts"). This package sits below fuse, merge and
evaluate and imports none of them.
"""
