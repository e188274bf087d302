"""The pure-torch core of FRAME: the model (eqs. 7-13), sparse propagation on one process or W
workers, the hybrid loss (eqs. 14-16) and the paper's metrics. No Ray, DeepSpeed or I/O here."""
