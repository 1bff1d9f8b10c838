"""`remoe-lm-eval`: lm-eval's own CLI with the `remoe` model registered.

lm-eval has no plugin entry points, so the bare `lm_eval` script never imports this package; this
script imports the adapter and hands every flag to lm-eval unchanged:
    remoe-lm-eval --model remoe --model_args checkpoint=outputs/runs/.../last.ckpt --tasks arc_easy
"""

from __future__ import annotations


def main() -> None:
    import lm_eval.models  # noqa: F401  (fill lm-eval's registry first: it skips that when non-empty)
    from lm_eval.__main__ import cli_evaluate

    from . import adapter  # noqa: F401  (registers "remoe")

    cli_evaluate()


if __name__ == "__main__":
    main()
