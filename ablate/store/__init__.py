"""The Parquet store: the run record and its schema, reading and writing, the driver lock, log import."""
