"""`make bench`: what operating servekit costs in time (``python -m benchmarks.bench``), and the
model supply benchmark (``benchmarks/model_supply.py``), run from the checkout."""
