from kanc.cli import main

main()
