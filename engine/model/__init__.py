"""The model: the GPT, sparse layers and their kernels, sparsity masks, FLOP formulas, checkpoint files, run resolution."""
