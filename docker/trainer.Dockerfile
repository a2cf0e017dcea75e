# The trainer image for Vertex AI custom jobs (trainer.launch --image).
# TensorFlow 2.21 with CUDA comes from the base image; the project and its other
# dependencies go on top. Build from the repository root (the context is "."):
#
#   IMAGE=REGION-docker.pkg.dev/PROJECT/REPO/captioner-trainer:latest
#   docker build -f docker/trainer.Dockerfile -t $IMAGE . && docker push $IMAGE
#
# or on Cloud Build, with a cloudbuild.yaml of:
#   steps: [{name: gcr.io/cloud-builders/docker, args: [build, -f, docker/trainer.Dockerfile, -t, $_IMAGE, .]}]
#   images: [$_IMAGE]
#   gcloud builds submit --config cloudbuild.yaml --substitutions _IMAGE=$IMAGE .
#
# then: python -m trainer.launch ... --image $IMAGE
FROM tensorflow/tensorflow:2.21.0-gpu

# The job ends by scoring the export with the COCO caption metrics (unless --no-eval):
# pycocoevalcap's tokenizer and METEOR run on Java.
RUN apt-get update && apt-get install -y --no-install-recommends default-jre-headless \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/captioner
COPY setup.py README.md ./
COPY caption_io ./caption_io
COPY model ./model
COPY caption_serving ./caption_serving
COPY pipelines ./pipelines
COPY caption_eval ./caption_eval
COPY trainer ./trainer
# tensorflow>=2.21,<2.22 is already satisfied by the base image, so pip keeps its CUDA build.
RUN pip install --no-cache-dir ".[eval]"

# No ENTRYPOINT: the launcher's container_spec gives the command (python -m trainer.task ...).
