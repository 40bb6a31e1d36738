"""Archive scoring: stored images -> Parquet rows, with one exact registered model version.

`thyroid-cad score` (cli/score.py) drives it. The rows come from the service's scoring
core (service.inference.pipeline), so every image gets the numbers /v1/predict would give it; the
engines only decide where that function runs: `local` (a process pool on this machine) or
`spark` (a pandas iterator UDF on Spark executors). docs/scale.md describes both.

Imports service/ and registry/, never training/ or TensorFlow (tests/test_layout.py).
"""

# What the command line offers, importable without the engines' dependencies.
ENGINES = ("local", "spark")
SPARK_READS = ("binaryfile", "paths")  # Spark reads the bytes, or each task reads its paths
