"""The doubler on BentoML 1.4, speaking the same protocol as the bare app.

    bentoml serve bentoml_service:Doubler --port PORT    (from this directory)
"""

from __future__ import annotations

from typing import Any

import bentoml


def doubler(foo: int) -> int:
    return 2 * foo


@bentoml.service(workers=1)
class Doubler:
    # BentoML reads the JSON body's keys as the method's arguments: {"data": ...} -> data.
    @bentoml.api(route="/v1/doubler/latest")
    def latest(self, data: Any) -> dict[str, Any]:
        if isinstance(data, list) and all(isinstance(row, list) for row in data):
            return {"data": sorted(([row[0], doubler(*row[1:])] for row in data), key=lambda r: r[0])}
        return {"data": doubler(data)}
