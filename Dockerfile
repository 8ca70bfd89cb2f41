# abalone on the AWS Deep Learning Container (DLC) for TensorFlow training.
#
#   docker build -t abalone-dlc .                                   # the default base below
#   docker build -t abalone-dlc --build-arg BASE_IMAGE=<another DLC tag> .
#   docker run --rm abalone-dlc trainer.epochs=20                   # overrides, as on the CLI
#   docker run --rm abalone-dlc train                               # as a SageMaker job starts it
#
# The base: TensorFlow 2.21, CPU, Python 3.12, Amazon Linux 2023, from the public ECR gallery (no
# login, no AWS account needed to pull). AWS publishes TensorFlow 2.21 training DLCs only as
# `-sagemaker` images; they run under a plain `docker run` on EC2 too. The GPU image is
# `2.21.0-gpu-py312-cu129-amzn2023-sagemaker`; each region's private ECR has the same tags
# (scripts/run_training.sh: DLC_REGISTRY=private). Source: aws/deep-learning-containers,
# docs/src/data/tensorflow-training/2.21-cpu-sagemaker.yml and docs/reference/region_availability.md.
# This line is the one place the default base is named; scripts/run_training.sh reads it.
ARG BASE_IMAGE=public.ecr.aws/deep-learning-containers/tensorflow-training:2.21.0-cpu-py312-amzn2023-sagemaker
FROM ${BASE_IMAGE}

ENV PYTHONUNBUFFERED=1 \
    TF_CPP_MIN_LOG_LEVEL=2

# Our dependencies first (a layer that survives code changes), against the image's own TensorFlow,
# Keras and numpy, which the install keeps: it fails, naming the requirement, rather than replace
# them (scripts/install_in_image.py).
WORKDIR /opt/abalone
COPY pyproject.toml README.md scripts/install_in_image.py ./
RUN python install_in_image.py requirements /opt/abalone
COPY abalone ./abalone
COPY hydra_plugins ./hydra_plugins
COPY conf ./conf
COPY sweeps ./sweeps
RUN python install_in_image.py project /opt/abalone \
 # A home any user id can write to: scripts/run_training.sh runs as the caller's uid on EC2.
 && mkdir -p -m 1777 /home/abalone

# Root, as the DLC and SageMaker run (SageMaker creates the /opt/ml folders it mounts as root).
# The DLC's entry point (telemetry, CUDA forward compatibility on GPU images) runs first.
ENTRYPOINT ["bash", "-m", "/usr/local/bin/entrypoint.sh", "python", "-m", "abalone.container"]
CMD []
