"""`python tests/atomic_moto.py -H HOST -p PORT`: moto's S3 server, its PUTs one at a time.

AWS S3 evaluates a conditional PUT (`If-None-Match: *`, `If-Match`) atomically: of racing
writers, one wins and the others get 412 or 409. moto 5's threaded server checks the
condition and then writes, unlocked, so two racers can both win (2 rounds in 100 with 16
threads here), and the store's tests of racing publishers would fail on moto's race, not
ours. A lock around moto's PUT gives the tests the S3 they are written against.
"""

from __future__ import annotations

import sys
import threading

from moto import server
from moto.s3.responses import S3Response

_lock = threading.Lock()
_put_object = S3Response.put_object


def _atomic_put_object(self: S3Response):  # noqa: ANN202 - moto's response tuple
    with _lock:
        return _put_object(self)


if __name__ == "__main__":
    S3Response.put_object = _atomic_put_object
    server.main(sys.argv[1:])
