"""The model registry (store.py) and its promotion gate (gate.py).

Names the command line needs before it imports MLflow live here.
"""

DEFAULT_NAME = "thyroid-nodule-classifier"
