"""Packaging for the captioner.

Dataflow workers install this package with ``--setup_file ./setup.py``, so the
runtime dependencies below are exactly what a worker needs to run the pipeline.
"""
from setuptools import find_packages, setup

REQUIRED = [
    "tensorflow>=2.21,<2.22",
    "tensorflow-text>=2.21,<2.22",
    "apache-beam[gcp]>=2.77,<3",
    "numpy>=1.26",
    "pillow>=10",
    "google-cloud-storage>=2.10",
    # Beam computes TFRecord checksums with this; without it, it falls back to
    # a pure-Python CRC that is ~100x slower on 256 KiB feature records.
    "google-crc32c>=1.5",
    "tqdm>=4.66",
    "tensorboard>=2.20",  # tf.summary needs it; logs/ is read with TensorBoard
    "matplotlib>=3.8",   # loss.png, attention plots
    # The export writes TF Serving's warm-up requests (PredictionLog protos) with it.
    "tensorflow-serving-api>=2.21,<2.22",
]

SERVE = ["starlette>=1.10,<2", "uvicorn>=0.54,<1"]
LITERT = ["ai-edge-litert>=2.3,<3"]

EXTRAS = {
    "eval": ["pycocoevalcap>=1.2"],
    # trainer.launch submits Vertex AI custom jobs (apache-beam[gcp] pulls it in too).
    "cloud": ["google-cloud-aiplatform>=1.60"],
    # caption-serve (caption_serving/serve.py): an ASGI app on Starlette, run by uvicorn.
    "serve": SERVE,
    # python -m caption_serving.litert and `caption --model X.tflite`: LiteRT's interpreter (59 MB).
    "litert": LITERT,
    # The GCS tests serve a bucket from a loopback emulator; the serve tests drive Chromium with selenium.
    # pytest-xdist: make test runs a worker a core; filelock: its workers share the trained fixtures.
    "test": ["pytest>=8", "pytest-xdist>=3.8,<4", "filelock>=3.12", "pycocoevalcap>=1.2",
             "google-cloud-aiplatform>=1.60", "gcp-storage-emulator>=2024.1", "ruff>=0.17,<0.18", *SERVE, *LITERT,
             "httpx>=0.27", "selenium>=4.30,<5",
             # The docs site (mkdocs.yml): `make test` builds it with --strict (no broken link or page).
             "mkdocs>=1.6,<2", "mkdocs-material>=9.8,<10"],
}

setup(
    name="show-attend-tell",
    version="0.1.0",
    description="Attention-based image captioning (Show, Attend and Tell) at scale: "
    "Beam preprocessing, tf.distribute training, SavedModel serving.",
    packages=find_packages(
        include=["caption_io*", "model*", "caption_serving*", "pipelines*", "caption_eval*", "trainer*"]),
    # The fused attention kernels' C++ source, built on first use (model/fused_attention.py).
    # ... caption-serve's page (caption_serving/serve.py) and the evaluation gallery's (caption_eval/gallery.py).
    package_data={"model": ["kernels/*.cc"], "caption_serving": ["page.html"], "caption_eval": ["gallery.html"]},
    python_requires=">=3.10",
    install_requires=REQUIRED,
    extras_require=EXTRAS,
    entry_points={"console_scripts": ["caption = caption_serving.caption:main",
                                      "caption-serve = caption_serving.serve:main"]},
)
