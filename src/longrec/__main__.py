from longrec.cli import main

main()
