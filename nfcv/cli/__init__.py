"""Command-line entry points: nfcv-train, nfcv-sample, nfcv-eval."""
