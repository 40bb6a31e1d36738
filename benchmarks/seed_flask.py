"""The seeds' way of serving, rebuilt for the benchmark: a Flask upload page over Keras.

As in the seed paper's web page (and the usual Flask + Keras tutorial it follows): the
model is loaded once at start, every upload is saved to an uploads folder, read back
with keras.utils.load_img at the model's input size (stretched, no crop), turned into
a batch of one and passed to model.predict; the page answers with the label. Flask's
own threaded server, one process. Benchmark code only: not part of the product.

    python benchmarks/seed_flask.py MODEL.keras [--port 5005]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import uuid
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import keras  # noqa: E402
import numpy as np  # noqa: E402
from flask import Flask, jsonify, request  # noqa: E402

from training import models  # noqa: E402, F401  (registers the custom layers for loading)

PAGE = """<!doctype html><title>Thyroid nodule classification</title>
<h1>Upload an ultrasound image</h1>
<form method=post action=/predict enctype=multipart/form-data>
<input type=file name=file><input type=submit value=Predict></form>"""


def create_app(model_path: str) -> Flask:
    app = Flask(__name__)
    model = keras.models.load_model(model_path)
    size = model.input_shape[1]
    labels = ["benign", "malignant"]
    uploads = Path(tempfile.mkdtemp(prefix="seed-uploads-"))

    @app.get("/")
    def index():
        return PAGE

    @app.post("/predict")
    def predict():
        f = request.files["file"]
        path = uploads / f"{uuid.uuid4().hex}-{Path(f.filename or 'upload').name}"
        f.save(path)
        img = keras.utils.load_img(path, target_size=(size, size))
        x = np.expand_dims(keras.utils.img_to_array(img), axis=0)
        preds = model.predict(x)
        path.unlink()
        i = int(np.argmax(preds[0]))
        return jsonify(label=labels[i], probability=float(preds[0][i]))

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--port", type=int, default=5005)
    args = parser.parse_args()
    create_app(args.model).run(host="127.0.0.1", port=args.port, threaded=True)


if __name__ == "__main__":
    main()
