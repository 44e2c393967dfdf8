"""Entry point for `accelerate launch -m difftool.img2img ...` (what `difftool img2img --num-processes N` runs).

Only hands the command line to `difftool.cli.worker`; the library lives in `difftool.sampling.img2img`.
"""

if __name__ == "__main__":
    from difftool.cli.worker import run_single_command

    run_single_command("img2img")
