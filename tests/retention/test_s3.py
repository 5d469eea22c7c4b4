"""Issue 24: archives written to an S3-compatible store through django-storages and
boto3, against moto's standalone server on loopback (no S3 is installable here), read
back and verified, the task removed only after."""

from __future__ import annotations

import gzip
import io
import json
import socket
from collections.abc import Iterator

import boto3
import pytest
from django.conf import settings
from django.test import override_settings
from moto.server import ThreadedMotoServer
from storages.backends.s3 import S3Storage

from agents.models import AgentTask
from agents.retention import retention_run
from audit.archive import archive_verify
from audit.models import TaskRemoval
from tests.api.factories import completed

pytestmark = pytest.mark.django_db(transaction=True)

BUCKET = "agents-archive"
CREDENTIALS = {"access_key": "testing", "secret_key": "testing", "region_name": "us-east-1"}


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def s3_endpoint() -> Iterator[str]:
    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        region_name="us-east-1",
    ).create_bucket(Bucket=BUCKET)
    try:
        yield endpoint
    finally:
        server.stop()


def test_archives_go_to_s3_and_are_verified_before_the_task_goes(user, s3_endpoint):
    storage = S3Storage(bucket_name=BUCKET, endpoint_url=s3_endpoint, **CREDENTIALS)
    task = completed(user)
    config = {"default": {"mode": "archive_and_remove", "archive_after_days": 0}}
    with override_settings(AGENTS={**settings.AGENTS, "RETENTION": config}):
        report = retention_run(storage=storage)
    assert report.removed == [str(task.pk)]
    assert not AgentTask.objects.filter(pk=task.pk).exists()

    record = TaskRemoval.objects.get(task_id=task.pk)
    client = boto3.client(
        "s3",
        endpoint_url=s3_endpoint,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        region_name="us-east-1",
    )
    [key] = [o["Key"] for o in client.list_objects_v2(Bucket=BUCKET)["Contents"]]
    assert key == record.archive
    body = client.get_object(Bucket=BUCKET, Key=key)["Body"].read()
    assert len(body) == record.archive_bytes
    verified = archive_verify(io.BytesIO(body))
    assert verified.breaks == [] and verified.verified == task.audit_seq
    lines = [json.loads(line) for line in gzip.decompress(body).splitlines()]
    assert lines[1]["fields"]["id"] == str(task.pk)
