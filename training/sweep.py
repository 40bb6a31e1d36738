"""Sweeps: a grid of backbone x strategy x classifier x stage under one parent run.

Configuration (YAML; relative paths are relative to the file)::

    experiment: thyroid-sweep
    data: ../shared/data/thyroid-seed
    image_size: 128
    epochs: 15
    weights: none            # or imagenet, or a local weights file
    grid:
      backbone: [tiny, vgg16]
      strategy: [full]
      classifier: [softmax, svm, rf]
      stage: [direct, progressive]
    progressive:             # needed when stage includes progressive
      data: ../shared/data/chest-xray
      epochs: 3
      max_images: 2000

Any other TrainConfig field (batch_size, seed, unfreeze_blocks, ...) may be given at
the top level. Work is shared where the science allows: the radiograph stage is
trained once per backbone, and SVM / Random Forest children take their features from
the network their softmax sibling fine-tuned (they log init_from and strategy
'frozen', which is what they did). A sweep interrupted for any reason resumes: the
parent run is found by the configuration's hash and finished children are skipped.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import tempfile
from dataclasses import dataclass, fields, replace
from pathlib import Path

import mlflow
import yaml
from mlflow.tracking import MlflowClient

from training import tracking
from training.train import CLASSIFIERS, TrainConfig, train

log = logging.getLogger(__name__)

SWEEP_STAGES = ("direct", "progressive")
GRID_KEYS = ("backbone", "strategy", "classifier", "stage")
LEADERBOARD_METRICS = (
    "val_auc",
    "val_auc_ci_low",
    "val_auc_ci_high",
    "test_auc",
    "test_auc_ci_low",
    "test_auc_ci_high",
    "test_sensitivity",
    "test_specificity",
    "test_accuracy",
    "test_ece",
)


@dataclass
class SweepSpec:
    base: TrainConfig
    grid: dict[str, list[str]]
    progressive: dict
    config_hash: str

    def combos(self) -> list[dict[str, str]]:
        """Every grid point; softmax first in each group so SVM/RF can reuse its network."""
        points = [
            dict(zip(GRID_KEYS, p, strict=True))
            for p in itertools.product(*(self.grid[k] for k in GRID_KEYS))
        ]
        return sorted(
            points,
            key=lambda c: (
                c["stage"],
                c["backbone"],
                c["strategy"],
                CLASSIFIERS.index(c["classifier"]),
            ),
        )


def _resolve(path: str | None, base: Path) -> str | None:
    if path is None:
        return None
    p = Path(path).expanduser()
    return str(p if p.is_absolute() else (base / p).resolve())


def load_config(path: str | Path) -> SweepSpec:
    """Read and check a sweep YAML file.

    Raises:
        ValueError: missing or unknown keys, bad values, missing progressive data.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"sweep configuration not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ValueError(f"{path} is not valid YAML: {e}") from e
    if not isinstance(raw, dict) or "data" not in raw or "grid" not in raw:
        raise ValueError(f"{path}: a sweep needs 'data' and 'grid'")
    grid = raw.pop("grid")
    progressive = raw.pop("progressive", None) or {}
    known = {f.name for f in fields(TrainConfig)} - {
        "backbone",
        "strategy",
        "classifier",
        "stage",
        "init_from",
        "run_name",
    }
    unknown = set(raw) - known
    if unknown:
        raise ValueError(f"{path}: unknown keys {sorted(unknown)}; allowed: {sorted(known)}")
    if not isinstance(grid, dict) or set(grid) - set(GRID_KEYS):
        raise ValueError(f"{path}: grid keys must be among {GRID_KEYS}")
    grid = {k: [str(v) for v in (grid.get(k) or [])] for k in GRID_KEYS}
    grid["stage"] = grid["stage"] or ["direct"]
    for key in ("backbone", "strategy", "classifier"):
        if not grid[key]:
            raise ValueError(f"{path}: grid.{key} needs at least one value")
    if set(grid["stage"]) - set(SWEEP_STAGES):
        raise ValueError(f"{path}: grid.stage values must be among {SWEEP_STAGES}")
    base_dir = path.parent
    raw["data"] = _resolve(raw["data"], base_dir)
    raw["manifest"] = _resolve(raw.get("manifest"), base_dir)
    raw["annotations"] = _resolve(raw.get("annotations"), base_dir)
    if raw.get("localiser") and (base_dir / str(raw["localiser"])).exists():  # else a run id
        raw["localiser"] = _resolve(raw["localiser"], base_dir)
    if raw.get("weights") not in (None, "none", "imagenet"):
        raw["weights"] = _resolve(raw["weights"], base_dir)
    if "progressive" in grid["stage"]:
        if "data" not in progressive:
            raise ValueError(f"{path}: stage 'progressive' needs progressive.data")
        progressive["data"] = _resolve(progressive["data"], base_dir)
        progressive["manifest"] = _resolve(progressive.get("manifest"), base_dir)
    base = TrainConfig(**raw)
    for combo in (
        dict(zip(GRID_KEYS, p, strict=True))
        for p in itertools.product(*(grid[k] for k in GRID_KEYS))
    ):
        replace(
            base,
            backbone=combo["backbone"],
            strategy=combo["strategy"],
            classifier=combo["classifier"],
        ).validate()
    canonical = json.dumps({"base": raw, "grid": grid, "progressive": progressive}, sort_keys=True)
    return SweepSpec(base, grid, progressive, hashlib.sha256(canonical.encode()).hexdigest()[:16])


