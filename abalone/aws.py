"""AWS: SageMaker managed MLflow (tracking servers by ARN or name, MLflow Apps by ARN, each in
a partition the plugin reaches), S3 output uploads, and a study database's password read from
Secrets Manager. (The SageMaker training-job workers are abalone/workers/sagemaker.py.)

Credentials, profile, region and endpoints come from the usual AWS settings (environment,
~/.aws, instance role) through boto3; nothing here logs or stores them.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
from pathlib import Path

from abalone.config import AbaloneError

ARN = re.compile(r"^arn:(?P<partition>aws[a-z-]*):sagemaker:(?P<region>[a-z0-9-]+):\d{12}:"
                 r"(mlflow-tracking-server|mlflow-app)/[A-Za-z0-9][A-Za-z0-9-]*$")
# The partitions the sagemaker-mlflow plugin (0.5.0) has an MLflow endpoint in; it refuses aws-cn.
PLUGIN_PARTITIONS = ("aws", "aws-us-gov")
S3_URI = re.compile(r"^s3://([a-z0-9][a-z0-9.-]{1,61}[a-z0-9])(?:/(.*))?$")


class AwsError(AbaloneError):
    """An AWS setting or service is not usable; the message names the key and the cause."""


def credentials_or_fail(what: str) -> None:
    import boto3

    if boto3.Session().get_credentials() is None:
        raise AwsError(f"{what} needs AWS credentials and none were found: set AWS_PROFILE or "
                       "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, or run with an instance role")


def sagemaker_tracking_uri(tracking_cfg) -> str:
    """The tracking URI (the server's ARN) for tracking.arn, or for tracking.server_name in
    tracking.region, after checking the plugin and credentials that requests will need."""
    if importlib.util.find_spec("sagemaker_mlflow") is None:
        raise AwsError("tracking to SageMaker managed MLflow needs the sagemaker-mlflow plugin: "
                       "pip install sagemaker-mlflow")
    credentials_or_fail("tracking to SageMaker managed MLflow")
    arn = tracking_cfg.arn
    if not arn:
        if not tracking_cfg.region:
            raise AwsError("tracking.server_name needs tracking.region (or set tracking.arn)")
        arn = describe_tracking_server(tracking_cfg.server_name, tracking_cfg.region)
    check_arn(arn)
    return arn


def check_arn(arn: str) -> None:
    """Fail unless `arn` is a tracking server's or MLflow App's ARN in the partition of its region,
    and that partition is one the plugin can reach."""
    import boto3

    match = ARN.match(arn)
    if not match:
        raise AwsError(f"config key tracking.arn: {arn!r} is not a SageMaker MLflow tracking "
                       "server or MLflow App ARN (arn:PARTITION:sagemaker:REGION:ACCOUNT:"
                       "mlflow-tracking-server/NAME or ...:mlflow-app/ID)")
    partition, region = match["partition"], match["region"]
    expected = boto3.Session().get_partition_for_region(region)
    if partition != expected:
        raise AwsError(f"config key tracking.arn: {arn!r} names partition {partition}, but region "
                       f"{region} is in partition {expected}")
    if partition not in PLUGIN_PARTITIONS:
        raise AwsError(f"config key tracking.arn: {arn!r} is in partition {partition}; the "
                       "sagemaker-mlflow plugin reaches SageMaker MLflow only in "
                       + " and ".join(PLUGIN_PARTITIONS))


def describe_tracking_server(name: str, region: str) -> str:
    """The ARN of the tracking server called `name`, as the AWS sample looks it up."""
    import boto3
    import botocore.exceptions
    from botocore.config import Config

    client = boto3.client("sagemaker", region_name=region,
                          config=Config(connect_timeout=5, read_timeout=10,
                                        retries={"max_attempts": 2}))
    try:
        return client.describe_mlflow_tracking_server(TrackingServerName=name)["TrackingServerArn"]
    except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as err:
        raise AwsError(f"cannot look up the MLflow tracking server tracking.server_name={name} "
                       f"in tracking.region={region}: {err}") from err


def split_s3_uri(uri: str) -> tuple[str, str]:
    match = S3_URI.match(uri)
    if not match:
        raise AwsError(f"config key output.s3_uri: {uri!r} is not an s3://bucket/prefix URI")
    return match.group(1), (match.group(2) or "").strip("/")


def _s3_client(max_attempts: int = 8):
    import boto3

    # boto3 reads AWS_ENDPOINT_URL(_S3) itself; MLFLOW_S3_ENDPOINT_URL is MLflow's name for it.
    endpoint = (None if os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
                else os.environ.get("MLFLOW_S3_ENDPOINT_URL"))
    from botocore.config import Config

    # Every request here may be repeated (PUTs of the same keys, reads): more attempts than
    # boto3's default 3 ride out a throttled or briefly unreachable endpoint. (Reading a table,
    # abalone/source.py takes 3: unreachable, it has a cached copy to use.)
    return boto3.client("s3", endpoint_url=endpoint,
                        config=Config(retries={"mode": "standard", "max_attempts": max_attempts}))


def check_s3_output(uri: str) -> None:
    """Fail before training if the output bucket cannot be reached."""
    import botocore.exceptions

    bucket, _ = split_s3_uri(uri)
    credentials_or_fail("output.s3_uri")
    try:
        _s3_client().head_bucket(Bucket=bucket)
    except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as err:
        raise AwsError(f"config key output.s3_uri: cannot reach bucket {bucket!r}: {err}") from err


# Written last by `upload_folder`: a folder under output.s3_uri without it is not complete (an
# upload cut short), and readers take it as absent. It lists each file's key and size.
COMPLETE_MARKER = "_COMPLETE"


def upload_folder(folder: Path, uri: str, name: str) -> str:
    """Upload every file below `folder` to `uri`/`name`/..., then the manifest `_COMPLETE`;
    return that S3 location. Uploading again (a retried run) overwrites the same keys."""
    import botocore.exceptions

    bucket, prefix = split_s3_uri(uri)
    base = "/".join(p for p in (prefix, name) if p)
    s3 = _s3_client()
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    manifest = {path.relative_to(folder).as_posix(): path.stat().st_size for path in files}
    try:
        s3.delete_object(Bucket=bucket, Key=f"{base}/{COMPLETE_MARKER}")  # a re-upload's
        for path in files:
            s3.upload_file(str(path), bucket, f"{base}/{path.relative_to(folder).as_posix()}")
        s3.put_object(Bucket=bucket, Key=f"{base}/{COMPLETE_MARKER}",
                      Body=json.dumps({"files": manifest}, indent=1).encode())
    except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as err:
        raise AwsError(f"uploading {folder} to s3://{bucket}/{base} failed: {err}") from err
    return f"s3://{bucket}/{base}"


def uploaded_files(location: str) -> dict[str, int] | None:
    """The files (relative name -> size) of an output folder `upload_folder` completed at
    `location`, checked against its manifest; None if the folder is absent or incomplete."""
    import botocore.exceptions

    bucket, base = split_s3_uri(location)
    s3 = _s3_client()
    try:
        manifest = json.loads(s3.get_object(Bucket=bucket, Key=f"{base}/{COMPLETE_MARKER}")
                              ["Body"].read())["files"]
    except s3.exceptions.NoSuchKey:
        return None
    except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as err:
        raise AwsError(f"reading s3://{bucket}/{base}/{COMPLETE_MARKER} failed: {err}") from err
    found = {}
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=f"{base}/"):
        found.update({o["Key"][len(base) + 1:]: o["Size"] for o in page.get("Contents", [])})
    return manifest if all(found.get(k) == v for k, v in manifest.items()) else None


SECRET_ARN = re.compile(r"^arn:aws[a-z-]*:secretsmanager:(?P<region>[a-z0-9-]+):\d{12}:secret:.+$")


def secret_login(arn: str) -> tuple[str | None, str]:
    """(username or None, password) from a Secrets Manager secret: RDS's JSON form
    ({"username": ..., "password": ...}) or the password as plain text."""
    import boto3
    import botocore.exceptions

    match = SECRET_ARN.match(arn)
    if not match:
        raise AwsError(f"config key hydra.sweeper.storage_password_secret: {arn!r} is not a "
                       "Secrets Manager secret ARN (arn:aws:secretsmanager:REGION:ACCOUNT:"
                       "secret:NAME)")
    credentials_or_fail("hydra.sweeper.storage_password_secret")
    try:
        text = boto3.client("secretsmanager", region_name=match["region"]).get_secret_value(
            SecretId=arn)["SecretString"]
    except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError,
            KeyError) as err:
        raise AwsError(f"config key hydra.sweeper.storage_password_secret: cannot read the "
                       f"secret {arn}: {err}") from err
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return None, text
    if isinstance(value, dict) and "password" in value:
        return value.get("username"), value["password"]
    raise AwsError(f"config key hydra.sweeper.storage_password_secret: the secret {arn} holds "
                   "JSON without a \"password\" key (store the password as plain text or as "
                   "RDS does: {\"username\": ..., \"password\": ...})")
