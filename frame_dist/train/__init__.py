"""Stage [train]: the training loop (single process and Ray Train + DeepSpeed workers), a worker's
data, and the memory planner that refuses a setting before any worker starts."""
