"""Sources to network input: datasets, the index CSV, splits, labels, preprocessing, RecordIO packs."""
