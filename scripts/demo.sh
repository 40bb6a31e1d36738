#!/usr/bin/env bash
# The main job on embedded defaults: synthetic phantom -> tiny model trained and logged to
# MLflow (SQLite in .thyroid-cad/) -> ONNX export -> registry v1 -> champion -> service.
set -euo pipefail
cd "$(dirname "$0")/.."
T=.venv/bin/thyroid-cad
# Absolute, so the commands printed below work from any folder.
THYROID_CAD_HOME=$(realpath -m "${THYROID_CAD_HOME:-.thyroid-cad}")
export THYROID_CAD_HOME
DEMO=$THYROID_CAD_HOME/demo-data
PORT=${PORT:-8000}
# A busy port is said now, not after two minutes of training (serve checks it again).
if (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null; then
  echo "error: port $PORT is in use; run make demo PORT=ANOTHER_PORT" >&2
  exit 1
fi

rm -rf "$DEMO" "$THYROID_CAD_HOME/export"
$T demo-data "$DEMO" --per-class 150
RUN=$($T train --data "$DEMO" --backbone tiny --epochs 15 --image-size 64 --batch-size 16 | tail -1)
$T export "$RUN" --out "$THYROID_CAD_HOME/export" >/dev/null
VERSION=$($T registry register "$THYROID_CAD_HOME/export" | tail -1)
$T registry promote "$VERSION" --alias champion --reason "demo quickstart" >/dev/null
KEY=$($T keys create --scope admin --name demo | tail -1)
IMAGES=("$DEMO"/malignant/*.png)
IMAGE=${IMAGES[0]}

cat <<MSG

  MLflow run $RUN -> registered version $VERSION -> champion. Serving on port $PORT.
  Try it (SYNTHETIC demo model, not for diagnostic use):

    curl -s -H "Authorization: Bearer $KEY" -F file=@$IMAGE \\
         "http://127.0.0.1:$PORT/v1/predict?heatmap=none"

  Page for clinicians: http://127.0.0.1:$PORT/  (API key above)   API docs: /docs
  MLflow UI: $PWD/.venv/bin/mlflow ui --backend-store-uri sqlite:///$THYROID_CAD_HOME/mlflow.db
  The thyroid-cad command (README): source $PWD/.venv/bin/activate
                                    export THYROID_CAD_HOME=$THYROID_CAD_HOME

MSG
exec $T serve --port "$PORT"
