"""The batch index builder: images and captions in, a published index version out.

    from index_builder import BuildConfig, build
    manifest = build(BuildConfig(out="indexes", dataset="../shared/datasets/flickr8k"))

Versions are read with `retrieval.store.reader.IndexVersion`; see `index_builder.publish` for the
layout's guarantees (atomic CURRENT flip, keep N, gc). Each version's manifest carries the sphere's
geometry of its vectors (`index_builder.geometry`); `index_builder.audit` audits a published one
(near duplicates, captions that do not fit their image, outlier images).
"""

from index_builder.build import BuildConfig, build
from index_builder.publish import gc, list_index

__all__ = ["BuildConfig", "build", "gc", "list_index"]
