"""`fusemerge demo`: FuseChat end to end on models trained on the spot, fully offline."""
