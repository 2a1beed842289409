"""`framework.get_inference` against a real server."""

from __future__ import annotations

import random
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

import framework
from framework.errors import InferenceError


def test_doc_call_through_our_client(examples_server):
    answer = framework.get_inference("example_doubler", [[1, 10], [2, 11], [3, 12]], url=examples_server.url)
    assert answer == {"data": [[1, 20], [2, 22], [3, 24]]}
    assert framework.get_inference("example_adder", [3, 4, 5], url=examples_server.url) == {"data": 12}
    assert framework.get_inference("example_dict_doubler", {"value": 2}, url=examples_server.url,
                                   version=1) == {"data": 4}


def test_chunks_are_merged_and_sorted_across_chunks(examples_server):
    ids = list(range(1, 101)) + [f"s{i:03d}" for i in range(50)]
    random.Random(7).shuffle(ids)
    rows = [[i, k] for k, i in enumerate(ids)]
    answer = framework.get_inference("example_doubler", rows, url=examples_server.url, batch_size=7)
    expected = sorted(([i, 2 * k] for k, i in enumerate(ids)),
                      key=lambda r: (isinstance(r[0], str), r[0]))
    assert answer == {"data": expected}


def test_failed_rows_raise_with_the_servers_message_and_keep_the_rest(examples_server):
    rows = [[i, i] for i in range(20)] + [[20, None], [21, {"bad": 1}]]
    with pytest.raises(InferenceError) as caught:
        framework.get_inference("example_doubler", rows, url=examples_server.url, batch_size=5)
    err = caught.value
    assert err.status == 200
    assert [e[0] for e in err.errors] == [20, 21]
    assert str(err).splitlines()[-1].startswith("TypeError: unsupported operand")
    assert err.data == [[i, 2 * i] for i in range(20)]


def test_server_errors_raise_with_their_message(examples_server):
    with pytest.raises(InferenceError, match="no version 42") as caught:
        framework.get_inference("example_doubler", [[1, 1]], url=examples_server.url, version=42)
    assert caught.value.status == 404
    for rows in ([[1, 1], [1, 2]], [[1, 1], [2, 2], [1.0, 3]]):  # 1 and 1.0 are one id
        with pytest.raises(InferenceError, match="unique"):
            framework.get_inference("example_doubler", rows, url=examples_server.url, batch_size=2)


def test_chunks_are_sent_concurrently():
    """A stub server (the real one answers too fast to see overlap) counts requests in flight."""
    gate = threading.Barrier(3, timeout=10)
    seen = Counter()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 - http.server's naming
            import json

            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            gate.wait()  # three chunks must be in flight at once to pass this
            seen[self.path] += 1
            out = json.dumps({"data": [[r[0], r[1]] for r in body["data"]], "errors": []}).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(out)))
            self.end_headers()
            self.wfile.write(out)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        rows = [[i, i] for i in range(30, 0, -1)]
        answer = framework.get_inference("x", rows, url=url, batch_size=10, concurrency=3, branch="a/b")
        assert answer == {"data": [[i, i] for i in range(1, 31)]}
        assert seen == {"/v1/x/a~b/latest": 3}
    finally:
        server.shutdown()
        server.server_close()


def test_modelbit_style_arguments_and_an_unreachable_server(examples_server):
    answer = framework.get_inference(deployment="example_doubler", workspace="your_workspace",
                                     region="us-east-1", data=[[1, 10]], url=examples_server.url)
    assert answer == {"data": [[1, 20]]}
    with pytest.raises(InferenceError, match="cannot reach http://127.0.0.1:9 .*framework serve"):
        framework.get_inference("example_doubler", [[1, 1]], url="http://127.0.0.1:9")
