"""Entry point for `accelerate launch -m difftool.train ...` (what `difftool train --num-processes N` runs).

Only hands the command line to `difftool.cli.worker`; the library lives in `difftool.training`.
"""

if __name__ == "__main__":
    from difftool.cli.worker import run_single_command

    run_single_command("train")
