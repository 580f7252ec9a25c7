"""llmcli: train and run Transformer models from the shell."""

__version__ = "0.1.0"
