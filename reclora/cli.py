"""`reclora` console script: dispatches to the subcommands' own modules.

    reclora data ...   datasets: fetch, stats (reclora.data.cli)
    reclora run ...    the main job: Few2Many RecLoRA with baselines (reclora.pipeline)
"""

from __future__ import annotations

import importlib
import sys

SUBCOMMANDS = {
    "data": ("reclora.data.cli", "datasets: fetch and stats"),
    "run": ("reclora.pipeline", "the main job: CRMs, LLM baselines and RecLoRA on a dataset"),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: reclora {" + ",".join(SUBCOMMANDS) + "} ...\n")
        for name, (_, doc) in SUBCOMMANDS.items():
            print(f"  {name:6s} {doc}")
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        print(f"reclora: unknown command {name!r}; choose from {list(SUBCOMMANDS)}",
              file=sys.stderr)
        return 2
    module = importlib.import_module(SUBCOMMANDS[name][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
