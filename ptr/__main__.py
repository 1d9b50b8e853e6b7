from ptr.cli import main

main()
