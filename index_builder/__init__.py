"""The batch index builder: images and captions in, a published index version out.

    from index_builder import BuildConfig, build
    manifest = build(BuildConfig(out="indexes", dataset="../shared/datasets/flickr8k"))

Versions are read with `retrieval.store.reader.IndexVersion`; see `index_builder.publish` for the
layout's guarantees (atomic CURRENT flip, keep N, gc).
"""
from index_builder.build import BuildConfig, build
from index_builder.publish import gc, list_index

__all__ = ["BuildConfig", "build", "gc", "list_index"]
