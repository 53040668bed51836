"""On-demand benchmarks: every figure beside a baseline measured in the same run (`python -m tests.bench`)."""
