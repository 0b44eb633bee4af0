"""chunkserver's throughput harness: `python -m bench` (see bench/README.md)."""
