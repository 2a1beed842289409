"""moto's S3 server in a subprocess on a loopback port, for the S3 store's tests."""

from __future__ import annotations

import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx

from conftest import free_port, stop_process

# moto's server with its PUTs made atomic, as S3's conditional writes are (see the file).
ATOMIC_MOTO = Path(__file__).with_name("atomic_moto.py")

CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


class MotoServer:
    """moto's server (`ATOMIC_MOTO`) on 127.0.0.1, stopped by its PID; state lives in its memory."""

    def __init__(self, log_dir: Path) -> None:
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.log = log_dir / f"moto-{self.port}.log"
        self._log = open(self.log, "w")
        self.proc = subprocess.Popen(
            [sys.executable, str(ATOMIC_MOTO), "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=self._log, stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"moto exited {self.proc.returncode}:\n{self.log.read_text()}")
            try:
                httpx.get(self.endpoint + "/moto-api/", timeout=1)
                return
            except httpx.TransportError:
                time.sleep(0.1)
        self.stop()
        raise AssertionError("moto's server did not answer within 60 s")

    def env(self) -> dict[str, str]:
        """What a process needs to reach this server through the standard AWS chain."""
        return {**CREDENTIALS, "AWS_ENDPOINT_URL": self.endpoint}

    def client(self):  # noqa: ANN201 - a boto3 client
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                            aws_access_key_id="testing", aws_secret_access_key="testing")

    def new_bucket(self) -> str:
        name = f"t-{uuid.uuid4().hex[:20]}"
        self.client().create_bucket(Bucket=name)
        return name

    def stop(self) -> None:
        stop_process(self.proc)
        self._log.close()


def use_endpoint(monkeypatch, server: MotoServer) -> None:  # noqa: ANN001
    """Point this process's AWS chain at `server` (for stores opened in the test itself)."""
    for key, value in server.env().items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
