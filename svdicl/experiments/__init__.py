"""The paper's experiments as library functions: sweeps, condition numbers, Algorithm 1."""
