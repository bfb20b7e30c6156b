"""fusemerge: FuseChat-style knowledge fusion and memory-efficient merging of chat LLMs.

The package is a library of small parts (checkpoint reader/writer, merge methods, aligners, losses);
`fusemerge.cli` only parses arguments and calls the Python API, so everything is usable from a notebook.
Heavy libraries (torch, transformers, mergekit) are imported inside the functions that need them so
that `fusemerge --help` stays instant.
"""

from fusemerge.errors import FusemergeError

__version__ = "0.1.0"

__all__ = ["FusemergeError", "__version__"]
