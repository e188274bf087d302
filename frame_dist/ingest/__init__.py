"""Stage [ingest]: the bundled synthetic world, and validation, watch ratios and the time split of
interactions and videos into the store."""
