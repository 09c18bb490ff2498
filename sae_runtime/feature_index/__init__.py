"""Feature index: what each feature of a dictionary responds to (``sae-index`` builds it,
the server reads it). Format: :mod:`.schema`; access: :mod:`.store`."""

from .schema import HIST_BINS, INDEX_FILE, QUANTILE_LEVELS, SCHEMA_VERSION
from .store import Example, FeatureIndex, FeatureIndexError, FeatureRecord, IndexWriter, SearchHit, TokenCount

__all__ = ["HIST_BINS", "INDEX_FILE", "QUANTILE_LEVELS", "SCHEMA_VERSION", "Example", "FeatureIndex",
           "FeatureIndexError", "FeatureRecord", "IndexWriter", "SearchHit", "TokenCount"]
