"""One module per `slit` sub-command.

Each module defines `HELP` (one line), `add_arguments(parser)` and `run(args, extra) -> int` (the exit
code; `extra` holds the `--config.a.b=value` overrides where the command takes them). Modules must
import cheaply: jax and friends are imported inside `run`, so `slit --help` stays instant.
"""

# name -> module; the order is the order of `slit --help`.
COMMANDS: dict[str, str] = {
    "demo": "slit.commands.demo",
    "train": "slit.commands.train",
    "eval": "slit.commands.eval",
    "generate": "slit.commands.generate",
    "export": "slit.commands.export",
    "bench": "slit.commands.bench",
    "plan": "slit.commands.plan",
    "data": "slit.commands.data",
    "score": "slit.commands.score",
    "report": "slit.commands.report",
    "cache-features": "slit.commands.cache_features",
    "convert-torch": "slit.commands.convert_torch",
    "import-pengi": "slit.commands.import_pengi",
}
