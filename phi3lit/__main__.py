from phi3lit.cli import main

main()
