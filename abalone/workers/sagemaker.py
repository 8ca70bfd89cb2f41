"""`workers=sagemaker`: a sweep's workers as SageMaker training jobs of our image (plain boto3:
CreateTrainingJob, DescribeTrainingJob, StopTrainingJob), and the check that no job request
carries a secret, since anyone allowed to describe a job sees its arguments and environment."""

from __future__ import annotations

import re
import time
import uuid
from urllib.parse import urlsplit

from abalone.aws import SECRET_ARN, AwsError
from abalone.config import require
from abalone.trial import RANK_ENV

# What must never be in a training job's request: DescribeTrainingJob shows its container
# arguments and environment to anyone allowed to describe jobs.
SECRET_NAME = re.compile(r"PASSWORD|PASSWD|SECRET|TOKEN|CREDENTIAL|ACCESS_KEY|PRIVATE_KEY",
                         re.IGNORECASE)
ACCESS_KEY_ID = re.compile(r"\b(AKIA|ASIA)[A-Z0-9]{16}\b")
SECRET_ADVICE = ("DescribeTrainingJob shows a job's container arguments and environment to anyone "
                 "with read access: keep the database password in AWS Secrets Manager "
                 "(hydra.sweeper.storage_password_secret=<secret ARN>) and let the job role "
                 "supply AWS credentials")


def _secret_in(where: str, key: str, value: str, known: list[str]) -> str | None:
    """Why `key`=`value` at `where` is a secret, or None."""
    if SECRET_NAME.search(key) and not SECRET_ARN.match(value):
        return f"{where} ({key}) is named like a secret"
    for word in re.findall(r"[a-z][a-z0-9+.-]*://\S+", value):
        if urlsplit(word).password is not None:
            return f"{where} ({key}) holds a URL with a password"
    if ACCESS_KEY_ID.search(value):
        return f"{where} ({key}) holds an AWS access key id"
    if any(secret and secret in value for secret in known):
        return f"{where} ({key}) holds this session's AWS credentials"
    return None


def check_no_secret(request: dict) -> None:
    """Refuse a CreateTrainingJob request whose arguments or environment carry a secret."""
    import boto3

    credentials = boto3.Session().get_credentials()
    known = [] if credentials is None else [
        credentials.access_key, credentials.secret_key, credentials.token]
    found = []
    for index, argument in enumerate(request["AlgorithmSpecification"]["ContainerArguments"]):
        key, is_override, value = argument.partition("=")  # Hydra keys hold no "="
        found.append(_secret_in(f"container argument {index}", key,
                                value if is_override else argument, known))
    for key, value in request["Environment"].items():
        found.append(_secret_in("environment variable", key, value, known))
    for tag in request["Tags"]:
        found.append(_secret_in("tag", tag["Key"], tag["Value"], known))
    found = [reason for reason in found if reason]
    if found:
        raise AwsError(f"workers=sagemaker: the training job request would expose a secret: "
                       f"{'; '.join(found)}. {SECRET_ADVICE}")


def job_name_stem(prefix: str, study: str | None) -> str:
    """`prefix-study` as the start of a valid SageMaker name ([a-zA-Z0-9](-*[a-zA-Z0-9])*)."""
    stem = re.sub(r"[^a-zA-Z0-9]+", "-", "-".join(p for p in (prefix, study) if p)).strip("-")
    return stem[:38].rstrip("-") or "abalone"


