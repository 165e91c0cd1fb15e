"""Dataset readers, the synthetic generator, Parquet shards and the Ray Data pipeline."""