def _combo_key(combo: dict[str, str]) -> str:
    return "/".join(combo[k] for k in GRID_KEYS)


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
        results: dict[str, str | None] = {}
        for combo in spec.combos():
            key = _combo_key(combo)
            if key in done:
                results[key] = done[key]
                continue
            try:
                results[key] = done[key] = _run_combo(spec, combo, parent_id, done)
            except Exception:  # noqa: BLE001 - one failed combination must not end the sweep
                log.exception("sweep combination %s failed; the sweep goes on", key)
                results[key] = None
        table, rows = _leaderboard(client, spec, results)
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "leaderboard.md").write_text(table + "\n")
            (Path(tmp) / "leaderboard.json").write_text(json.dumps(rows, indent=1))
            mlflow.log_artifacts(tmp)
        finished = [r for r in rows if r.get("run_id")]
        if finished:
            mlflow.set_tag("best_run", finished[0]["run_id"])
            mlflow.log_metric("best_val_auc", finished[0]["val_auc"])
        mlflow.set_tag("failed_combinations", str(sum(1 for r in rows if not r.get("run_id"))))
    return parent_id, table


def _run_combo(spec: SweepSpec, combo: dict[str, str], parent_id: str, done: dict[str, str]) -> str:
    cfg = replace(
        spec.base,
        backbone=combo["backbone"],
        strategy=combo["strategy"],
        classifier=combo["classifier"],
        run_name=_combo_key(combo),
    )
    tags = {"combo": _combo_key(combo), **{f"grid_{k}": v for k, v in combo.items()}}
    if combo["stage"] == "progressive":
        stage_key = f"radiograph/{combo['backbone']}"
        if stage_key not in done:
            p = spec.progressive
            stage1 = replace(
                spec.base,
                data=p["data"],
                manifest=p.get("manifest"),
                stage="radiograph",
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


def _leaderboard(client: MlflowClient, spec: SweepSpec, results: dict[str, str | None]):
    rows = []
    for key, run_id in results.items():
        row: dict = dict(zip(GRID_KEYS, key.split("/"), strict=True))
        if run_id:
            metrics = client.get_run(run_id).data.metrics
            row.update({m: metrics.get(m, float("nan")) for m in LEADERBOARD_METRICS})
            row["run_id"] = run_id
        rows.append(row)
    rows.sort(key=lambda r: -r["val_auc"] if r.get("run_id") else float("inf"))
    header = (
        "| rank | backbone | strategy | classifier | stage | val AUC [95% CI] | "
        "test AUC [95% CI] | test sens | test spec | test acc | test ECE | run |"
    )
    lines = [header, "|" + "---|" * 12]
    for rank, r in enumerate(rows, 1):
        if not r.get("run_id"):
            lines.append(
                f"| - | {r['backbone']} | {r['strategy']} | {r['classifier']} | "
                f"{r['stage']} | failed | | | | | | |"
            )
            continue
        lines.append(
            f"| {rank} | {r['backbone']} | {r['strategy']} | {r['classifier']} | {r['stage']} | "
            f"{r['val_auc']:.3f} [{r['val_auc_ci_low']:.3f}, {r['val_auc_ci_high']:.3f}] | "
            f"{r['test_auc']:.3f} [{r['test_auc_ci_low']:.3f}, {r['test_auc_ci_high']:.3f}] | "
            f"{r['test_sensitivity']:.3f} | {r['test_specificity']:.3f} | "
            f"{r['test_accuracy']:.3f} | {r['test_ece']:.3f} | {r['run_id'][:8]} |"
        )
    return "\n".join(lines), rows