class SageMakerWorkers:
    """`count` SageMaker training jobs of our image, each host running `IMAGE train <argv>`: one
    worker of the study per host, ranked by job and host (abalone/container.py adds the host's
    index from resourceconfig.json). Plain boto3; the workers' status comes from
    DescribeTrainingJob, and stop() is StopTrainingJob on each job still running."""

    remote = True

    def __init__(self, count: int, image_uri: str, role_arn: str, output_s3_uri: str,
                 data_s3_uri: str | None = None, region: str | None = None,
                 instance_type: str = "ml.m5.large", instance_count: int = 1,
                 volume_size_gb: int = 30, max_runtime_seconds: int = 86400, spot: bool = False,
                 max_wait_seconds: int | None = None, subnets=(), security_group_ids=(),
                 job_name_prefix: str = "abalone", tags=None, environment=None) -> None:
        require(1 <= count <= 999, "workers.count", "in [1, 999]", count)
        require(instance_count >= 1, "workers.instance_count", ">= 1", instance_count)
        require(volume_size_gb >= 1, "workers.volume_size_gb", ">= 1", volume_size_gb)
        require(max_runtime_seconds >= 1, "workers.max_runtime_seconds", ">= 1",
                max_runtime_seconds)
        require(not spot or max_wait_seconds is None or max_wait_seconds >= max_runtime_seconds,
                "workers.max_wait_seconds", ">= workers.max_runtime_seconds", max_wait_seconds)
        require(bool(subnets) == bool(security_group_ids), "workers.security_group_ids",
                "given together with workers.subnets (VpcConfig needs both)",
                list(security_group_ids))
        require(output_s3_uri.startswith("s3://"), "workers.output_s3_uri", "an s3:// URI",
                output_s3_uri)
        require(not data_s3_uri or data_s3_uri.startswith("s3://"), "workers.data_s3_uri",
                "an s3:// URI", data_s3_uri)
        self.count, self.image_uri, self.role_arn = count, image_uri, role_arn
        self.output_s3_uri, self.data_s3_uri, self.region = output_s3_uri, data_s3_uri, region
        self.instance_type, self.instance_count = instance_type, instance_count
        self.volume_size_gb, self.max_runtime_seconds = volume_size_gb, max_runtime_seconds
        self.spot, self.max_wait_seconds = spot, max_wait_seconds
        self.subnets, self.security_group_ids = list(subnets), list(security_group_ids)
        self.job_name_prefix = job_name_prefix
        self.tags, self.environment = dict(tags or {}), dict(environment or {})
        self.jobs: list[str] = []
        self.logs = "CloudWatch Logs, group /aws/sagemaker/TrainingJobs"  # for messages
        self.done: set[str] = set()  # jobs that ended or were stopped: stop() leaves them
        self._client = None

    @property
    def client(self):
        if self._client is None:
            import boto3
            from botocore.config import Config

            self._client = boto3.client("sagemaker", region_name=self.region, config=Config(
                retries={"mode": "standard", "max_attempts": 5}))
        return self._client

    def requests(self, argv: list[str], env: dict[str, str]) -> list[dict]:
        """The CreateTrainingJob request of each job, checked for secrets."""
        arguments = ["train", *argv]
        too_long = [a for a in arguments if len(a) > 256]
        if len(arguments) > 100 or too_long:
            raise AwsError(f"workers=sagemaker: SageMaker takes at most 100 container arguments "
                           f"of at most 256 characters; got {len(arguments)}, too long: "
                           f"{too_long[:3]}")
        study = next((a.split("=", 1)[1] for a in argv
                      if a.startswith("hydra.sweeper.study_name=")), None)
        stem = job_name_stem(self.job_name_prefix, study)
        # Unique per start: a rerun of the same study gets new jobs (names are never reused).
        stamp = time.strftime("%y%m%d-%H%M%S", time.gmtime()) + "-" + uuid.uuid4().hex[:4]
        requests = []
        for index in range(self.count):
            rank = index * self.instance_count + 1
            request = {
                "TrainingJobName": f"{stem}-{stamp}-{index + 1}",
                "RoleArn": self.role_arn,
                "AlgorithmSpecification": {"TrainingImage": self.image_uri,
                                           "TrainingInputMode": "File",
                                           "ContainerArguments": arguments},
                "Environment": {**self.environment, **env, RANK_ENV: str(rank)},
                "OutputDataConfig": {"S3OutputPath": self.output_s3_uri},
                "ResourceConfig": {"InstanceType": self.instance_type,
                                   "InstanceCount": self.instance_count,
                                   "VolumeSizeInGB": self.volume_size_gb},
                "StoppingCondition": {"MaxRuntimeInSeconds": self.max_runtime_seconds},
                "Tags": [{"Key": "abalone:study", "Value": (study or stem)[:256]},
                         {"Key": "abalone:worker-rank", "Value": str(rank)},
                         *({"Key": k, "Value": str(v)} for k, v in self.tags.items())],
            }
            if self.data_s3_uri:
                request["InputDataConfig"] = [{
                    "ChannelName": "training", "InputMode": "File",
                    "DataSource": {"S3DataSource": {"S3DataType": "S3Prefix",
                                                    "S3Uri": self.data_s3_uri,
                                                    "S3DataDistributionType": "FullyReplicated"}}}]
            if self.subnets:
                request["VpcConfig"] = {"Subnets": self.subnets,
                                        "SecurityGroupIds": self.security_group_ids}
            if self.spot:
                request["EnableManagedSpotTraining"] = True
                request["StoppingCondition"]["MaxWaitTimeInSeconds"] = (
                    self.max_wait_seconds or 2 * self.max_runtime_seconds)
            check_no_secret(request)
            requests.append(request)
        return requests

    def start(self, argv: list[str], env: dict[str, str]) -> None:
        import botocore.exceptions

        requests = self.requests(argv, env)  # all checked before the first is sent
        try:
            for request in requests:
                self.client.create_training_job(**request)
                self.jobs.append(request["TrainingJobName"])
        except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as err:
            self.stop()
            raise AwsError(f"workers=sagemaker: cannot create training job "
                           f"{request['TrainingJobName']}: {err}") from err
        except BaseException:  # Ctrl-C between two requests: no job left behind
            self.stop()
            raise

    def poll(self) -> dict[str, str]:
        import botocore.exceptions

        states = {}
        for name in self.jobs:
            try:
                job = self.client.describe_training_job(TrainingJobName=name)
            except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as err:
                raise AwsError(f"workers=sagemaker: cannot describe training job {name}: "
                               f"{err}") from err
            status = job["TrainingJobStatus"]
            if status in ("Completed", "Failed", "Stopped"):
                self.done.add(name)
            if status == "Completed":
                states[name] = "finished"
            elif status == "Failed":
                states[name] = f"failed: {job.get('FailureReason', 'no reason given')}"
            elif status == "Stopped":
                states[name] = "failed: stopped"
            else:  # InProgress, Stopping
                states[name] = "running"
        return states

    def stop(self) -> None:
        import botocore.exceptions

        for name in self.jobs:
            if name in self.done:
                continue
            try:
                self.client.stop_training_job(TrainingJobName=name)
            except botocore.exceptions.ClientError as err:
                # A job that ended meanwhile cannot be stopped; SageMaker says so.
                if err.response.get("Error", {}).get("Code") != "ValidationException":
                    raise AwsError(f"workers=sagemaker: cannot stop training job {name}: "
                                   f"{err}") from err
            self.done.add(name)
