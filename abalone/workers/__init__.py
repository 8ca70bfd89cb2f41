"""Where a sweep's trials run: the `Workers` protocol and its three kinds, one per option of the
`workers` config group (`local`, `container`, `sagemaker`)."""

from abalone.workers.base import Workers, check_remote, thread_share
from abalone.workers.container import ContainerWorkers
from abalone.workers.local import LocalWorkers
from abalone.workers.sagemaker import SageMakerWorkers

__all__ = ["ContainerWorkers", "LocalWorkers", "SageMakerWorkers", "Workers", "check_remote",
           "thread_share"]
