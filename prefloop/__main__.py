from prefloop.cli import main

main()
