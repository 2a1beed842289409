"""The doubler as an MLflow 3 pyfunc model, saved to a directory for `mlflow models serve`.

    python mlflow_model.py DIR
    mlflow models serve -m DIR --env-manager local --port PORT

MLflow has its own protocol: POST /invocations with {"inputs": [[id, foo], ...]}
answers {"predictions": [[id, 2 * foo], ...]}; `run.py` sends that body instead.
"""

from __future__ import annotations

import sys
from typing import Any

import mlflow.pyfunc


def doubler(foo: int) -> int:
    return 2 * foo


class Doubler(mlflow.pyfunc.PythonModel):
    def predict(self, context: Any, model_input: Any, params: Any = None) -> list[list[Any]]:
        rows = model_input.values.tolist() if hasattr(model_input, "values") else model_input
        return sorted(([row[0], doubler(*row[1:])] for row in rows), key=lambda r: r[0])


if __name__ == "__main__":
    mlflow.pyfunc.save_model(sys.argv[1], python_model=Doubler())
