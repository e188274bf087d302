"""Stage [evaluate]: test metrics next to the oracle, the run report with its plots, and the N_c
sweep."""
