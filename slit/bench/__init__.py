"""Benchmarks behind `slit bench NAME`: each module defines HELP, add_arguments(parser) and
run(args) -> dict (a JSON-serialisable result). See slit/commands/bench.py."""

# name -> module
BENCHES: dict[str, str] = {
    "data": "slit.bench.data",
    "generate": "slit.bench.generate",
    "frontend": "slit.bench.frontend",
    "cache": "slit.bench.cache",
    "stage1": "slit.bench.stage1",
    "stage2": "slit.bench.stage2",
}
