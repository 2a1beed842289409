"""Which webhook URLs a server calls, and the async settings' checks, in-process.

tests/integration/test_async.py delivers webhooks from real servers to a receiver on loopback.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

import framework
from framework import config
from framework.serve.webhooks import Allow, check


@pytest.mark.parametrize("url", [
    "http://127.0.0.1:9/x", "http://localhost/x", "http://10.1.2.3/x", "http://192.168.0.1/",
    "http://169.254.169.254/latest/meta-data/", "http://[::1]/x", "http://[fd00:ec2::254]/",
    "http://100.64.0.1/", "http://0.0.0.0/", "http://[::ffff:127.0.0.1]/",
    "ftp://example.com/x", "file:///etc/passwd", "not a url", "http:///nohost",
])
def test_unsafe_webhook_urls_are_refused(url: str) -> None:
    with pytest.raises(framework.errors.BadRequest):
        check(url, Allow([]))


def test_the_allow_list_takes_hosts_and_networks() -> None:
    assert check("http://127.0.0.1:9/x", Allow(["127.0.0.0/8"])).address == "127.0.0.1"
    assert check("http://localhost:9/x", Allow(["localhost"])).host == "localhost"
    with pytest.raises(framework.errors.BadRequest):
        check("http://10.0.0.1/x", Allow(["127.0.0.1"]))
    with pytest.raises(framework.errors.ConfigError):
        Allow(["not a host/"])


@pytest.mark.parametrize("setting, problem", [
    ({"webhook_allow": "127.0.0.1"}, "must be a list"),
    ({"webhook_allow": [127]}, "must be a list"),
    ({"webhook_attempts": 0}, "at least 1"),
    ({"link_ttl_seconds": 0}, "at least"),
])
def test_bad_async_settings_name_the_key(tmp_path: Path, setting: dict[str, Any], problem: str) -> None:
    path = tmp_path / "deploy.yaml"
    path.write_text(yaml.safe_dump({"server": setting}))
    with pytest.raises(framework.errors.ConfigError, match=problem) as caught:
        config.load(path)
    assert f"server.{next(iter(setting))}" in str(caught.value)
