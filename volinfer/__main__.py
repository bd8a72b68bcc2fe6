from volinfer.cli import main

main()
