# A Dataflow worker image with TensorFlow and tensorflow-text preinstalled, so
# workers start in seconds instead of pip-installing ~1 GB each.
# Beam and Python versions must match the launching environment (Beam 2.77, Python 3.11).
#
#   gcloud builds submit --tag REGION-docker.pkg.dev/PROJECT/REPO/captioner-worker:latest .
#   python -m pipelines.preprocess ... --runner DataflowRunner \
#       --sdk_container_image REGION-docker.pkg.dev/PROJECT/REPO/captioner-worker:latest
FROM apache/beam_python3.11_sdk:2.77.0

WORKDIR /opt/captioner
COPY setup.py README.md ./
COPY caption_io ./caption_io
COPY model ./model
COPY caption_serving ./caption_serving
COPY pipelines ./pipelines
COPY caption_eval ./caption_eval
COPY trainer ./trainer
# GPU workers need TensorFlow's CUDA libraries too:
#   docker build --build-arg GPU_EXTRAS="tensorflow[and-cuda]>=2.21,<2.22" -t IMAGE .
ARG GPU_EXTRAS=""
RUN pip install --no-cache-dir . ${GPU_EXTRAS:+"$GPU_EXTRAS"}

# The Beam SDK harness stays the entrypoint (inherited from the base image).
