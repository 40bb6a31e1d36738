"""Sweeps: a grid of backbone x strategy x classifier x stage (x any option) under one
parent run, ranked by the source-robust score.

Configuration (YAML; relative paths are relative to the file)::

    experiment: thyroid-sweep
    data: ../shared/data/thyroid-seed
    image_size: 128
    epochs: 15
    weights: none            # or imagenet, or a local weights file
    loso: true               # the default in sweeps (leave-one-source-out folds)
    grid:
      backbone: [tiny, vgg16]
      strategy: [full]
      classifier: [softmax, svm, rf]
      stage: [direct, progressive]
      class_weights: [global, source]     # any other TrainConfig field is an axis too
      scanner_augment: [false, true]
    progressive:             # needed when stage includes progressive
      data: ../shared/data/chest-xray
      epochs: 3
      max_images: 2000

Any other TrainConfig field (batch_size, seed, unfreeze_blocks, ...) may be given at
the top level, or as a grid axis (a list of values); not both. Work is shared where
the science allows: the radiograph stage is trained once per backbone, and SVM /
Random Forest children take their features from the network their softmax sibling
(same point on every other axis) fine-tuned (they log init_from and strategy
'frozen', which is what they did; their LOSO folds start from the sibling's folds).
A sweep interrupted for any reason resumes: the parent run is found by the
configuration's hash and finished children are skipped.

The leaderboard ranks by ``val_robust_score`` (training.sources.robust_scores: the
worst of the within-source validation AUCs and the LOSO AUCs, which use no test
image), then validation AUC; it shows the test-side ``robust_score``, pooled test AUC,
the shortcut floor, the AUC within each source and each LOSO AUC beside it.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import math
import tempfile
from dataclasses import dataclass, fields, replace
from pathlib import Path

import mlflow
from mlflow.tracking import MlflowClient

from training import sources, tracking
from training.config import check_types, read_yaml, resolve_paths
from training.train import CLASSIFIERS, TrainConfig, train

log = logging.getLogger(__name__)

SWEEP_STAGES = ("direct", "progressive")
GRID_KEYS = ("backbone", "strategy", "classifier", "stage")  # every combination names these
# TrainConfig fields that are no axis: where the data is, and what the sweep sets itself.
NOT_AXES = ("data", "experiment", "run_name", "init_from", "holdout_source")
LEADERBOARD_METRICS = (
    "val_robust_score",
    "robust_score",
    "loso_auc_min",
    "val_auc",
    "val_auc_ci_low",
    "val_auc_ci_high",
    "test_auc",
    "test_auc_ci_low",
    "test_auc_ci_high",
    "test_shortcut_auc",
    "test_shortcut_auc_ci_low",
    "test_shortcut_auc_ci_high",
    "test_sensitivity",
    "test_specificity",
    "test_accuracy",
    "test_ece",
)


@dataclass
class SweepSpec:
    base: TrainConfig
    grid: dict[str, list]
    progressive: dict
    config_hash: str

    @property
    def axes(self) -> list[str]:
        """GRID_KEYS, then the other axes in alphabetical order."""
        return list(GRID_KEYS) + sorted(set(self.grid) - set(GRID_KEYS))

    def combos(self) -> list[dict]:
        """Every grid point; softmax first in each group so SVM/RF can reuse its network."""
        axes = self.axes
        grid = itertools.product(*(self.grid[k] for k in axes))
        points = [dict(zip(axes, p, strict=True)) for p in grid]
        return sorted(
            points,
            key=lambda c: (
                c["stage"],
                c["backbone"],
                c["strategy"],
                *(str(c[k]) for k in axes[len(GRID_KEYS) :]),
                CLASSIFIERS.index(c["classifier"]),
            ),
        )


def load_config(path: str | Path) -> SweepSpec:
    """Read and check a sweep YAML file.

    Raises:
        ValueError: missing or unknown keys, bad values, missing progressive data.
    """
    path = Path(path)
    raw = read_yaml(path)
    if "data" not in raw or "grid" not in raw:
        raise ValueError(f"{path}: a sweep needs 'data' and 'grid'")
    grid = raw.pop("grid")
    progressive = raw.pop("progressive", None) or {}
    raw.setdefault("loso", True)
    fields_ = {f.name for f in fields(TrainConfig)}
    known = fields_ - set(GRID_KEYS) - {"init_from", "run_name", "holdout_source"}
    unknown = set(raw) - known
    if unknown:
        raise ValueError(f"{path}: unknown keys {sorted(unknown)}; allowed: {sorted(known)}")
    axes_allowed = (fields_ - set(NOT_AXES)) | set(GRID_KEYS)
    if not isinstance(grid, dict) or set(grid) - axes_allowed:
        bad = sorted(set(grid) - axes_allowed) if isinstance(grid, dict) else grid
        raise ValueError(
            f"{path}: grid keys must be TrainConfig fields ({sorted(axes_allowed)}); got {bad}"
        )
    twice = sorted(set(grid) & set(raw))
    if twice:
        raise ValueError(f"{path}: {twice} given both at the top level and as grid axes")
    grid = {k: (v if isinstance(v, list) else [v]) for k, v in grid.items() if v is not None}
    for key in ("backbone", "strategy", "classifier"):
        if not grid.get(key):
            raise ValueError(f"{path}: grid.{key} needs at least one value")
    grid["stage"] = [str(v) for v in grid.get("stage") or ["direct"]]
    if set(grid["stage"]) - set(SWEEP_STAGES):
        raise ValueError(f"{path}: grid.stage values must be among {SWEEP_STAGES}")
    for key, values in grid.items():
        if not values:
            raise ValueError(f"{path}: grid.{key} needs at least one value")
        for value in values:
            check_types({key: value}, f"{path}: grid")
    check_types(raw, str(path))
    raw = resolve_paths(raw, path.parent)
    if "progressive" in grid["stage"]:
        if "data" not in progressive:
            raise ValueError(f"{path}: stage 'progressive' needs progressive.data")
        progressive = {
            **progressive,
            **resolve_paths({k: progressive.get(k) for k in ("data", "manifest")}, path.parent),
        }
    spec = SweepSpec(TrainConfig(**raw), grid, progressive, "")
    for combo in spec.combos():
        _train_config(spec, combo).validate()
    canonical = json.dumps({"base": raw, "grid": grid, "progressive": progressive}, sort_keys=True)
    spec.config_hash = hashlib.sha256(canonical.encode()).hexdigest()[:16]
    return spec


def _combo_key(combo: dict) -> str:
    """backbone/strategy/classifier/stage, then /axis=value for every other axis."""
    extra = sorted(set(combo) - set(GRID_KEYS))
    return "/".join(str(combo[k]) for k in GRID_KEYS) + "".join(f"/{k}={combo[k]}" for k in extra)


def _train_config(spec: SweepSpec, combo: dict) -> TrainConfig:
    """The base configuration at one grid point (the stage is handled by _run_combo)."""
    axes = {k: v for k, v in combo.items() if k != "stage"}
    return replace(spec.base, **axes, run_name=_combo_key(combo))


def _unfinished_parent(client: MlflowClient, experiment_id: str, config_hash: str):
    runs = client.search_runs(
        [experiment_id],
        filter_string=f"tags.sweep_config_hash = '{config_hash}' and tags.sweep_parent = 'true'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return runs[0] if runs and runs[0].info.status != "FINISHED" else None


def _finished_children(client: MlflowClient, experiment_id: str, parent_id: str) -> dict[str, str]:
    runs = client.search_runs(
        [experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent_id}'", max_results=5000
    )
    return {
        r.data.tags["combo"]: r.info.run_id
        for r in runs
        if r.info.status == "FINISHED" and "combo" in r.data.tags
    }


def run_sweep(spec: SweepSpec, resume: bool = True) -> tuple[str, str]:
    """Run (or resume) a sweep. Returns (parent run id, leaderboard as markdown)."""
    experiment_id = tracking.setup(spec.base.experiment)
    client = MlflowClient()
    previous = _unfinished_parent(client, experiment_id, spec.config_hash) if resume else None
    start = (
        {"run_id": previous.info.run_id}
        if previous
        else {
            "run_name": f"sweep-{spec.config_hash[:8]}",
            "tags": {"sweep_parent": "true", "sweep_config_hash": spec.config_hash},
        }
    )
    with mlflow.start_run(**start) as parent:
        parent_id = parent.info.run_id
        done = _finished_children(client, experiment_id, parent_id)
        if previous:
            log.info("resuming sweep %s: %d runs already finished", parent_id, len(done))
        else:
            mlflow.log_params(
                {
                    "grid": json.dumps(spec.grid),
                    "data": spec.base.data,
                    "image_size": spec.base.image_size,
                    "epochs": spec.base.epochs,
                }
            )
        results: list[tuple[dict, str | None]] = []
        for combo in spec.combos():
            key = _combo_key(combo)
            if key in done:
                results.append((combo, done[key]))
                continue
            try:
                done[key] = _run_combo(spec, combo, parent_id, done)
                results.append((combo, done[key]))
            except Exception:  # noqa: BLE001 - one failed combination must not end the sweep
                log.exception("sweep combination %s failed; the sweep goes on", key)
                results.append((combo, None))
        table, rows = _leaderboard(client, spec, results)
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "leaderboard.md").write_text(table + "\n")
            (Path(tmp) / "leaderboard.json").write_text(json.dumps(rows, indent=1))
            mlflow.log_artifacts(tmp)
        finished = [r for r in rows if r.get("run_id")]
        if finished:
            best = finished[0]
            mlflow.set_tag("best_run", best["run_id"])
            mlflow.log_metrics(
                {
                    f"best_{m}": best[m]
                    for m in ("val_robust_score", "val_auc", "robust_score")
                    if math.isfinite(best.get(m, math.nan))
                }
            )
        mlflow.set_tag("failed_combinations", str(sum(1 for r in rows if not r.get("run_id"))))
    return parent_id, table


def _run_combo(spec: SweepSpec, combo: dict, parent_id: str, done: dict[str, str]) -> str:
    cfg = _train_config(spec, combo)
    tags = {"combo": _combo_key(combo), **{f"grid_{k}": str(v) for k, v in combo.items()}}
    if combo["stage"] == "progressive":
        stage_key = f"radiograph/{combo['backbone']}"
        if stage_key not in done:
            p = spec.progressive
            stage1 = replace(
                spec.base,
                data=p["data"],
                manifest=p.get("manifest"),
                stage="radiograph",
                descriptors=False,
                backbone=combo["backbone"],
                strategy="full",
                classifier="softmax",
                epochs=p.get("epochs", spec.base.epochs),
                max_images=p.get("max_images"),
                run_name=stage_key,
            )
            done[stage_key] = train(stage1, parent_id, tags={"combo": stage_key})
        cfg = replace(cfg, init_from=done[stage_key])
    sibling = _combo_key({**combo, "classifier": "softmax"})
    if combo["classifier"] != "softmax" and combo["strategy"] != "frozen" and sibling in done:
        # Features from the network the softmax sibling fine-tuned: no second training.
        cfg = replace(cfg, init_from=done[sibling], strategy="frozen")
        tags["features_from"] = done[sibling]
    return train(cfg, parent_id, tags=tags)


def _rank(row: dict) -> tuple:
    """Finished runs first, by val_robust_score, then validation AUC (nan counts as worst)."""

    def worst_if_nan(value) -> float:
        return -value if math.isfinite(value) else math.inf

    if not row.get("run_id"):
        return (1, 0.0, 0.0)
    return (0, worst_if_nan(row["val_robust_score"]), worst_if_nan(row["val_auc"]))


def _num(value) -> str:
    return f"{value:.3f}" if value is not None and math.isfinite(value) else "-"


def _with_ci(row: dict, key: str) -> str:
    if not math.isfinite(row[key]):
        return "-"
    return f"{row[key]:.3f} [{_num(row[f'{key}_ci_low'])}, {_num(row[f'{key}_ci_high'])}]"


def _leaderboard(client: MlflowClient, spec: SweepSpec, results: list[tuple[dict, str | None]]):
    rows = []
    for combo, run_id in results:
        row: dict = {k: combo[k] for k in spec.axes}
        if run_id:
            metrics = client.get_run(run_id).data.metrics
            row.update({m: metrics.get(m, math.nan) for m in LEADERBOARD_METRICS})
            row["test_auc_source"] = sources.per_source(metrics, "test_auc_source_")
            row["loso_auc"] = sources.per_source(metrics, "loso_auc_")
            row["run_id"] = run_id
        rows.append(row)
    rows.sort(key=_rank)
    within = sorted({s for r in rows for s in r.get("test_auc_source", {})})
    held = sorted({s for r in rows for s in r.get("loso_auc", {})})
    header = [
        "rank",
        *spec.axes,
        "val robust",
        "val AUC [95% CI]",
        "test robust",
        "test AUC [95% CI]",
        "floor [95% CI]",
        *(f"AUC {s}" for s in within),
        *(f"LOSO {s}" for s in held),
        "test sens",
        "test spec",
        "run",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for rank, r in enumerate(rows, 1):
        axes = [str(r[k]) for k in spec.axes]
        if not r.get("run_id"):
            cells = ["-", *axes, "failed", *[""] * (len(header) - len(axes) - 2)]
        else:
            cells = [
                str(rank),
                *axes,
                _num(r["val_robust_score"]),
                _with_ci(r, "val_auc"),
                _num(r["robust_score"]),
                _with_ci(r, "test_auc"),
                _with_ci(r, "test_shortcut_auc"),
                *(_num(r["test_auc_source"].get(s, {}).get("auc")) for s in within),
                *(_num(r["loso_auc"].get(s, {}).get("auc")) for s in held),
                _num(r["test_sensitivity"]),
                _num(r["test_specificity"]),
                r["run_id"][:8],
            ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines), rows
