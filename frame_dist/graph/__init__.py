"""Stage [graph]: clip labels and the normalised user-clip graphs R~^p / R~^n (the maths), and the
user shards, manifest and loaders of the graph stage."""
