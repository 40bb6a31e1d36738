"""Which regularisation for each member of a two-backbone probe ensemble?

Research, not a product path: the frozen ImageNet MobileNetV2 and SqueezeNet features of
every image are computed once, then a logistic-regression probe per backbone (classes
balanced within every image source, as `--class-weights source`) is fitted for every C
of a grid, on the split's train images and on every leave-one-source-out fold (training.
loso's folds, which never read the test split). For each pair of Cs it prints the
combination's within-source validation AUCs, its LOSO AUCs (the two probes' probabilities
averaged) and the validation robust score (the worst of them), by which
configs/best.yaml's members were chosen. Test images are never scored (their features are
computed with the rest, and no probe sees them).

    .venv/bin/python scripts/ensemble_probe.py --data ../shared/data/thyroid-seed \
        --mobilenetv2 ../shared/data/pretrained/tf2_mobilenet_v2_1.0_224_ptq.tflite \
        --squeezenet \
        ../shared/data/pretrained/squeezenet_weights_tf_dim_ordering_tf_kernels_notop.h5

The members' own runs (`thyroid-cad train --config configs/best.yaml`) reproduce the
single-backbone LOSO AUCs printed here to three decimals. The product additionally
temperature-scales each member on validation before averaging, so its combined figures
differ in the last digits.
"""

from __future__ import annotations

import argparse
import itertools

import feature_probe  # scripts/, beside this file: the split, folds and preparation
import numpy as np
from feature_probe import SIZE
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from training import models, sources

GRID = {"mobilenetv2": (0.001, 0.003, 0.01), "squeezenet": (0.003, 0.01, 0.03)}


def pooled(backbone: str, weights: str, images: np.ndarray) -> np.ndarray:
    """The backbone's globally pooled last feature map (what the probe's head sees)."""
    net = models.build_backbone(backbone, SIZE, weights)
    maps = net.predict(images.astype("float32"), batch_size=32, verbose=0)
    return maps.mean(axis=(1, 2))


def probe(x, y, src, fit: list[int], score: list[int], c: float) -> np.ndarray:
    """P(malignant) on `score` of a probe fitted on `fit` (train.py's logreg pipeline)."""
    clf = make_pipeline(
        StandardScaler(), LogisticRegression(C=c, class_weight="balanced", max_iter=5000)
    )
    weights = sources.source_weights(y[fit], [src[i] for i in fit])
    clf.fit(x[fit], y[fit], logisticregression__sample_weight=weights)
    return clf.predict_proba(x[score])[:, 1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--mobilenetv2", required=True, help="MobileNetV2 weights file")
    ap.add_argument("--squeezenet", required=True, help="SqueezeNet v1.1 weights file")
    args = ap.parse_args()

    dataset, src, idx, names, folds = feature_probe.seed0_folds(args.data)
    y = np.asarray(dataset.labels) == dataset.class_names.index("malignant")
    images = np.stack(
        [feature_probe.prepared(r.path, "content-letterbox") for r in dataset.records]
    )
    feats = {
        "mobilenetv2": pooled("mobilenetv2", args.mobilenetv2, images),
        "squeezenet": pooled("squeezenet", args.squeezenet, images),
    }
    # every probe once: (backbone, C) -> (val probabilities, {source: fold probabilities})
    scored = {}
    for backbone, cs in GRID.items():
        for c in cs:
            x = feats[backbone]
            val = probe(x, y, src, idx["train"], idx["val"], c)
            held = {h: probe(x, y, src, f["train"], f["test"], c) for h, f in folds.items()}
            scored[backbone, c] = (val, held)
    val_src = np.asarray([src[i] for i in idx["val"]])
    y_val = y[idx["val"]]
    for cm, cs in itertools.product(GRID["mobilenetv2"], GRID["squeezenet"]):
        (vm, hm), (vs, hs) = scored["mobilenetv2", cm], scored["squeezenet", cs]
        p_val = (vm + vs) / 2
        within = {h: roc_auc_score(y_val[val_src == h], p_val[val_src == h]) for h in names}
        out = {h: roc_auc_score(y[folds[h]["test"]], (hm[h] + hs[h]) / 2) for h in names}
        robust = min([*within.values(), *out.values()])
        print(  # noqa: T201 - a script's result
            f"mobilenetv2 C={cm:<6} squeezenet C={cs:<6} val "
            + " ".join(f"{h}={a:.3f}" for h, a in within.items())
            + "  loso "
            + " ".join(f"{h}={a:.3f}" for h, a in out.items())
            + f"  val_robust={robust:.3f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
