"""Stage [extract]: decode frames on a uniform time grid (PyAV), ResNet-50 trunk features, the Ray
Data pipeline that commits them to the store video by video."""
