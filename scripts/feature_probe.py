"""Linear probes of frozen ImageNet MobileNetV2 features, leave-one-source-out.

Research, not a product path: which input preparation and which layers of the
pretrained network carry a thyroid signal that survives a new scanner? It uses the
project's own split and folds (training.splits / training.loso: train on the train part
of two sources, test on the held-out source's train + validation images; the test part
is never read) and prints one row per (preparation, features, C) with the three LOSO
AUCs. docs/results.md reports what it found.

    .venv/bin/python scripts/feature_probe.py --data ../shared/data/thyroid-seed \
        --weights ../shared/data/pretrained/tf2_mobilenet_v2_1.0_224_ptq.tflite
"""

from __future__ import annotations

import argparse
import json

import keras
import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from thyroid_cad import imaging
from training import loso, models, roi, sources
from training.audit import inspect_all
from training.data import scan
from training.splits import grouped_split

SIZE = 224
# Block outputs of keras.applications.MobileNetV2 at strides 4, 8, 16, 16, 32, 32.
LAYERS = ("block_2_add", "block_5_add", "block_9_add", "block_12_add", "block_15_add", "out_relu")


def prepared(path, how: str) -> np.ndarray:
    rgb = imaging.to_rgb_array(imaging.open_image(path))
    if how == "content-letterbox":  # the project's preparation (imaging.prepare)
        return imaging.prepare(rgb, SIZE)
    if how == "letterbox":  # the whole file, scanner frame included
        return imaging.letterbox(rgb, SIZE)
    if how == "content-squash":  # content box stretched to the square
        from PIL import Image

        return np.asarray(Image.fromarray(imaging.crop_to_content(rgb)).resize((SIZE, SIZE)))
    if how == "content-letterbox-grey":  # colour overlays (calipers, Doppler) removed
        grey = imaging.prepare(rgb, SIZE).mean(axis=2, keepdims=True)
        return np.repeat(grey, 3, axis=2).astype(np.uint8)
    if how == "content-letterbox-eq":  # grey levels equalised over the content
        from PIL import Image, ImageOps

        grey = Image.fromarray(imaging.crop_to_content(rgb)).convert("L")
        eq = np.asarray(ImageOps.equalize(grey).convert("RGB"))
        return imaging.letterbox(eq, SIZE)
    raise ValueError(how)


def seed0_folds(data: str):
    """(dataset, sources, split indices, source names, LOSO folds) of thyroid-seed's
    split seed 0, as `thyroid-cad train` draws it (training.splits / training.loso)."""
    dataset = scan(data)
    infos = inspect_all(dataset)
    src = sources.assign_sources(dataset, infos)
    split = grouped_split(dataset, 0.15, 0.15, 0, infos)
    idx = {s: split.indices(s) for s in ("train", "val", "test")}
    names = sorted(set(src))
    folds = {h: loso.holdout_indices(idx, src, h, split.groups) for h in names}
    return dataset, src, idx, names, folds


def extractor(weights: str) -> keras.Model:
    """The training backbone (weights imported as `thyroid-cad train` does), with mean
    and standard deviation pooling of every block output in LAYERS."""
    encoder = models.mobilenetv2_layers(SIZE, weights, LAYERS)
    inputs = keras.Input((SIZE, SIZE, 3))
    outs = encoder(inputs)
    pooled = []
    for o in outs:  # mean and standard deviation over space: a texture statistic
        mean = keras.ops.mean(o, axis=(1, 2))
        std = keras.ops.sqrt(keras.ops.var(o, axis=(1, 2)) + 1e-6)
        pooled += [mean, std]
    return keras.Model(inputs, pooled)


def features(model, images: np.ndarray, flip: bool) -> list[np.ndarray]:
    def run(batch: np.ndarray) -> list[np.ndarray]:
        return [np.asarray(a) for a in model.predict(batch.astype("float32"), verbose=0)]

    out = run(images)
    if flip:
        back = run(images[:, :, ::-1])
        out = [(a + b) / 2 for a, b in zip(out, back, strict=True)]
    return out


def sets(parts: list[np.ndarray]) -> dict[str, np.ndarray]:
    mean = parts[0::2]
    std = parts[1::2]
    return {
        "final-mean": mean[-1],
        "mid-mean(9,12)": np.concatenate([mean[2], mean[3]], axis=1),
        "block12-mean+std": np.concatenate([mean[3], std[3]], axis=1),
        "block15-mean": mean[4],
        "multi-mean(all)": np.concatenate(mean, axis=1),
        "multi-mean+std(all)": np.concatenate(mean + std, axis=1),
        "final+mid-mean": np.concatenate([mean[3], mean[4], mean[5]], axis=1),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--weights", required=True)
    ap.add_argument(
        "--prep", nargs="+", default=["content-letterbox", "letterbox", "content-squash"]
    )
    ap.add_argument("--flip", action="store_true")
    ap.add_argument(
        "--localiser",
        default=None,
        help="also probe the localiser's nodule crop (margin --margin) alone and beside "
        "the whole frame (both views' final pooled features side by side)",
    )
    ap.add_argument("--margin", type=float, default=1.0)
    ap.add_argument("--out", default=None, help="write the rows as JSON here")
    args = ap.parse_args()

    dataset, src, idx, names, folds = seed0_folds(args.data)
    labels = np.asarray(dataset.labels)
    positive = dataset.class_names.index("malignant")
    model = extractor(args.weights)
    rows = []
    views = {prep: None for prep in args.prep}
    if args.localiser:
        boxes = roi.propose_all(
            [r.path for r in dataset.records],
            dataset.sha256(),
            roi.resolve_localiser(args.localiser),
        )
        views[f"crop-{args.margin}"] = boxes
    whole = None
    for prep, boxes in views.items():
        if boxes is None:
            images = np.stack([prepared(r.path, prep) for r in dataset.records])
        else:
            images = np.stack(
                [
                    imaging.load_prepared(r.path, SIZE, b, args.margin)
                    for r, b in zip(dataset.records, boxes, strict=True)
                ]
            )
        named = sets(features(model, images, args.flip))
        if boxes is None and prep == "content-letterbox":
            whole = named["final-mean"]
        if boxes is not None:
            named = {"final-mean": named["final-mean"]}
            if whole is not None:
                named["whole+crop final"] = np.concatenate([whole, named["final-mean"]], axis=1)
        for feat, x in named.items():
            for c in (0.001, 0.01, 0.1):
                aucs = {}
                for h, f in folds.items():
                    tr = f["train"] + f["val"]
                    clf = make_pipeline(
                        StandardScaler(),
                        LogisticRegression(C=c, max_iter=2000, class_weight="balanced"),
                    )
                    clf.fit(x[tr], labels[tr] == positive)
                    p = clf.predict_proba(x[f["test"]])[:, 1]
                    aucs[h] = roc_auc_score(labels[f["test"]] == positive, p)
                row = {"prep": prep, "features": feat, "dim": x.shape[1], "C": c, **aucs}
                row["min"] = min(aucs.values())
                row["mean"] = float(np.mean(list(aucs.values())))
                rows.append(row)
                print(  # noqa: T201 - a script's result
                    f"{prep:18s} {feat:22s} {x.shape[1]:5d} C={c:<6} "
                    + " ".join(f"{h}={a:.3f}" for h, a in aucs.items())
                    + f"  min={row['min']:.3f} mean={row['mean']:.3f}",
                    flush=True,
                )
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(rows, fh, indent=1)


if __name__ == "__main__":
    main()
