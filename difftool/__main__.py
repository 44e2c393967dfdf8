from difftool.cli.app import main

main()
