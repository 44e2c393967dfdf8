"""Entry point for `accelerate launch -m difftool.distill ...` (what `difftool distill --num-processes N` runs).

Only hands the command line to `difftool.cli.worker`; the library lives in `difftool.distilling`.
"""

if __name__ == "__main__":
    from difftool.cli.worker import run_single_command

    run_single_command("distill")
