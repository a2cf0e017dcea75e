"""The preprocessing pipeline's composite transforms, one module each, each
tested on its own with Beam's TestPipeline (tests/test_transforms.py).

    check       manifest entries -> usable entries (tokenised) | rejects
    vocabulary  checked training entries -> the vocabulary (one list of tokens)
    encode      checked entries -> shard files, one summary per shard | rejects
    stats       per-channel feature statistics (a CombineFn)
    metadata    counts and summaries -> vocab.txt, feature_stats.npz, metadata.json

pipelines/preprocess.py wires them together and owns the command line.
"""
NAMESPACE = "captioner"  # Beam counters (Dataflow's console, the local progress lines)
