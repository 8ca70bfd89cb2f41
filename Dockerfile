# abalone on an AWS Deep Learning Container (DLC) for TensorFlow training.
#
#   docker build -t abalone-dlc .                       # CPU image (default base below)
#   docker build -t abalone-dlc-gpu \
#     --build-arg BASE_IMAGE=763104351884.dkr.ecr.us-east-1.amazonaws.com/tensorflow-training:2.19.0-gpu-py312-cu125-ubuntu22.04-ec2 .
#
# Pulling the base needs a login to the DLC registry first; scripts/run_training.sh does it all.
# The project is installed against the image's own TensorFlow and Keras (the build fails if pip
# would replace them), runs as a non-root user, and `docker run IMAGE [overrides]` trains.
ARG BASE_IMAGE=763104351884.dkr.ecr.us-east-1.amazonaws.com/tensorflow-training:2.19.0-cpu-py312-ubuntu22.04-ec2
FROM ${BASE_IMAGE}

ENV PYTHONUNBUFFERED=1 \
    TF_CPP_MIN_LOG_LEVEL=2 \
    SM_CHANNEL_TRAINING=/opt/ml/data \
    SM_MODEL_DIR=/opt/ml/model

WORKDIR /opt/ml/code
COPY pyproject.toml README.md ./
COPY abalone ./abalone
COPY hydra_plugins ./hydra_plugins
COPY conf ./conf
COPY sweeps ./sweeps
COPY scripts/container_entrypoint.sh ./scripts/

RUN python -m pip freeze | grep -iE '^(tensorflow(-cpu|-gpu)?|keras)==' > /tmp/image-frameworks.txt \
 && python -m pip install --no-cache-dir --constraint /tmp/image-frameworks.txt -e . \
 && python -m pip freeze | grep -iE '^(tensorflow(-cpu|-gpu)?|keras)==' | diff /tmp/image-frameworks.txt - \
 && useradd --create-home --uid 1000 abalone \
 && mkdir -p /opt/ml/data /opt/ml/model \
 && chown -R abalone /opt/ml/model

USER abalone
ENTRYPOINT ["/opt/ml/code/scripts/container_entrypoint.sh"]
