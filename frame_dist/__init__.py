"""frame-dist: FRAME (SIGIR 2023) fine-grained micro-video recommendation on Ray and DeepSpeed.

One subpackage per stage of ``jobs/`` (docs/architecture.md has the data flow):

- ``model``: the pure-torch core (model, propagation, distributed propagation, loss, metrics)
- ``ingest``: the synthetic world; validation and split of interactions and videos
- ``extract``: frame decoding, the ResNet-50 trunk, the Ray Data extraction pipeline
- ``graph``: clip labels and normalised user-clip graphs; user shards and their manifest
- ``train``: the training loop, Ray Train + DeepSpeed workers, the memory planner
- ``evaluate``: test metrics, the run report, the N_c sweep
- ``score``: embeddings per shard, the fused top-K kernel, the Ray Data scoring pipeline

``config`` (typed config), ``cli`` (the jobs' command line and exit codes) and ``ray_runtime``
(the local Ray instance) serve every stage. The store's tables and their schemas live in the
top-level ``feature_store`` package, which imports nothing of ``frame_dist``.
"""
