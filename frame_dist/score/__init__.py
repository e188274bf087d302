"""Stage [score]: per-shard embeddings, the fused top-K kernel and the Ray Data pipeline that scores
every user into the scores table."""
