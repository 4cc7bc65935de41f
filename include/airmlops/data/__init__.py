"""The data layer, ingest side: the demo simulator, batch sources and raw snapshots.

``simulator`` generates the demo subscription business deterministically; ``sources`` pulls one
data interval from a spec's source (simulator, files or SQL through an Airflow connection);
``snapshots`` stores each batch as an immutable, content-addressed Parquet file, and moves bad
batches to quarantine with their validation report.
"""
